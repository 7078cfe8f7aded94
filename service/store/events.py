"""Event kinds and records of a run's append-only log.

Values never stored per step: they are a pure function of these events (see DESIGN.md).
Kinds are stable strings; never rename or reuse one, the log on disk depends on them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class EventKind(str, enum.Enum):
    """What an event records. Inputs feed the replay; outputs only document what it did."""

    CREATED = "created"  # input: the run's spec
    METRIC = "metric"  # input: a watched metric fed to a decision at ``step``
    CONTROL = "control"  # input: an operator action applied right after ``step``
    STATUS = "status"  # output: the run's status changed
    PLATEAU_REDUCTION = "plateau_reduction"  # output: a plateau stage lowered the LRs
    BARRIER_TIMEOUT = "barrier_timeout"  # output: not every rank reported in time
    SCHEDULE_SWITCH = "schedule_switch"  # output: the schedule changed (range test ended)
    PROVISIONAL_DIVERGENCE = "provisional_divergence"  # output: an input changed steps a job rode
    LOSS_SPIKE = "loss_spike"  # output: a spike guard found a spike and backed the LRs off

    @property
    def is_step_input(self) -> bool:
        """Placed at a step and applied when the engine reaches it (replay queues these)."""
        return self in (EventKind.METRIC, EventKind.CONTROL)


SERVER = "server"
"""The actor of what the server decides by itself (plateau reductions, barrier timeouts, ...)."""


@dataclass(frozen=True)
class NewEvent:
    """An event about to be appended; the store gives it ``seq`` and ``at``.

    ``actor`` is who caused it: a token's name, ``local`` (a server without tokens), or
    ``server``. ``reason`` is the words an operator gave with an action (None otherwise).
    """

    kind: EventKind
    step: int | None
    payload: dict[str, Any] = field(default_factory=dict)
    actor: str = SERVER
    reason: str | None = None


@dataclass(frozen=True)
class Event:
    """An event as stored: ``seq`` counts from 1 per run, without gaps."""

    seq: int
    kind: EventKind
    step: int | None
    payload: dict[str, Any]
    at: datetime
    actor: str = SERVER
    reason: str | None = None
    gid: int | None = None
    """The global event id (increasing across runs, in commit order); None before storing."""


@dataclass(frozen=True)
class FeedEntry:
    """An event of the global feed (``BaseStore.read_feed``), with its run and the run's labels."""

    run_id: str
    labels: dict[str, str]
    event: Event
