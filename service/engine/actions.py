"""Operator actions (API.md, Operator control): each one's fields and meaning, in one place.

An action is stored as its ``control`` event's payload (``payload()``) and applied right after
the step it is placed at (``apply``). Its meaning is three things: what it does to the
engine's values, which status it gives the run, and which metrics the run watches after it.
``action_for_run`` turns a request's action into the stored one, with the rules that depend
on the run (its param groups, whether it reports momentum, the work budget).

Kinds are stable strings on disk: never rename one.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from lrserve.service.engine.spec import (
    ScheduleSpec,
    cycles_momentum,
    guard_of,
    parse_schedule,
    spec_to_json,
    watched_metrics,
)
from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import InvalidInput
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter

if TYPE_CHECKING:  # the engine (torch) is only called, not needed to describe an action
    from lrserve.service.engine.engine import Engine


class _Action(BaseModel):
    # extra="ignore": logs written by older versions may carry fields since dropped.
    model_config = ConfigDict(frozen=True, extra="ignore")

    sets_status: ClassVar[RunStatus | None] = None
    """The status the run takes once the action applies (``stop`` for good; ``hold`` and
    ``resume`` only while the run is not stopped); ``None``: the status stays."""

    @property
    def kind(self) -> str:
        return self.action  # type: ignore[attr-defined,no-any-return]  # each action's Literal field

    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        """The fields a request gives this action (``POST .../control``): its own, but ``action``."""
        return tuple(name for name in cls.model_fields if name != "action")

    def apply(self, engine: Engine) -> None:
        """What the action does to the values (nothing, unless a subclass says)."""

    def watched(self, n_groups: int) -> frozenset[str]:
        """Metrics the run decides on from now on, besides those it did (new schedules only)."""
        return frozenset()

    def guard_monitors(self, n_groups: int) -> frozenset[str]:
        """The per-rank metric a spike guard brought by this action judges."""
        return frozenset()

    def payload(self) -> dict[str, Any]:
        """The stored form (the ``control`` event's payload)."""
        return self.model_dump(mode="json")


class SetLR(_Action):
    """Write every group's LR; the schedule continues from there as torch would."""

    action: Literal["set_lr"] = "set_lr"
    lrs: list[float]

    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        return ("lr", "lrs")  # exactly one: an LR for every group, or one per group (stored as lrs)

    def apply(self, engine: Engine) -> None:
        engine.set_lrs(self.lrs)


class Scale(_Action):
    """Multiply every group's current LR (the inner schedule's, under a spike guard)."""

    action: Literal["scale"] = "scale"
    factor: float

    def apply(self, engine: Engine) -> None:
        engine.scale(self.factor)


class Hold(_Action):
    """Freeze the clock: later steps keep these values and feed no decisions."""

    action: Literal["hold"] = "hold"
    sets_status: ClassVar[RunStatus | None] = RunStatus.HELD

    def apply(self, engine: Engine) -> None:
        engine.hold()


class Resume(_Action):
    """Let the clock run on from where it was frozen."""

    action: Literal["resume"] = "resume"
    sets_status: ClassVar[RunStatus | None] = RunStatus.ACTIVE

    def apply(self, engine: Engine) -> None:
        engine.resume()


class Stop(_Action):
    """Stop the run for good; its values stay as they are."""

    action: Literal["stop"] = "stop"
    sets_status: ClassVar[RunStatus | None] = RunStatus.STOPPED


class ReplaceSchedule(_Action):
    """Build a new schedule now, its base LRs being the current LRs (canonical JSON form)."""

    action: Literal["replace_schedule"] = "replace_schedule"
    schedule: dict[str, Any]

    # The schedule parsed once per group count (applying it and learning what it watches ask).
    _parsed: tuple[int, ScheduleSpec] | None = PrivateAttr(default=None)

    @classmethod
    def of(cls, schedule: ScheduleSpec, n_groups: int) -> ReplaceSchedule:
        """The action for a schedule just accepted for ``n_groups`` groups (kept parsed)."""
        action = cls(schedule=spec_to_json(schedule))
        action._parsed = (n_groups, schedule)
        return action

    def spec(self, n_groups: int) -> ScheduleSpec:
        """The schedule, as accepted when the action was placed (its types checked again)."""
        if self._parsed is None or self._parsed[0] != n_groups:
            self._parsed = (n_groups, parse_schedule(self.schedule, n_groups=n_groups, validated=True))
        return self._parsed[1]

    def apply(self, engine: Engine) -> None:
        engine.replace_schedule(self.spec(engine.n_groups))

    def watched(self, n_groups: int) -> frozenset[str]:
        return frozenset(watched_metrics(self.spec(n_groups), n_groups))

    def guard_monitors(self, n_groups: int) -> frozenset[str]:
        guard = guard_of(self.spec(n_groups), n_groups)
        return frozenset() if guard is None else frozenset({guard.monitor})


Action = Annotated[SetLR | Scale | Hold | Resume | ReplaceSchedule | Stop, Field(discriminator="action")]
"""Any operator action, told apart by its ``action`` field (in the order the API lists them)."""

ActionKind = Literal["set_lr", "scale", "hold", "resume", "replace_schedule", "stop"]
"""Every action's ``action`` value, in the order the API lists them."""

ARGUMENTS: dict[str, tuple[str, ...]] = {
    model.model_fields["action"].default: model.arguments()
    for model in typing.get_args(typing.get_args(Action)[0])
}
"""Per action kind, the fields a request gives it (the API's ``ActionSpec`` checks them)."""

_ADAPTER: TypeAdapter[Action] = TypeAdapter(Action)


def parse_action(payload: Mapping[str, Any]) -> Action:
    """A stored action (a ``control`` event's payload), typed."""
    return _ADAPTER.validate_python(payload)


def action_for_run(
    request: Mapping[str, Any],
    *,
    n_groups: int,
    reports_momentum: bool,
    check_cost: Callable[[ScheduleSpec], None] | None = None,
) -> Action:
    """The action to store for a request's action (fields as in ``POST .../control``, already
    checked for shape) on a run with ``n_groups`` param groups.

    ``set_lr`` with one ``lr`` sets every group to it; a new schedule is checked in full for
    this run (``check_cost`` first) and stored in its canonical form.

    Raises:
        InvalidInput: ``lrs`` does not have one value per group, or the new schedule cycles
            momentum on a run that does not report it.
        SpecError: the new schedule is invalid.
    """
    kind = request["action"]
    if kind == "set_lr":
        lrs = request.get("lrs")
        if lrs is None:
            lrs = [request["lr"]] * n_groups
        if len(lrs) != n_groups:
            raise InvalidInput.at("lrs", f"expected {n_groups} values (one per param group), got {len(lrs)}")
        return SetLR(lrs=[float(v) for v in lrs])
    if kind == "replace_schedule":
        schedule = parse_schedule(request["schedule"], n_groups=n_groups, before_checks=check_cost)
        if cycles_momentum(schedule) and not reports_momentum:
            raise InvalidInput.at(
                "schedule",
                "this run does not cycle momentum, so its new schedule cannot either "
                "(set cycle_momentum: false)",
            )
        return ReplaceSchedule.of(schedule, n_groups)
    return parse_action({k: v for k, v in request.items() if v is not None})
