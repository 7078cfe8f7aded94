"""Field types, checks and error wording shared by the spec models (``spec.py``).

Pydantic checks types and simple bounds; the rules that need the number of param groups
or the whole tree are plain functions yielding ``(field, message)`` pairs. Every message
says what was expected and what arrived, in words a user understands.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from lrserve.service.errors import FieldError, describe, field_path, validation_message
from pydantic import PlainValidator
from pydantic_core import ErrorDetails, PydanticCustomError

MAX_GROUPS = 1024
"""Most param groups a run may have: the one definition (request bodies use it too, through
``service.engine.spec``). A per-group list longer than this is refused before the run's
group count is even looked at."""

Problems = Iterator[tuple[str, str]]
"""``(field relative to the node, message)`` for each broken rule."""


@dataclass(frozen=True)
class TypeLabel:
    """How the catalog names a field's type, when the annotation alone cannot say."""

    label: str


def _fail(message: str, sub: str = "") -> PydanticCustomError:
    # `sub` extends the error's location, e.g. the index of a bad list item.
    return PydanticCustomError("lrserve", "{message}", {"message": message, "sub": sub})


def _number(value: Any, sub: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"expected {what}, got {describe(value)}", sub)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _fail(f"expected a finite number, got {describe(value)}", sub)
    return number


def _expression_text(value: Any, sub: str, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"expected {what}, got {describe(value)}", sub)
    return value


def _per_group(item: Callable[[Any, str, str], Any], one: str, many: str) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if not isinstance(value, list):
            return item(value, "", f"{one} or {many}")
        if not value:
            raise _fail(f"expected {many}, got an empty list")
        if len(value) > MAX_GROUPS:
            raise _fail(f"expected at most {MAX_GROUPS} values, got {len(value)}")
        return [item(v, str(i), one) for i, v in enumerate(value)]

    return validate


PerGroupFloat = Annotated[
    float | list[float],
    PlainValidator(
        _per_group(_number, "a number", "a list of numbers (one per param group)"),
        json_schema_input_type=float | list[float],
    ),
    TypeLabel("float | list[float]"),
]
"""A number for every param group, or a list with one number per group."""

PerGroupExpression = Annotated[
    str | list[str],
    PlainValidator(
        _per_group(
            _expression_text,
            "an expression string of step",
            "a list of expression strings (one per param group)",
        ),
        json_schema_input_type=str | list[str],
    ),
    TypeLabel("string (expression of step) | list[string]"),
]
"""An expression of ``step`` for every param group, or one per group."""


# -- checks after type validation -----------------------------------------------------


def as_groups(value: float | list[float], n_groups: int) -> list[float]:
    """Broadcast a scalar to one value per group, as torch does."""
    return list(value) if isinstance(value, list) else [value] * n_groups


def group_count(name: str, value: Any, n_groups: int) -> Problems:
    """A per-group list must have exactly one item per param group."""
    if isinstance(value, list) and len(value) != n_groups:
        yield name, f"expected {n_groups} values (one per param group), got {len(value)}"


def each_group(
    name: str, value: float | list[float], ok: Callable[[float], bool], expected: str
) -> Problems:
    """Check every item of a scalar-or-list field; the path names the bad item."""
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if not ok(item):
            where = f"{name}.{i}" if isinstance(value, list) else name
            yield where, f"expected {expected}, got {describe(item)}"


def milestone_problems(name: str, milestones: Sequence[int]) -> Problems:
    """Milestones must be steps >= 1 in strictly increasing order."""
    for i, milestone in enumerate(milestones):
        if milestone < 1:
            yield (
                name,
                (
                    f"expected every milestone >= 1, got {milestone} at index {i}: "
                    "a milestone at step 0 would take effect when the scheduler is built"
                ),
            )
            return
        if i and milestone <= milestones[i - 1]:
            yield (
                name,
                (
                    f"must be strictly increasing, got {milestone} at index {i} "
                    f"after {milestones[i - 1]}"
                ),
            )
            return


def in_range(value: float, low: float, high: float, *, low_open: bool, high_open: bool) -> bool:
    """``low < value`` (or ``<=``) and ``value < high`` (or ``<=``)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def momentum_problems(spec: Any, n_groups: int) -> Problems:
    """CyclicLR / OneCycleLR momentums: >= 0 (torch accepts above 1, as do its own tests; torch's
    optimizers refuse negative ones), one per group, base <= max."""
    for name in ("base_momentum", "max_momentum"):
        value = getattr(spec, name)
        yield from group_count(name, value, n_groups)
        yield from each_group(name, value, lambda m: m >= 0, "a momentum >= 0 (optimizers refuse < 0)")
    yield from _ordered_pair(spec, "base_momentum", "max_momentum", n_groups)


def cyclic_lr_problems(spec: Any, n_groups: int) -> Problems:
    """CyclicLR boundaries: >= 0, one per group, base_lr <= max_lr; exp_range gamma <= 1."""
    for name in ("base_lr", "max_lr"):
        yield from group_count(name, getattr(spec, name), n_groups)
        yield from each_group(name, getattr(spec, name), lambda x: x >= 0, "a number >= 0")
    yield from _ordered_pair(spec, "base_lr", "max_lr", n_groups)
    if spec.mode == "exp_range" and spec.gamma > 1:
        message = (
            f"expected a number in (0, 1] with mode 'exp_range', got {spec.gamma}: "
            "the amplitude would grow as gamma ** step until it overflows"
        )
        yield "gamma", message


def _ordered_pair(spec: Any, low: str, high: str, n_groups: int) -> Problems:
    low_value, high_value = getattr(spec, low), getattr(spec, high)
    pairs = zip(as_groups(low_value, n_groups), as_groups(high_value, n_groups), strict=False)
    for i, (bottom, top) in enumerate(pairs):
        if bottom > top:
            where = f"{high}.{i}" if isinstance(high_value, list) else high
            yield where, f"expected a value >= {low} ({bottom}), got {describe(top)}"
            return


def one_cycle_length_problems(spec: Any) -> Problems:
    """OneCycleLR needs a cycle length, and phases torch can interpolate over."""
    given = (spec.epochs, spec.steps_per_epoch)
    if spec.total_steps is None:
        if None in given:
            missing = "epochs" if spec.epochs is None else "steps_per_epoch"
            missing = "total_steps" if given == (None, None) else missing
            yield missing, "required: give total_steps, or both epochs and steps_per_epoch"
            return
        total = spec.epochs * spec.steps_per_epoch
    else:
        total = spec.total_steps
        if given != (None, None) and (None in given or given[0] * given[1] != total):
            message = (
                "torch ignores epochs and steps_per_epoch when total_steps is given; "
                "drop them or make epochs * steps_per_epoch == total_steps"
            )
            yield "total_steps", message
    yield from _phase_problems(spec.pct_start, total, spec.three_phase)


def _phase_problems(pct_start: float, total: int, three_phase: bool) -> Problems:
    # torch interpolates over phases ending at these steps, dividing by their lengths.
    warmup_end = float(pct_start * total) - 1
    if warmup_end <= 0:
        message = (
            f"pct_start * total_steps must be > 1 so the warm-up spans a step, got "
            f"{pct_start} * {total}: torch divides by zero or skips the warm-up"
        )
        yield "pct_start", message
    elif three_phase and float(2 * pct_start * total) - 2 >= total - 1:
        message = (
            f"with three_phase, the first two phases ({2 * pct_start} of the cycle) must end "
            "before the last step; use pct_start < 0.5"
        )
        yield "pct_start", message


# -- structure of the raw JSON, checked before pydantic sees it --------------------------


def structure_problems(
    data: Any,
    field: str,
    types: Sequence[str],
    composites: Iterable[str],
    max_depth: int,
    max_children: int,
) -> list[FieldError]:
    """Check node shape, ``type`` and nesting depth without recursion.

    Runs before pydantic so that a 10,000-deep tree is refused without recursing.
    """
    composite_types = set(composites)
    errors: list[FieldError] = []
    stack: list[tuple[Any, str, int]] = [(data, field, 1)]
    while stack:
        node, path, depth = stack.pop()
        error = _node_problem(node, path, depth, types, max_depth)
        if error is not None:
            errors.append(error)
            continue
        children = node.get("schedulers") if node["type"] in composite_types else None
        if not isinstance(children, list):
            continue  # pydantic reports a missing or mistyped list
        if len(children) > max_children:
            errors.append(
                FieldError(
                    f"{path}.schedulers",
                    f"expected at most {max_children} schedulers, got {len(children)}",
                )
            )
            continue
        for i in reversed(range(len(children))):  # reversed: pop in order, depth first
            stack.append((children[i], f"{path}.schedulers.{i}", depth + 1))
    return errors


def _node_problem(
    node: Any, path: str, depth: int, types: Sequence[str], max_depth: int
) -> FieldError | None:
    if depth > max_depth:
        return FieldError(
            path, f"schedules nest at most {max_depth} levels deep, this one is at level {depth}"
        )
    if not isinstance(node, dict):
        return FieldError(
            path,
            f'expected a schedule object such as {{"type": "StepLR", ...}}, got {describe(node)}',
        )
    if "type" not in node:
        return FieldError(
            f"{path}.type", f"required, but missing; expected one of: {', '.join(types)}"
        )
    kind = node["type"]
    if not isinstance(kind, str) or kind not in types:
        hint, shown = "", repr(kind[:60]) if isinstance(kind, str) else describe(kind)
        if isinstance(kind, str):
            close = difflib.get_close_matches(kind, types, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        return FieldError(
            f"{path}.type",
            f"unknown schedule type {shown}{hint}; expected one of: {', '.join(types)}",
        )
    return None


# -- pydantic's errors in our words ---------------------------------------------------

_REFUSED_KEYS = {
    "optimizer": "not part of a spec: lrserve builds the optimizer from the run's param groups",
    "last_epoch": "not accepted: a schedule starts at step 0; the run's step is its last_epoch",
    "verbose": "not accepted (deprecated in torch); read the values from the API instead",
    "scale_fn": (
        "not accepted: a Python callable cannot travel over HTTP; choose the scaling with "
        "mode ('triangular', 'triangular2' or 'exp_range')"
    ),
}


def translate_errors(
    errors: Iterable[ErrorDetails],
    field: str,
    types: Sequence[str],
    accepted_keys: Callable[[str], list[str]],
) -> list[FieldError]:
    """Turn pydantic's error dicts into FieldErrors under ``field``, tags stripped."""
    tags = set(types)
    result = []
    for error in errors:
        parts: list[Any] = [field]
        node_type = ""
        for part in error["loc"]:
            if isinstance(part, str) and part in tags:
                node_type = part  # a discriminator tag, not a field
                continue
            parts.append(part)
        ctx = error.get("ctx") or {}
        if ctx.get("sub"):
            parts.append(ctx["sub"])
        message = _message(error, ctx, node_type, accepted_keys)
        result.append(FieldError(field_path(parts), message))
    return result


def _message(
    error: ErrorDetails,
    ctx: dict[str, Any],
    node_type: str,
    accepted_keys: Callable[[str], list[str]],
) -> str:
    if error["type"] == "lrserve":
        return str(ctx["message"])
    unknown = ""
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        accepted = ", ".join(accepted_keys(node_type)) if node_type else ""
        unknown = _REFUSED_KEYS.get(
            key, f"unknown argument for {node_type or 'this schedule'}; accepted: {accepted}"
        )
    return validation_message(error, unknown_key=unknown)
