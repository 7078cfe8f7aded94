"""``RunSpec``: a run's spec (schedule, base LRs and momentums, world size), parsed once.

The create request is checked in full once (``from_request``); the stored form
(``to_json``) is read back with its types checked only (``from_stored``): it passed every
rule when it was accepted. Everything derived from the schedule that the server asks on
every load or step (what it watches, what a spike guard judges) is computed here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lrserve.service.engine.engine import Engine
from lrserve.service.engine.spec import ScheduleSpec, guard_of, parse_schedule, spec_to_json, watched_metrics
from lrserve.service.errors import InvalidInput


@dataclass(frozen=True)
class RunSpec:
    """A run's spec, typed; immutable for the run's life (API.md, Runs)."""

    schedule: ScheduleSpec
    base_lrs: tuple[float, ...]
    base_momentums: tuple[float, ...] | None = None
    world_size: int = 1
    watched: frozenset[str] = field(init=False)
    """The metrics the schedule decides on (every rank reports them; a barrier when world_size > 1)."""
    guard_monitors: frozenset[str] = field(init=False)
    """The metric a spike guard in the schedule judges per rank (none without a guard)."""

    def __post_init__(self) -> None:
        n = len(self.base_lrs)
        object.__setattr__(self, "watched", frozenset(watched_metrics(self.schedule, n)))
        guard = guard_of(self.schedule, n)
        monitors = frozenset() if guard is None else frozenset({guard.monitor})
        object.__setattr__(self, "guard_monitors", monitors)

    @property
    def n_groups(self) -> int:
        return len(self.base_lrs)

    @classmethod
    def from_request(
        cls, request: Mapping[str, Any], *, check_cost: Callable[[ScheduleSpec, int], None] | None = None
    ) -> RunSpec:
        """A create request's spec, every rule checked (``check_cost(schedule, n_groups)`` before
        the rules that cost work).

        Raises:
            SpecError: the schedule is invalid.
            InvalidInput: ``base_momentums`` has not one value per group.
        """
        base_lrs = tuple(float(v) for v in request["base_lrs"])
        n = len(base_lrs)
        before = None if check_cost is None else (lambda s: check_cost(s, n))
        schedule = parse_schedule(request["schedule"], n_groups=n, before_checks=before)
        moms = request.get("base_momentums")
        if moms is not None and len(moms) != n:
            raise InvalidInput.at(
                "base_momentums", f"expected {n} values (one per param group), got {len(moms)}"
            )
        return cls(
            schedule,
            base_lrs,
            tuple(float(m) for m in moms) if moms is not None else None,
            int(request.get("world_size") or 1),
        )

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> RunSpec:
        """The spec as stored with the run (``to_json``): its types checked again, not its rules."""
        base_lrs = tuple(stored["base_lrs"])
        moms = stored.get("base_momentums")
        return cls(
            parse_schedule(stored["schedule"], n_groups=len(base_lrs), validated=True),
            base_lrs,
            tuple(moms) if moms is not None else None,
            stored.get("world_size", 1),
        )

    def to_json(self) -> dict[str, Any]:
        """The stored form (the run's ``spec`` column and ``created`` event)."""
        return {
            "schedule": spec_to_json(self.schedule),
            "base_lrs": list(self.base_lrs),
            "base_momentums": list(self.base_momentums) if self.base_momentums is not None else None,
            "world_size": self.world_size,
        }

    def new_engine(self) -> Engine:
        """The run's engine at step 0."""
        return Engine(self.schedule, self.base_lrs, self.base_momentums)
