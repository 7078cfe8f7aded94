"""The catalog of schedule types: what ``GET /v1/schedules/catalog`` lists.

Built from the spec models themselves, so it cannot drift from what ``parse_schedule``
accepts: every type with its arguments, their JSON types, defaults and descriptions.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lrserve.service.engine._validators import TypeLabel
from lrserve.service.engine.spec import SPEC_MODELS
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python
from torch.optim import lr_scheduler as torch_schedulers

# Where torch's first docstring line misleads ("Sets the initial learning rate."), or
# the type is lrserve's own.
_DESCRIPTIONS = {
    "LambdaLR": "Sets the learning rate of each parameter group to the initial lr times a "
    "given function.",
    "LRRangeTest": "Learning-rate range test (lrserve): raises the LR from min_lr towards max_lr "
    "while the job reports its loss every step, suggests an LR (Lightning's steepest-slope rule, "
    "and the minimum / 10) and, with `then`, switches to that schedule at the suggested LR.",
    "SpikeGuard": "Spike guard (lrserve): wraps any schedule; a loss spike on any rank (a value "
    "more than threshold robust deviations above the rank's recent median, or not finite) backs "
    "the LRs off to factor x the inner schedule's for hold steps, then ramps back; the run stops "
    "after max_spikes spikes.",
}

# What lrserve adds to, or restricts in, torch's description of a class.
_NOTES = {
    "LambdaLR": "lr_lambda is an expression of step, e.g. '0.95 ** step' (no Python lambdas).",
    "MultiplicativeLR": "lr_lambda is an expression of step, e.g. '0.95' (no Python lambdas).",
    "SequentialLR": "Stages may be ReduceLROnPlateau (lrserve), but not SequentialLR or "
    "ChainedScheduler.",
    "ChainedScheduler": "May not contain ReduceLROnPlateau; use a SequentialLR stage instead.",
    "ReduceLROnPlateau": "Watches the metric named by monitor; may also be a SequentialLR stage.",
    "CyclicLR": "scale_fn is not accepted (a callable cannot travel over HTTP); use mode.",
}

_SCALARS = {int: "int", float: "float", bool: "bool", str: "string", type(None): "null"}


@dataclass(frozen=True)
class CatalogArg:
    """One argument of a schedule type, as a user writes it."""

    name: str
    type: str  # int, float, list[int], schedule, string (expression of step), ...
    required: bool
    description: str
    default: Any = None  # JSON-ready; only when not ``required``
    choices: tuple[Any, ...] = ()  # a Literal's values


@dataclass(frozen=True)
class CatalogEntry:
    """One accepted schedule type: its name, what it does, its arguments."""

    type: str
    description: str
    args: tuple[CatalogArg, ...]


@functools.cache
def catalog() -> tuple[CatalogEntry, ...]:
    """Describe every accepted schedule type (built once; frozen).

    Example:
        >>> next(e for e in catalog() if e.type == "StepLR").args[0].name
        'step_size'
    """
    return tuple(_entry(model) for model in SPEC_MODELS)


def _entry(model: Any) -> CatalogEntry:
    name = model.model_fields["type"].default
    description = _DESCRIPTIONS.get(name) or _first_line(getattr(torch_schedulers, name))
    if name in _NOTES:
        description = f"{description} {_NOTES[name]}"
    args = tuple(_arg(arg, info) for arg, info in model.model_fields.items() if arg != "type")
    return CatalogEntry(name, description, args)


def _first_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return next((line.strip() for line in doc.splitlines() if line.strip()), cls.__name__)


def _arg(name: str, info: FieldInfo) -> CatalogArg:
    required = info.is_required()
    default = None if required else to_jsonable_python(info.default)
    return CatalogArg(name, _label(info.annotation, info.metadata), required, info.description or "",
                      default, tuple(_choices(info.annotation)))


def _label(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    for item in metadata:
        if isinstance(item, TypeLabel):
            return item.label
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        return _label(base, extra)
    if origin is typing.Literal:
        return "string"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_label(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"list[{_label(typing.get_args(annotation)[0])}]"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _choices(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return []
