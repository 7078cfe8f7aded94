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

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from service.engine.engine import Engine, Values
from service.errors import InvalidInput, ScheduleError
from service.runs.manager import RunManager
from service.runs.state import Inputs, RunState
from service.store.events import Event, EventKind, NewEvent


@dataclass(frozen=True)
class Tail:
    """Provisional values of steps ``start ..`` (uncommitted), valid while the run's last event is ``id``."""

    id: int
    start: int
    values: list[Values]

    def public(self, n_groups: int) -> dict[str, Any]:
        moms = None
        if self.values and self.values[0][1] is not None:
            moms = [list(v[1]) for v in self.values]
        lrs = [list(v[0]) for v in self.values]
        return {"id": self.id, "start": self.start, "lrs": lrs, "momentums": moms}


def tail(manager: RunManager, run_id: str, after: int, n: int) -> Tail:
    """The ``n`` provisional values after step ``after``, capped by ``LRSERVE_MAX_PROVISIONAL``
    and by the steps one request may compute (the work budget).

    Steps up to the horizon are final and served as such; the rest come from a copy of the
    engine. A schedule that cannot go on (torch would raise) ends the tail early.
    """
    state = manager.state(run_id)
    n = max(0, min(n, manager.settings.max_provisional, manager._budget_steps(state)))
    with state.lock:
        tail_id, horizon = state.last_seq, state.horizon
        if n == 0:
            return Tail(tail_id, after + 1, [])
        first = max(after + 1, state.first_step)
        final = state.values[first - state.first_step : min(after + n, horizon) + 1 - state.first_step]
        if first != after + 1:  # old steps, replayed: no tail (a client at such a step is not at the edge)
            return Tail(tail_id, after + 1, [])
        snapshot = state.engine.snapshot() if state.engine.step == horizon else None
        inputs = _copy_inputs(state.inputs)
    values = list(final)
    missing = n - len(values)
    if missing > 0 and snapshot is not None:
        shadow = RunState(run_id, state.spec, Engine.restore(snapshot), last_seq=tail_id)
        shadow.inputs = inputs
        try:
            shadow.advance_to(horizon + missing)
        except ScheduleError:
            pass  # the steps before the one torch refuses are in the tail
        shadow.publish()
        values.extend(shadow.values[1:])
    return Tail(tail_id, after + 1, values)


def settle(
    manager: RunManager, run_id: str, rank: int, start: int, until: int, tail_id: int | None
) -> dict[str, Any] | None:
    """The job took steps ``start .. until`` on a tail (id ``tail_id``); they are committed now.

    Records a ``provisional_divergence`` event (once per rank and ``start``) when an input
    was placed on those steps after the tail was computed (any input, if ``tail_id`` is
    unknown), and returns it; ``None`` when the job's values were the final ones.

    Raises:
        InvalidInput: ``start`` is negative or above ``until``.
    """
    if start < 0 or start > until:
        raise InvalidInput.at(
            "provisional_from", f"must be between 0 and the step asked ({until}), got {start}"
        )
    if manager.state(run_id).horizon < until:
        manager.commit(run_id, until, if_behind=True)
    events = manager.store.read_events(run_id)
    placed = sorted({
        e.step for e in events
        if e.kind.is_step_input and e.step is not None and start <= e.step <= until
        and (tail_id is None or e.seq > tail_id)
    })
    if not placed:
        return None
    told = _divergence(events, rank, start)
    if told is not None:
        return told  # recorded already (the answer before was lost): once
    payload = {
        "rank": rank, "from_step": start, "to_step": until, "input_steps": placed, "provisional_id": tail_id,
    }
    manager.commit(run_id, manager.state(run_id).horizon, extra_events=[
        NewEvent(EventKind.PROVISIONAL_DIVERGENCE, start, payload)])
    newer = manager.store.read_events(run_id, after_seq=events[-1].seq if events else 0)
    return _divergence(newer, rank, start)


def _divergence(events: list[Event], rank: int, start: int) -> dict[str, Any] | None:
    for e in events:
        if e.kind is EventKind.PROVISIONAL_DIVERGENCE and e.payload.get("rank") == rank and e.step == start:
            return e.public()
    return None


def _copy_inputs(inputs: Inputs) -> Inputs:
    copy = Inputs()
    copy.metrics = defaultdict(dict, {k: dict(v) for k, v in inputs.metrics.items()})
    copy.actions = defaultdict(list, {k: list(v) for k, v in inputs.actions.items()})
    return copy
