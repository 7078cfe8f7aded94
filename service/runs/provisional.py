"""The provisional tail (API.md, "Outages: the provisional tail").

With a window a client may ask for the values of the steps right after it, computed as
if no further input (metric decision, operator action) arrived: the engine's state at
the horizon, copied, advanced with the inputs already placed and nothing else. They are
not committed. A client rides them only while it reaches no server, and names the first
step it took on them (``provisional_from``) in its first request after that; the steps
it took were committed by that request's window, and if an input was placed on them
since the tail was computed, the job took values that are not the final ones: a
``provisional_divergence`` event records it (once per rank and first step), and the
answer carries the final values the job continues on.

A tail's ``id`` is the run's last event ``seq`` when it was computed: values depend
only on the run's events, so a tail stays valid until the next event; the client asks
for a new one when the id it is told differs from the one it holds.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

from lrserve.service.engine.engine import Engine, Values
from lrserve.service.errors import InvalidInput, ScheduleError
from lrserve.service.runs.manager import RunManager
from lrserve.service.runs.state import Inputs, RunState
from lrserve.service.store.events import Event, EventKind, NewEvent


@dataclass(frozen=True)
class Tail:
    """Provisional values of steps ``start ..`` (uncommitted), valid while the run's last event is ``id``."""

    id: int
    start: int
    values: list[Values]


@dataclass(eq=False)
class _Shadow:
    """A run's tail as last computed: ``values`` from ``start``, and the shadow state after them."""

    owner: RunState
    id: int
    start: int
    values: list[Values]
    run: RunState | None  # None: the schedule cannot go on (torch raised)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def end(self) -> int:
        return self.start + len(self.values)


#: Tails of the runs clients asked lately, per manager (a tail is extended, not recomputed,
#: while the run has no new event: the work per step is one engine step, once).
_SHADOWS: weakref.WeakKeyDictionary[RunManager, OrderedDict[str, _Shadow]] = weakref.WeakKeyDictionary()
_SHADOWS_LOCK = threading.Lock()
_MOST_SHADOWS = 1024


def tail(manager: RunManager, run_id: str, after: int, n: int, held: tuple[int, int] | None = None) -> Tail:
    """The ``n`` provisional values after step ``after``, capped by ``LRSERVE_MAX_PROVISIONAL``
    and by the steps one request may compute (the work budget).

    Steps up to the horizon are final and served as such; the rest come from a copy of the
    engine. A schedule that cannot go on (torch would raise) ends the tail early.
    ``held``: ``(id, last step)`` of the tail the client holds; if it is still valid, the
    answer continues it (starts after its last step) instead of repeating it.
    """
    state = manager.state(run_id)
    n = max(0, min(n, manager.settings.max_provisional, manager.budget_steps(state)))
    shadow = _shadow(manager, state, after)
    if held is not None and held[0] == shadow.id:
        after = max(after, held[1])
    with shadow.lock:
        first = after + 1
        if first < shadow.start:
            return Tail(shadow.id, first, [])
        missing = first + n - shadow.end
        run = shadow.run
        if missing > 0 and run is not None:
            try:
                run.advance_to(run.engine.step + missing)
            except ScheduleError:
                shadow.run = None  # the steps before the one torch refuses are in the tail
            shadow.values.extend(run.take_computed())
        values = shadow.values[first - shadow.start : first - shadow.start + n]
        keep_from = first - shadow.start - manager.settings.max_provisional
        if keep_from > 0:  # the job moved on: forget steps far behind it
            del shadow.values[:keep_from]
            shadow.start += keep_from
    return Tail(shadow.id, first, values)


def _shadow(manager: RunManager, state: RunState, after: int) -> _Shadow:
    """The run's cached tail if it is valid and starts at or before ``after + 1``, else a new one."""
    with _SHADOWS_LOCK:
        shadows = _SHADOWS.setdefault(manager, OrderedDict())
        shadow = shadows.get(state.run_id)
        if shadow is not None:
            shadows.move_to_end(state.run_id)
    with state.lock:
        tail_id, horizon = state.last_seq, state.horizon
        if (shadow is not None and shadow.owner is state and shadow.id == tail_id
                and shadow.start <= after + 1 <= shadow.end):
            return shadow
        first = max(after + 1, state.first_step)
        final = state.values[first - state.first_step : horizon + 1 - state.first_step]
        snapshot = state.engine.snapshot() if state.engine.step == horizon else None
        schedule = state.engine.schedule  # the snapshot's: its expressions are not compiled again
        inputs, prices = _copy_inputs(state.inputs), state.prices
    run = None
    if snapshot is not None:
        run = RunState(state.run_id, state.spec, Engine.restore(snapshot, schedule), last_seq=tail_id)
        run.inputs, run.prices = inputs, prices
    shadow = _Shadow(state, tail_id, first, list(final), run)
    with _SHADOWS_LOCK:
        shadows[state.run_id] = shadow
        while len(shadows) > _MOST_SHADOWS:
            shadows.popitem(last=False)
    return shadow


def settle(
    manager: RunManager, run_id: str, rank: int, start: int, until: int, tail_id: int | None
) -> Event | None:
    """The job took steps ``start .. until`` on a tail (id ``tail_id``); they are committed now.

    Records a ``provisional_divergence`` event (once per rank and tail: a job still riding
    it when the answer came names the steps after in its next request) when an input
    newer than the tail was placed at or before ``until`` (without ``tail_id``: an input
    on those steps), and returns it; ``None`` when the job's values were the final ones.

    Raises:
        InvalidInput: ``start`` is negative or above ``until``.
    """
    if start < 0 or start > until:
        raise InvalidInput.at(
            "provisional_from", f"must be between 0 and the step asked ({until}), got {start}"
        )
    if manager.state(run_id).horizon < until:
        manager.committer.commit(run_id, until, if_behind=True)
    # An input newer than the tail, placed at or before a step the job took on it (any step
    # below ``start`` too: it changed what followed); without the tail's id, one on those steps.
    # Found by the database (distinct steps, the first MOST_INPUT_STEPS of them): a settle
    # never reads the run's log, however many ranks reported since the tail.
    placed = manager.store.steps_of(
        run_id, _INPUTS, after_seq=tail_id or 0, first_step=0 if tail_id is not None else start,
        last_step=until, limit=MOST_INPUT_STEPS)
    if not placed:
        return None
    told = _recorded(manager, run_id, rank, start, tail_id)
    if told is not None:
        return told  # recorded already (the answer before was lost): once
    payload = {
        "rank": rank, "from_step": start, "to_step": until, "input_steps": placed, "provisional_id": tail_id,
    }
    manager.committer.commit(run_id, manager.state(run_id).horizon, extra_events=[
        NewEvent(EventKind.PROVISIONAL_DIVERGENCE, start, payload)])
    return _recorded(manager, run_id, rank, start, tail_id)


MOST_INPUT_STEPS = 1_000
"""The most steps a ``provisional_divergence`` names in ``input_steps`` (the first ones)."""
_INPUTS = [kind for kind in EventKind if kind.is_step_input]


def _recorded(manager: RunManager, run_id: str, rank: int, start: int, tail_id: int | None) -> Event | None:
    """The divergence recorded for this rank's ride on tail ``tail_id`` (recorded after it:
    at any step), or without the id, for its ride from ``start`` (recorded at ``start``)."""
    found = manager.store.read_events_of(
        run_id, [EventKind.PROVISIONAL_DIVERGENCE], after_seq=tail_id or 0,
        step=None if tail_id is not None else start)
    for e in found:
        if e.payload.get("rank") != rank:
            continue
        if e.payload.get("provisional_id") == tail_id if tail_id is not None else e.step == start:
            return e
    return None


def _copy_inputs(inputs: Inputs) -> Inputs:
    copy = Inputs()
    copy.metrics = defaultdict(dict, {k: dict(v) for k, v in inputs.metrics.items()})
    copy.actions = defaultdict(list, {k: list(v) for k, v in inputs.actions.items()})  # Control: frozen
    copy.reports = defaultdict(list, {k: list(v) for k, v in inputs.reports.items()})  # spike-guard reports
    copy.stops = set(inputs.stops)
    return copy
