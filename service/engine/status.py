"""A run's status: one enum from the store's column to the API's field."""

from __future__ import annotations

import enum


# Stored, and answered, as its value. Which action sets which status: engine/actions.py;
# ``stale`` is no status but derived at read time (service/liveness.py).
class RunStatus(str, enum.Enum):
    """A run's status as of its horizon: `active` (the schedule runs), `held` (the clock is
    frozen: values stay, no decisions) or `stopped` (for good)."""

    ACTIVE = "active"  # the schedule runs
    HELD = "held"  # the clock is frozen: values stay, no decisions
    STOPPED = "stopped"  # for good: no more actions

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)
