"""The schedule spec language: one pydantic model per ``torch.optim.lr_scheduler`` class.

A spec is ``{"type": "<torch class name>", <constructor keyword arguments>}`` without
``optimizer``, ``last_epoch`` and ``verbose``; composites nest specs in ``schedulers``.
Argument names and defaults are torch's own. Validation is stricter than torch where
torch would crash later (at some step) or silently do something unlikely to be meant,
and every error names its field path, e.g. ``schedule.schedulers.1.T_max``.

Example:
    >>> spec = parse_schedule({"type": "StepLR", "step_size": 30}, n_groups=1)
    >>> spec.torch_kwargs()
    {'step_size': 30, 'gamma': 0.1}
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from lrserve.service.engine import _validators as v
from lrserve.service.engine._validators import MAX_GROUPS as MAX_GROUPS  # the one definition; re-exported
from lrserve.service.engine._validators import PerGroupExpression, PerGroupFloat, Problems
from lrserve.service.engine.expr import Expression, compile_expression, node_count
from lrserve.service.errors import FieldError, SpecError, describe
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

MAX_DEPTH: int = 4
"""Nesting levels of schedules allowed (the top level is 1)."""
MAX_CHILDREN = 32
"""Most schedulers in one SequentialLR / ChainedScheduler."""
MAX_MILESTONES = 10_000
MAX_STEPS = 10**12
"""Largest step count an argument may name; keeps torch's float arithmetic exact and finite."""

COMPOSITES = ("SequentialLR", "ChainedScheduler")
PLATEAU = "ReduceLROnPlateau"
RANGE_TEST = "LRRangeTest"
SPIKE_GUARD = "SpikeGuard"

Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Count = Annotated[int, Field(ge=0, le=MAX_STEPS)]
Milestone = Annotated[int, Field(le=MAX_STEPS)]  # >= 1 is checked later, with the reason
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # Where parse_schedule found the node; names the field in expression errors.
    _path: str = PrivateAttr(default="schedule")

    def torch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the torch constructor, without ``optimizer``."""
        return self.model_dump(exclude={"type"})

    def problems(self, n_groups: int) -> Problems:
        """Yield ``(field, message)`` for each rule that needs more than one field."""
        return iter(())

    def __eq__(self, other: object) -> bool:
        # Fields only: where a spec was found (_path) does not make it a different spec.
        return type(self) is type(other) and self.__dict__ == other.__dict__


class _LambdaSpec(_Spec):
    lr_lambda: PerGroupExpression = Field(
        description="Factor as an expression of step, e.g. '0.95 ** step', or one per param group."
    )
    # Compiled once per spec node (parse_schedule's check builds them): the run that holds
    # the spec holds its expressions; nothing is re-parsed while it steps.
    _compiled: list[Expression] | None = PrivateAttr(default=None)

    def torch_kwargs(self) -> dict[str, Any]:
        """``lr_lambda`` as a callable :class:`Expression` (or one per group)."""
        return {"lr_lambda": self.expressions()}

    def expressions(self) -> Expression | list[Expression]:
        """The compiled ``lr_lambda``; expression errors name the field under ``_path``."""
        if self._compiled is None:
            # Checked when the spec was accepted (parse_schedule's ``validated``): only built here.
            field = f"{self._path}.lr_lambda"
            if isinstance(self.lr_lambda, list):
                self._compiled = [Expression(s, field=f"{field}.{i}") for i, s in enumerate(self.lr_lambda)]
            else:
                self._compiled = [Expression(self.lr_lambda, field=field)]
        return self._compiled if isinstance(self.lr_lambda, list) else self._compiled[0]

    def max_nodes(self) -> int:
        """Terms of the largest expression (its cost per evaluation), known before any is checked."""
        if self._compiled is not None:
            return max(e.nodes for e in self._compiled)
        sources = self.lr_lambda if isinstance(self.lr_lambda, list) else [self.lr_lambda]
        return max(node_count(s) for s in sources)

    def problems(self, n_groups: int) -> Problems:
        yield from v.group_count("lr_lambda", self.lr_lambda, n_groups)
        sources = self.lr_lambda if isinstance(self.lr_lambda, list) else [self.lr_lambda]
        compiled = []
        for i, source in enumerate(sources):
            name = f"lr_lambda.{i}" if isinstance(self.lr_lambda, list) else "lr_lambda"
            try:
                compiled.append(compile_expression(source, field=f"{self._path}.{name}"))
            except SpecError as exc:
                yield name, exc.errors[0].message
        if len(compiled) == len(sources):
            self._compiled = compiled


class LambdaLRSpec(_LambdaSpec):
    """lr = base_lr * lr_lambda(step)."""

    type: Literal["LambdaLR"] = "LambdaLR"


class MultiplicativeLRSpec(_LambdaSpec):
    """lr = previous lr * lr_lambda(step), from step 1 on."""

    type: Literal["MultiplicativeLR"] = "MultiplicativeLR"


class StepLRSpec(_Spec):
    type: Literal["StepLR"] = "StepLR"
    step_size: Steps = Field(description="Period of learning rate decay, in steps.")
    gamma: Positive = Field(0.1, description="Multiplicative factor of learning rate decay.")


class MultiStepLRSpec(_Spec):
    type: Literal["MultiStepLR"] = "MultiStepLR"
    milestones: list[Milestone] = Field(
        min_length=1, max_length=MAX_MILESTONES, description="Strictly increasing steps (>= 1)."
    )
    gamma: Positive = Field(0.1, description="Multiplicative factor of learning rate decay.")

    def problems(self, n_groups: int) -> Problems:
        yield from v.milestone_problems("milestones", self.milestones)


class ConstantLRSpec(_Spec):
    type: Literal["ConstantLR"] = "ConstantLR"
    factor: float = Field(1.0 / 3, description="Multiplies the LR until total_iters; in (0, 1].")
    total_iters: int = Field(5, le=MAX_STEPS, description="Steps the factor applies for (>= 1).")

    def problems(self, n_groups: int) -> Problems:
        if not v.in_range(self.factor, 0, 1, low_open=True, high_open=False):
            why = ": torch divides by it when it restores the LR" if self.factor == 0 else ""
            yield "factor", f"expected a number in (0, 1], got {describe(self.factor)}{why}"
        if self.total_iters < 1:
            why = "with 0, torch scales the LR at step 0 and never restores it"
            yield "total_iters", f"expected an integer >= 1, got {self.total_iters}: {why}"


class LinearLRSpec(_Spec):
    type: Literal["LinearLR"] = "LinearLR"
    start_factor: float = Field(1.0 / 3, gt=0, le=1, description="Factor at step 0; in (0, 1].")
    end_factor: float = Field(1.0, ge=0, le=1, description="Factor from total_iters on; in [0, 1].")
    total_iters: int = Field(5, le=MAX_STEPS, description="Steps to go from start to end factor.")

    def problems(self, n_groups: int) -> Problems:
        if self.total_iters < 1:
            why = "with 0, torch scales the LR by start_factor at step 0 and never again"
            yield "total_iters", f"expected an integer >= 1, got {self.total_iters}: {why}"


class ExponentialLRSpec(_Spec):
    type: Literal["ExponentialLR"] = "ExponentialLR"
    gamma: Positive = Field(description="Multiplicative factor of learning rate decay per step.")


class CosineAnnealingLRSpec(_Spec):
    type: Literal["CosineAnnealingLR"] = "CosineAnnealingLR"
    T_max: Steps = Field(description="Steps of a half cosine period.")
    eta_min: NonNegative = Field(0.0, description="Minimum learning rate.")


class CosineAnnealingWarmRestartsSpec(_Spec):
    type: Literal["CosineAnnealingWarmRestarts"] = "CosineAnnealingWarmRestarts"
    T_0: Steps = Field(description="Steps until the first restart.")
    T_mult: Annotated[int, Field(ge=1, le=1000)] = Field(
        1, description="Factor by which the period grows after each restart."
    )
    eta_min: NonNegative = Field(0.0, description="Minimum learning rate.")


class PolynomialLRSpec(_Spec):
    type: Literal["PolynomialLR"] = "PolynomialLR"
    total_iters: Steps = Field(5, description="Steps over which the LR decays to 0.")
    power: float = Field(1.0, description="Power of the polynomial (>= 0).")

    def problems(self, n_groups: int) -> Problems:
        if self.power < 0:
            why = "torch raises 0 to it (ZeroDivisionError) when the step reaches total_iters"
            yield "power", f"expected a number >= 0, got {describe(self.power)}: {why}"


class CyclicLRSpec(_Spec):
    type: Literal["CyclicLR"] = "CyclicLR"
    base_lr: PerGroupFloat = Field(description="Lower LR boundary (replaces the group's LR).")
    max_lr: PerGroupFloat = Field(description="Upper LR boundary.")
    step_size_up: Steps = Field(2000, description="Steps in the increasing half of a cycle.")
    step_size_down: Steps | None = Field(
        None, description="Steps in the decreasing half; null: same as up."
    )
    mode: Literal["triangular", "triangular2", "exp_range"] = Field(
        "triangular", description="Amplitude scaling policy (scale_fn is not accepted)."
    )
    gamma: Positive = Field(1.0, description="exp_range scaling: gamma ** step; in (0, 1].")
    scale_mode: Literal["cycle", "iterations"] = Field(
        "cycle", description="Ignored by torch unless scale_fn is given; kept for parity."
    )
    cycle_momentum: bool = Field(True, description="Cycle momentum inversely to the LR.")
    base_momentum: PerGroupFloat = Field(0.8, description="Lower momentum boundary.")
    max_momentum: PerGroupFloat = Field(0.9, description="Upper momentum boundary.")

    def problems(self, n_groups: int) -> Problems:
        yield from v.cyclic_lr_problems(self, n_groups)
        yield from v.momentum_problems(self, n_groups)


class OneCycleLRSpec(_Spec):
    type: Literal["OneCycleLR"] = "OneCycleLR"
    max_lr: PerGroupFloat = Field(description="Peak LR (the cycle starts at max_lr / div_factor).")
    total_steps: Steps | None = Field(
        None, description="Steps in the cycle; or epochs * steps_per_epoch."
    )
    epochs: Steps | None = Field(None, description="With steps_per_epoch, gives total_steps.")
    steps_per_epoch: Steps | None = Field(None, description="With epochs, gives total_steps.")
    pct_start: float = Field(
        0.3, gt=0, lt=1, description="Fraction of the cycle spent increasing the LR."
    )
    anneal_strategy: Literal["cos", "linear"] = Field("cos", description="Annealing shape.")
    cycle_momentum: bool = Field(True, description="Cycle momentum inversely to the LR.")
    base_momentum: PerGroupFloat = Field(0.85, description="Lower momentum boundary.")
    max_momentum: PerGroupFloat = Field(0.95, description="Upper momentum boundary.")
    div_factor: Positive = Field(25.0, description="initial_lr = max_lr / div_factor.")
    final_div_factor: Positive = Field(1e4, description="min_lr = initial_lr / final_div_factor.")
    three_phase: bool = Field(
        False, description="Use the paper's three phases instead of fastai's two."
    )

    def problems(self, n_groups: int) -> Problems:
        yield from v.group_count("max_lr", self.max_lr, n_groups)
        yield from v.each_group("max_lr", self.max_lr, lambda x: x > 0, "a number > 0")
        yield from v.momentum_problems(self, n_groups)
        yield from v.one_cycle_length_problems(self)


class ReduceLROnPlateauSpec(_Spec):
    type: Literal["ReduceLROnPlateau"] = "ReduceLROnPlateau"
    mode: Literal["min", "max"] = Field(
        "min", description="Whether the metric should go down or up."
    )
    factor: float = Field(0.1, description="new_lr = lr * factor; in (0, 1).")
    patience: Count = Field(10, description="Reports without improvement before a reduction.")
    threshold: NonNegative = Field(1e-4, description="Smallest change that counts as improvement.")
    threshold_mode: Literal["rel", "abs"] = Field(
        "rel", description="Relative or absolute threshold."
    )
    cooldown: Count = Field(0, description="Reports to wait after a reduction.")
    min_lr: PerGroupFloat = Field(0.0, description="Lower bound on the LR, or one per group.")
    eps: NonNegative = Field(1e-8, description="Reductions smaller than eps are skipped.")
    monitor: str = Field(
        "val_loss", min_length=1, max_length=64, description="Name of the metric watched (lrserve)."
    )

    def torch_kwargs(self) -> dict[str, Any]:
        """Torch's arguments; ``monitor`` is lrserve's own."""
        return self.model_dump(exclude={"type", "monitor"})

    def problems(self, n_groups: int) -> Problems:
        if not 0 < self.factor < 1:
            why = "torch raises on factor >= 1" if self.factor >= 1 else "the LR would not shrink"
            yield "factor", f"expected a number in (0, 1), got {describe(self.factor)}: {why}"
        if self.mode == "min" and self.threshold_mode == "rel" and self.threshold >= 1:
            why = f"a metric would have to fall below best * {1 - self.threshold} to improve"
            expected = "expected a number < 1 with mode 'min' and threshold_mode 'rel'"
            yield "threshold", f"{expected}, got {self.threshold}: {why}"
        yield from v.group_count("min_lr", self.min_lr, n_groups)
        yield from v.each_group("min_lr", self.min_lr, lambda x: x >= 0, "a number >= 0")


_NESTED = (
    ": torch steps a composite first stage once more when it is built (its values shift by "
    "a step) and cannot restart one at a later milestone (NotImplementedError); merge the "
    "stages into one SequentialLR, or put the SequentialLR in a ChainedScheduler"
)
_CHAINED_PLATEAU = (
    "ReduceLROnPlateau cannot be chained: it needs a metric at every step; "
    "use it as a SequentialLR stage (e.g. after a warm-up) or on its own"
)

_NESTED_RANGE_TEST = (
    "LRRangeTest must be the whole schedule; give what follows it as its `then`"
)
_NESTED_GUARD = (
    "SpikeGuard must wrap the whole schedule (or be a range test's `then`): its backoff, its "
    "clock and its spike count belong to the run, and a stage's guard would stop acting at the "
    "next milestone; put the SequentialLR / ChainedScheduler inside the SpikeGuard instead"
)

Schedulers = Annotated[
    list["ScheduleSpec"],
    Field(min_length=1, max_length=MAX_CHILDREN),
    v.TypeLabel("list[schedule]"),
]


class SequentialLRSpec(_Spec):
    type: Literal["SequentialLR"] = "SequentialLR"
    schedulers: Schedulers = Field(description="Stages, run one after another.")
    milestones: list[Milestone] = Field(
        max_length=MAX_MILESTONES,
        description="Steps at which the next stage starts; one fewer than stages.",
    )

    def torch_kwargs(self) -> dict[str, Any]:
        """``milestones`` only: the engine builds the stages itself."""
        return {"milestones": list(self.milestones)}

    def problems(self, n_groups: int) -> Problems:
        stages = len(self.schedulers)
        if len(self.milestones) != stages - 1:
            expected = f"expected {stages - 1} milestones (one fewer than the {stages} schedulers)"
            yield "milestones", f"{expected}, got {len(self.milestones)}"
        yield from v.milestone_problems("milestones", self.milestones)
        for i, child in enumerate(self.schedulers):
            if child.type in COMPOSITES:
                yield f"schedulers.{i}", f"a SequentialLR stage cannot be a {child.type}{_NESTED}"
            if child.type == RANGE_TEST:
                yield f"schedulers.{i}", _NESTED_RANGE_TEST
            if child.type == SPIKE_GUARD:
                yield f"schedulers.{i}", _NESTED_GUARD


class ChainedSchedulerSpec(_Spec):
    type: Literal["ChainedScheduler"] = "ChainedScheduler"
    schedulers: Schedulers = Field(description="Schedulers all stepped at every step, in order.")

    def torch_kwargs(self) -> dict[str, Any]:
        """Nothing: the engine builds the chained schedulers itself."""
        return {}

    def problems(self, n_groups: int) -> Problems:
        for i, child in enumerate(self.schedulers):
            if child.type == PLATEAU:
                yield f"schedulers.{i}", _CHAINED_PLATEAU
            if child.type == RANGE_TEST:
                yield f"schedulers.{i}", _NESTED_RANGE_TEST
            if child.type == SPIKE_GUARD:
                yield f"schedulers.{i}", _NESTED_GUARD


class LRRangeTestSpec(_Spec):
    """lrserve's learning-rate range test (see ``range_test.py``); the whole schedule, not a stage."""

    type: Literal["LRRangeTest"] = "LRRangeTest"
    min_lr: Positive = Field(description="LR at the first step of the test.")
    max_lr: Positive = Field(description="LR the test would reach at num_steps.")
    num_steps: Annotated[int, Field(ge=2, le=100_000)] = Field(
        100, description="Steps of the test (one reported loss each)."
    )
    mode: Literal["exponential", "linear"] = Field("exponential", description="How the LR rises.")
    monitor: str = Field("loss", min_length=1, max_length=64, description="Name of the loss reported.")
    beta: float = Field(0.98, ge=0, lt=1, description="Smoothing of the loss (Lightning's beta).")
    early_stop_threshold: Positive | None = Field(
        4.0, description="Stop when the smoothed loss exceeds this times its best; null: never."
    )
    then: dict[str, Any] | None = Field(
        None, description="Schedule to switch to when the test ends, its base LR the suggestion."
    )

    def problems(self, n_groups: int) -> Problems:
        if self.max_lr <= self.min_lr:
            yield "max_lr", f"expected a number above min_lr ({self.min_lr}), got {self.max_lr}"
        if self.early_stop_threshold is not None and self.early_stop_threshold <= 1:
            yield "early_stop_threshold", (
                f"expected a number > 1 (or null), got {self.early_stop_threshold}: the test would "
                "stop at its second report"
            )
        if self.then is not None:
            yield from _then_problems(self.then, n_groups)

    # The ``then`` schedule, parsed once per group count (engines, cost and watched metrics ask often).
    _then: tuple[int, ScheduleSpec] | None = PrivateAttr(default=None)

    def then_spec(self, n_groups: int) -> ScheduleSpec | None:
        """The validated ``then`` schedule."""
        if self.then is None:
            return None
        if self._then is None or self._then[0] != n_groups:
            self._then = (n_groups, parse_schedule(self.then, n_groups=n_groups, field="then"))
        return self._then[1]


class SpikeGuardSpec(_Spec):
    """lrserve's spike guard (see ``spike_guard.py``): backs the wrapped schedule off after a loss spike."""

    type: Literal["SpikeGuard"] = "SpikeGuard"
    schedule: dict[str, Any] = Field(description="The schedule guarded (any spec but another SpikeGuard).")
    monitor: str = Field(
        "loss", min_length=1, max_length=64, description="Name of the per-rank metric watched."
    )
    threshold: Positive = Field(3.0, description="Robust deviations above the baseline that make a spike.")
    warmup_reports: Annotated[int, Field(ge=1, le=100_000)] = Field(
        20, description="Reports per rank before deviations count (non-finite values always do)."
    )
    factor: float = Field(0.5, gt=0, le=1, description="LR multiplier right after a spike; in (0, 1].")
    hold: Count = Field(100, description="Steps the LR stays at factor x the inner schedule's.")
    ramp: Count = Field(200, description="Steps of the linear return to the inner schedule.")
    max_spikes: Count = Field(5, description="Spikes handled by backing off; the next one stops the run.")
    window: Annotated[int, Field(ge=3, le=10_000)] = Field(
        50, description="Recent non-spike reports per rank the baseline (median, MAD) is taken over."
    )
    rel_scale_floor: NonNegative = Field(
        0.25, description="Smallest deviation, as a fraction of |median| (keeps smooth losses quiet)."
    )
    min_delta: NonNegative = Field(0.0, description="Smallest deviation, in the metric's own units.")

    def torch_kwargs(self) -> dict[str, Any]:
        """Nothing: the guard is lrserve's own, around the inner schedule."""
        return {}

    def problems(self, n_groups: int) -> Problems:
        if self.warmup_reports > self.window:
            yield "warmup_reports", (
                f"expected at most window ({self.window}), got {self.warmup_reports}: "
                "the baseline never holds more than window reports"
            )
        yield from _guarded_problems(self.schedule, n_groups)

    # The inner schedule, parsed once per group count (engines, previews and the manager ask often).
    _inner: tuple[int, ScheduleSpec] | None = PrivateAttr(default=None)

    def inner_spec(self, n_groups: int) -> ScheduleSpec:
        """The validated inner schedule."""
        if self._inner is None or self._inner[0] != n_groups:
            self._inner = (n_groups, parse_schedule(self.schedule, n_groups=n_groups, field="schedule"))
        return self._inner[1]


def _guarded_problems(inner: dict[str, Any], n_groups: int) -> Problems:
    if inner.get("type") == SPIKE_GUARD or (
        inner.get("type") == RANGE_TEST
        and isinstance(inner.get("then"), dict)
        and inner["then"].get("type") == SPIKE_GUARD
    ):
        yield "schedule.type", "a SpikeGuard cannot guard another SpikeGuard"
        return
    yield from _nested_problems(inner, n_groups, "schedule")


def _then_problems(then: dict[str, Any], n_groups: int) -> Problems:
    if then.get("type") == RANGE_TEST:
        yield "then.type", "a range test cannot be followed by another range test"
        return
    yield from _nested_problems(then, n_groups, "then")


def _nested_problems(spec: dict[str, Any], n_groups: int, field: str) -> Problems:
    """A nested spec's own errors (a guard's ``schedule``, a range test's ``then``), under ``field``."""
    try:
        parse_schedule(spec, n_groups=n_groups, field=field)
    except SpecError as exc:
        for error in exc.errors:
            yield error.field, error.message


ScheduleSpec = Annotated[
    LambdaLRSpec
    | MultiplicativeLRSpec
    | StepLRSpec
    | MultiStepLRSpec
    | ConstantLRSpec
    | LinearLRSpec
    | ExponentialLRSpec
    | SequentialLRSpec
    | CosineAnnealingLRSpec
    | ChainedSchedulerSpec
    | ReduceLROnPlateauSpec
    | CyclicLRSpec
    | CosineAnnealingWarmRestartsSpec
    | OneCycleLRSpec
    | PolynomialLRSpec
    | LRRangeTestSpec
    | SpikeGuardSpec,
    Field(discriminator="type"),
]
"""Any schedule spec; pydantic picks the model by ``type``."""

SPEC_MODELS: tuple[type[_Spec], ...] = typing.get_args(typing.get_args(ScheduleSpec)[0])
"""Every model, in the order of ``torch.optim.lr_scheduler.__all__``, then lrserve's own."""
SPEC_TYPES: tuple[str, ...] = tuple(m.model_fields["type"].default for m in SPEC_MODELS)
_MODEL_BY_TYPE = dict(zip(SPEC_TYPES, SPEC_MODELS, strict=True))

SequentialLRSpec.model_rebuild()
ChainedSchedulerSpec.model_rebuild()
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ScheduleSpec)


def parse_schedule(
    data: Any,
    *,
    n_groups: int,
    field: str = "schedule",
    before_checks: Callable[[ScheduleSpec], None] | None = None,
    validated: bool = False,
) -> ScheduleSpec:
    """Validate a raw JSON spec for a run with ``n_groups`` param groups.

    Args:
        data: The decoded JSON value (or a spec model, checked again).
        n_groups: Number of param groups; per-group lists must have this many items.
        field: Path of the spec in the request, the prefix of every error's field.
        before_checks: Called with the typed spec before the checks that cost work (each
            expression evaluated at steps 0..100), e.g. to refuse it over the work budget.
        validated: The spec passed every check when it was accepted (it is read back from
            the run's log): only its types are checked again, not the rules that cost work.

    Returns:
        The validated spec model.

    Raises:
        SpecError: Listing every problem found, each with its dotted field path.
    """
    if isinstance(data, _Spec):
        data = spec_to_json(data)  # re-check a built spec, e.g. against another group count
    errors = v.structure_problems(data, field, SPEC_TYPES, COMPOSITES, MAX_DEPTH, MAX_CHILDREN)
    if errors:
        raise SpecError.many(errors)
    try:
        spec: ScheduleSpec = _ADAPTER.validate_python(data, strict=True)
    except ValidationError as exc:
        raise SpecError.many(
            v.translate_errors(exc.errors(), field, SPEC_TYPES, _accepted_keys)
        ) from None
    if before_checks is not None:
        before_checks(spec)
    for path, node in iter_nodes(spec, root=field):
        node._path = path
        if validated:
            continue
        errors.extend(
            FieldError(f"{path}.{name}", message) for name, message in node.problems(n_groups)
        )
    if errors:
        raise SpecError.many(errors)
    return spec


def _accepted_keys(type_name: str) -> list[str]:
    return [name for name in _MODEL_BY_TYPE[type_name].model_fields if name != "type"]


def iter_nodes(spec: Any, *, root: str = "schedule") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted path, node)`` for every node, depth first, the root first."""
    stack = [(root, spec)]
    while stack:
        path, node = stack.pop()
        yield path, node
        children = getattr(node, "schedulers", None) or []
        stack.extend(reversed([(f"{path}.schedulers.{i}", c) for i, c in enumerate(children)]))


def cycles_momentum(spec: Any, n_groups: int = 1) -> bool:
    """Whether some CyclicLR / OneCycleLR in the tree (or a range test's ``then``) cycles momentum."""
    if spec.type == RANGE_TEST:
        return spec.then is not None and cycles_momentum(spec.then_spec(n_groups), n_groups)
    if spec.type == SPIKE_GUARD:
        return cycles_momentum(spec.inner_spec(n_groups), n_groups)
    return any(
        node.type in ("CyclicLR", "OneCycleLR") and node.cycle_momentum
        for _, node in iter_nodes(spec)
    )


def watched_metrics(spec: Any, n_groups: int = 1) -> set[str]:
    """The ``monitor`` of every ReduceLROnPlateau and LRRangeTest (and its ``then``).

    A SpikeGuard's own monitor is not among them: it is judged per rank, with no barrier.
    """
    if spec.type == SPIKE_GUARD:
        return watched_metrics(spec.inner_spec(n_groups), n_groups)
    watched = {node.monitor for _, node in iter_nodes(spec) if node.type in (PLATEAU, RANGE_TEST)}
    if spec.type == RANGE_TEST and spec.then is not None:
        watched |= watched_metrics(spec.then_spec(n_groups), n_groups)
    return watched


def guard_of(spec: Any, n_groups: int = 1) -> Any:
    """The SpikeGuard at the top of ``spec`` (or as a top range test's ``then``), if any."""
    if spec.type == SPIKE_GUARD:
        return spec
    if spec.type == RANGE_TEST and spec.then is not None and spec.then.get("type") == SPIKE_GUARD:
        return spec.then_spec(n_groups)
    return None


def spec_to_json(spec: Any) -> dict[str, Any]:
    """The canonical JSON form: every argument present, defaults filled in."""
    data: dict[str, Any] = _ADAPTER.dump_python(spec, mode="json")
    return data
