"""``apply_logs``: the one way log entries change a loaded run's state.

Values are a pure function of a run's events (DESIGN.md), so every path that takes events
into a ``RunState`` (loading a run, catching up with another process's appends, replaying
old steps for a value read, placing a new decision) goes through here: one handler per
event kind, as optuna's storages apply their logs. Output events (status changes, plateau
reductions, ...) only document what a replay did; they change nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from lrserve.service.engine.actions import Action, parse_action
from lrserve.service.runs.state import Control, RunState
from lrserve.service.store.base import BaseStore
from lrserve.service.store.events import Event, EventKind


def apply_logs(state: RunState, events: Iterable[Event]) -> None:
    """Take ``events`` (in ``seq`` order) into ``state``.

    A step input (metric, operator action) placed above the state's horizon is queued for
    its step; one at or below it is already in the values (a snapshot's, or published).
    Every event is seen once: ``last_seq`` ends at the highest ``seq`` applied.
    """
    for event in events:
        handler = _HANDLERS.get(event.kind)
        if handler is not None:
            handler(state, event)
        state.last_seq = max(state.last_seq, event.seq)


def apply_stored_inputs(
    state: RunState, store: BaseStore, run_id: str, *, through_seq: int, through_step: int | None = None,
) -> None:
    """Take into ``state``, fresh at a snapshot's step (or at step 0), the run's stored events
    up to ``through_seq`` (its row's ``last_seq``, read before) that change it, read from
    ``store`` and only those: every event of a kind with a handler but the metrics (the
    operator actions: ``note_action`` keeps the metrics each schedule watches, whenever
    placed), and the metrics placed above its horizon (those at or below it are in its
    values) and, where given, at most ``through_step`` (a replay that stops there). So
    loading a run reads and decodes what is ahead of its snapshot, not its whole log (the
    database still scans the run's rows). ``last_seq`` is then ``through_seq``: the events
    left out up to it change nothing, and those after it, which the two reads could each see
    or not (another process committing between them), are a later catch-up's.
    """
    always = store.read_events_of(run_id, _ALWAYS_READ, through_seq=through_seq)
    ahead = store.read_events_of(run_id, [EventKind.METRIC], through_seq=through_seq,
                                 above_step=state.horizon, through_step=through_step)
    apply_logs(state, heapq.merge(always, ahead, key=lambda event: event.seq))
    state.last_seq = through_seq


def _apply_metric(state: RunState, event: Event) -> None:
    """A watched metric's values (a decision's input) and spike-guard reports, for their step."""
    step = event.step
    if step is None or step <= state.horizon:
        return
    if event.payload.get("values"):
        state.inputs.metrics[step].update(event.payload["values"])
    if event.payload.get("reports"):
        state.inputs.reports[step].extend(event.payload["reports"])


def _apply_control(state: RunState, event: Event) -> None:
    """An operator action, applied right after its step (``engine.actions``)."""
    apply_control(state, event.step, parse_action(event.payload), event.actor, event.reason)


def apply_control(state: RunState, step: int | None, action: Action, actor: str, reason: str | None) -> None:
    """A ``control`` event's action, already parsed, taken into ``state``: what ``apply_logs``
    does with that event (a commit placing a new action calls this with the action it stores,
    rather than parsing its payload back)."""
    if step is not None and step > state.horizon:
        state.place_action(step, Control(action, actor, reason))
    state.note_action(action)  # a new schedule's metrics are watched from then on, whenever placed


_HANDLERS: dict[EventKind, Callable[[RunState, Event], None]] = {
    EventKind.METRIC: _apply_metric,
    EventKind.CONTROL: _apply_control,
}

_ALWAYS_READ = [kind for kind in _HANDLERS if kind is not EventKind.METRIC]
"""The kinds ``apply_stored_inputs`` reads at every step (the metrics: only above the horizon)."""
