"""The commit protocol: how a run's horizon moves, durably, in every process alike.

API.md's rules, as this module keeps them:

- *Finality*: values at or below a run's horizon are served from memory and never
  recomputed differently; advancing the horizon happens under the run's lock and the
  store's lock, and is durable before any thread sees it (``RunState.publish``).
- *Decisions on the first free step*: a metric or action is placed above the horizon
  read under the store's lock, so every process places it at the same step.

On SQLite a commit computes the new steps (torch's work) before taking the store's write
lock (the file's, which every run's commit needs), and holds that lock only to append and
commit, in one transaction with the other runs' commits queued meanwhile (``group_commit``);
if another process moved the run meanwhile, it starts again. Only where the stored run had
already moved when the commit began (rare: replicas) does it catch up and compute inside the
lock. On PostgreSQL the lock is the run's row alone: a commit takes it first, catches up with
what other processes appended and computes inside it (one read of the run, under the lock).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from lrserve.service.engine import codec
from lrserve.service.engine.actions import Action
from lrserve.service.engine.engine import ScheduleSwitch
from lrserve.service.engine.spike_guard import Spike
from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import InvalidInput, RunConflict
from lrserve.service.offload import BigWork
from lrserve.service.runs.cache import RunCache, still_the_run
from lrserve.service.runs.group_commit import GroupCommit
from lrserve.service.runs.replay import apply_control, apply_logs
from lrserve.service.runs.state import RunState, StepOutcome
from lrserve.service.settings import Settings
from lrserve.service.store.base import (
    BarrierTally,
    BaseStore,
    LockedRun,
    MetricRecord,
    RunHead,
    RunRecord,
    RunTransaction,
    Snapshot,
    ValueChunk,
    WouldWait,
    held,
    pack_lrs,
)
from lrserve.service.store.events import Event, EventKind, NewEvent

LOCAL_ACTOR = "local"
"""The actor of a call made in this process without a token (tests, a server without tokens)."""


@dataclass(frozen=True)
class PlacedAction:
    """An operator action to place: at ``at_step`` (None: the first free step), by ``actor``."""

    at_step: int | None
    action: Action
    actor: str = LOCAL_ACTOR
    reason: str | None = None

    @functools.cached_property
    def payload(self) -> dict[str, Any]:
        """The action's stored form (``Action.payload``), made once: its ``control`` event's and
        the answer's (read only, both)."""
        return self.action.payload()


ON_LOOP_WORK = 1000
"""Most work (``engine.cost`` units, about a µs each) a commit on the event loop may compute
(``RunManager.now``); more is done in a worker thread."""

Reports = Sequence[dict[str, Any]]
"""Spike-guard reports (``step``, ``rank``, ``name``, ``value``): each placed at its ``step``
or the first free step, whichever is later."""

_T = TypeVar("_T")
Metric = tuple[int, dict[str, float]]
"""A decision's metric values, placed at a step (or nowhere, when that step is final)."""


@dataclass(frozen=True)
class BarrierDecision:
    """A metric barrier's decision: its ``metric`` (the step, the ranks' means), the events that
    go with it (``barrier_timeout``), and the end of the window committed with it."""

    target: int
    metric: Metric
    extra_events: Sequence[NewEvent] = ()


class Committer:
    """Moves runs' horizons: places decisions, computes the steps, writes them, publishes them.

    Args:
        store: Where the log lives.
        settings: The snapshot cadence.
        runs: The loaded runs (a failed commit drops its run's state there).
        big_work: Where big runs of steps are taken (``RunState.advance_to``); None: here.
    """

    def __init__(
        self, store: BaseStore, settings: Settings, runs: RunCache, big_work: BigWork | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.runs = runs
        self.big_work = big_work
        self.group = GroupCommit(store)
        self.on_outcome: list[Callable[[str, StepOutcome], Any]] = []  # for telemetry

    def commit(
        self,
        run_id: str,
        target: int,
        *,
        metric: Metric | None = None,
        action: PlacedAction | None = None,
        extra_events: Sequence[NewEvent] = (),
        records: Sequence[MetricRecord] = (),
        reports: Reports = (),
        if_behind: bool = False,
        need: int | None = None,
        of_run: datetime | None = None,
    ) -> int | None:
        """Advance the run to ``target`` (at least), placing a new decision on the way.

        ``records`` (metric history) and spike-guard ``reports`` are written in the same
        transaction. ``if_behind``
        skips the store when this process holds ``target`` already (another request took
        the run there while this one waited for its lock: ranks asking the same window).
        ``need``: the last step that must be reached; the steps of a window after a step the
        schedule cannot take are left out (``RunState.advance_to``). ``of_run``: the
        ``created_at`` of the run the caller checked its inputs against (an action, against the
        run's param groups and horizon).

        Returns:
            The step an ``action`` was placed at, if one was given.

        Raises:
            RunReplacedMeanwhile: the run is not the one of ``of_run`` (deleted and created anew
                by another process): nothing was written; check the inputs again.
        """
        def locked(state: RunState) -> int | None:
            if if_behind and state.horizon >= target:
                return None
            return self._commit_locked(state, target, metric, action, extra_events, records, need, reports)

        return self._with_run(run_id, locked, of_run)

    def report_to_barrier(
        self,
        run_id: str,
        step: int,
        reports: Mapping[int, Mapping[str, float]],
        records: Sequence[MetricRecord],
        decide: Callable[[RunState, BarrierTally], BarrierDecision | None],
    ) -> bool:
        """Ranks' reports for the barrier at ``step`` and, when they complete it, its decision, in
        one transaction under the run's lock (PostgreSQL: its row). The tally is read there, so
        it holds every report committed before: the reports that complete the barrier know it,
        and it is decided once, in their transaction (``decide``: the decision the tally calls
        for, with ``state`` caught up to the stored horizon; None: not yet, or final already).
        ``records``: the reports' metric history, written with them.

        Returns:
            True once ``step`` is final.
        """
        def locked(state: RunState) -> bool:
            with self._evicting_on_error(state):
                outcomes: list[StepOutcome] = []
                with self.store.lock_run(run_id) as tx:
                    self._catch_up(state, tx)
                    decision = decide(state, tx.add_barrier_reports(step, reports))
                    new_events: list[NewEvent] = []
                    if decision is not None:
                        outcomes, _, new_events = _compute(
                            state, tx.run.horizon, decision.target, decision.metric, None,
                            decision.extra_events, step, (), self.big_work)
                    _append(state, tx, outcomes, new_events, records)
                self._committed(state, outcomes)
            return state.horizon >= step

        return self._with_run(run_id, locked)

    def _with_run(self, run_id: str, locked: Callable[[RunState], _T], of_run: datetime | None = None) -> _T:
        """``locked(state)`` holding the run's lock, on its loaded state; again, on the state
        loaded anew, when a commit failed while this one waited (``evicted``) or the run turned
        out replaced on the way (``_RunReplaced``), unless it must be the run of ``of_run``
        (``commit``)."""
        while True:
            state = self.runs.state(run_id)
            if of_run is not None and state.created_at != of_run:
                raise RunReplacedMeanwhile(run_id)
            with held(state.lock, now=self.store.must_not_wait, what="the run"):
                if state.evicted:  # a commit failed while we waited: take the reloaded state
                    continue
                try:
                    return locked(state)
                except _RunReplaced:  # evicted on the way out; the next turn loads the new run
                    continue

    def caught_up(self, run_id: str, record: RunRecord | None = None) -> RunState:
        """The run's state as of the stored horizon (other processes may have gone further);
        ``record``: the run's row if the caller has just read it.

        Inputs at or below a stored horizon are final once it is (each commit places its
        inputs above the horizon it holds), so the events read now, newer ones included,
        take the state to ``record.horizon`` exactly as the lock would, if they are this
        run's: the run's head, read after them, must still be the run ``state`` holds (not
        deleted and created anew between the row's read and the events')."""
        if record is None:
            record = self.store.read_run(run_id)
        state = self.runs.state(run_id)
        if not behind(record, state):
            return state
        if record.created_at == state.created_at and not self.store.must_not_wait:
            # Steps another process made, final and durable: their events are read and the steps
            # taken here, without the run's row lock (a write transaction the other process waits on).
            with state.lock, self._evicting_on_error(state):
                if not state.evicted and state.horizon < record.horizon:
                    events = self.store.read_events(run_id, state.last_seq)
                    if not still_the_run(self.store, run_id, state.created_at):
                        self.runs.evict(state)  # replaced meanwhile: the commit below loads the new run
                    else:
                        apply_logs(state, events)
                        state.advance_to(record.horizon, big_work=self.big_work)
                        state.publish()
            if not state.evicted:
                return state
        self.commit(run_id, record.horizon)  # on the loop (WouldWait), or deleted and created anew
        return self.runs.state(run_id)

    def _commit_locked(
        self,
        state: RunState,
        target: int,
        metric: Metric | None,
        action: PlacedAction | None,
        extra_events: Sequence[NewEvent],
        records: Sequence[MetricRecord] = (),
        need: int | None = None,
        reports: Reports = (),
    ) -> int | None:
        run_id = state.run_id
        with self._evicting_on_error(state):
            if self.store.must_not_wait:  # on the event loop: at once and small, or not at all
                self._check_small(state, target)
                with self.store.lock_run(run_id) as tx:  # WouldWait: the write slot is taken
                    if _moved(tx.run, state):
                        raise WouldWait("another process moved the run")  # a worker thread catches up
                    outcomes, placed, new_events = _compute(  # small: never the worker process
                        state, state.horizon, target, metric, action, extra_events, need, reports, None)
                    _append(state, tx, outcomes, new_events, records)
            elif not self.store.one_writer or _moved(self.store.run_head(run_id), state):
                # PostgreSQL: the lock is the run's row alone, so computing in it holds back no
                # other run, and a read before it would cost a round trip of its own every commit.
                # SQLite: only where another process moved the run (rare: replicas)
                with self.store.lock_run(run_id) as tx:  # catch up and compute in the lock
                    self._catch_up(state, tx)
                    outcomes, placed, new_events = _compute(
                        state, tx.run.horizon, target, metric, action, extra_events, need, reports,
                        self.big_work)
                    _append(state, tx, outcomes, new_events, records)
            else:
                # The torch work happens here, before the write slot: the store's lock (on SQLite
                # the file's, which every run's commit needs) is held only to append and commit.
                outcomes, placed, new_events = _compute(
                    state, state.horizon, target, metric, action, extra_events, need, reports,
                    self.big_work)

                def append(tx: RunTransaction) -> None:
                    if _moved(tx.run, state):  # another process committed meanwhile: start again
                        raise _RunReplaced(run_id)
                    _append(state, tx, outcomes, new_events, records)

                self.group.write(run_id, append)  # with other runs' commits queued meanwhile
            self._committed(state, outcomes)
        return placed

    def _committed(self, state: RunState, outcomes: list[StepOutcome]) -> None:
        """After the commit of ``outcomes``: publish them, note a failing schedule, tell the
        callbacks, save a snapshot if one is due."""
        run_id = state.run_id
        state.publish()  # durable now: other threads may see the new steps
        fails_at = self.runs.fails_at
        if state.broken:  # its engine failed past the published steps: the next request reloads
            fails_at[run_id] = state.engine.step + 1
            self.runs.evict(state)
        elif fails_at.get(run_id, math.inf) <= state.horizon:  # an action moved it past
            fails_at.pop(run_id, None)
        for outcome in outcomes:
            for callback in self.on_outcome:
                callback(run_id, outcome)
        if not state.broken:
            self._maybe_snapshot(state, outcomes)

    def advance_now(self, asks: Sequence[tuple[str, int, int]]) -> list[BaseException | None]:
        """Move each run of ``asks`` (``run_id``, ``target``, ``need``: as ``commit``'s, with
        ``if_behind``) to its target here and now, all in one transaction: the event loop's
        group commit (``RunManager.windows_now``, ``windows_grouped``), for windows asked in one
        turn of the loop.

        On the event loop only inside ``store.without_waiting()`` (SQLite); on PostgreSQL in a
        commit thread (``RunManager.windows_grouped``). It never waits for a run: one that
        another thread of this process holds, or whose row another transaction holds (another
        process's commit, which may compute a big window in it), is left to its own commit.

        Each ask's outcome, in order: None when its run holds ``target`` now, durably;
        ``WouldWait`` when it would wait or has too much work (a run not loaded or held by
        another thread or transaction, a snapshot due, another process deleted the run and
        created it anew or moved it too far, the write slot taken) —
        nothing of it changed; any other error of its own (its schedule failed: its run is
        dropped, as ``commit`` drops it). One run at most once in ``asks``. A failure of the
        transaction fails every ask that wrote in it: none of them is acknowledged, their runs
        are dropped and reload.
        """
        outcomes: list[BaseException | None] = [None] * len(asks)
        members: list[tuple[int, RunState, int, int]] = []
        with ExitStack() as held:
            for i, (run_id, target, need) in enumerate(asks):
                state = self.runs.loaded(run_id)
                if state is None or not state.lock.acquire(blocking=False):
                    outcomes[i] = WouldWait("the run is not loaded, or another thread holds it")
                    continue
                held.callback(state.lock.release)
                if state.evicted:
                    outcomes[i] = WouldWait("the run was dropped: a worker thread reloads it")
                elif state.horizon < target:
                    try:
                        self._check_small(state, target)
                    except WouldWait as exc:
                        outcomes[i] = exc
                    else:
                        members.append((i, state, target, need))
            if not members:
                return outcomes
            written: dict[int, tuple[RunState, list[StepOutcome]]] = {}
            try:
                run_ids = [state.run_id for _, state, _, _ in members]
                with self.store.lock_runs(run_ids, skip_locked=True) as locked:
                    for i, state, target, need in members:
                        tx = locked.get(state.run_id)
                        moved = tx is not None and _moved(tx.run, state)
                        if tx is None or (moved and not self._catches_up(state, tx, target)):
                            outcomes[i] = WouldWait("another process moved the run")  # a worker thread sees
                            continue
                        try:
                            if moved:
                                self._catch_up(state, tx)  # the other process's: final, durable
                                if state.horizon >= target:
                                    continue
                                try:  # its events may have changed the schedule: its cost anew
                                    self._check_small(state, target)
                                except WouldWait as exc:
                                    outcomes[i] = exc  # nothing of it written: its own commit
                                    continue
                            steps, _, new_events = _compute(
                                state, state.horizon, target, None, None, (), need, (), None)
                        except Exception as exc:  # noqa: BLE001 - nothing of it written: its own outcome
                            self.runs.evict(state)
                            outcomes[i] = exc
                            continue
                        written[i] = (state, steps)
                        outcomes[i] = _Pending()  # an error from here on is everyone's
                        _append(state, tx, steps, new_events, ())
            except BaseException as exc:  # nothing of the group committed
                for state, _ in written.values():  # computed ahead of the store: reload
                    self.runs.evict(state)
                for i, _, _, _ in members:
                    if outcomes[i] is None or isinstance(outcomes[i], _Pending):
                        outcomes[i] = exc
                if not isinstance(exc, Exception):
                    raise
                return outcomes
            for i, (state, steps) in written.items():  # durable: each run's steps go public
                outcomes[i] = None
                try:
                    self._committed(state, steps)
                except Exception as exc:  # noqa: BLE001 - committed all the same: a retry finds them final
                    self.runs.evict(state)
                    outcomes[i] = exc
            return outcomes

    def _catches_up(self, state: RunState, tx: RunTransaction, target: int) -> bool:
        """Whether ``advance_now`` takes in, in its group, what another process appended to this
        run: in a commit thread (never on the event loop), the same run (not deleted and created
        anew), and the steps to catch up and to compute small work together (``_check_small``)."""
        stored = tx.run
        if self.store.must_not_wait or stored.created_at != state.created_at:
            return False
        if stored.horizon < state.horizon:
            return False
        try:
            self._check_small(state, max(target, stored.horizon))
        except WouldWait:
            return False
        return True

    def _catch_up(self, state: RunState, tx: RunTransaction) -> None:
        """Take in what other processes appended since this one last looked.

        Raises:
            _RunReplaced: the run was deleted and created anew (same id) by another
                process since this one loaded it; this state belongs to the old run.
        """
        if tx.run.created_at != state.created_at or tx.run.horizon < state.horizon:
            raise _RunReplaced(state.run_id)
        if tx.run.last_seq > state.last_seq:
            apply_logs(state, tx.read_events(state.last_seq))
            state.last_seq = tx.run.last_seq
        state.advance_to(tx.run.horizon)
        state.publish()  # committed by another process: durable already

    def _check_small(self, state: RunState, target: int) -> None:
        """``WouldWait`` unless the commit's work is small and it saves no snapshot (the snapshot,
        a second transaction after the commit, could not be refused any more)."""
        steps = max(target, state.horizon) - state.horizon
        if not steps:  # an action or a metric placed, no step computed (``POST .../control``)
            return
        every = self.settings.snapshot_every
        if (state.horizon + steps) // every > state.horizon // every:
            raise WouldWait("a snapshot is due")
        if state.prices.work(state.horizon, state.horizon + steps) > ON_LOOP_WORK:
            raise WouldWait("too much work for the event loop")

    def _evicting_on_error(self, state: RunState) -> _Evicting:
        """An error mid-commit leaves the engine ahead of the store: drop it, reload later.
        ``WouldWait`` comes before anything changed: the state stays."""
        return _Evicting(self.runs, state)

    def _maybe_snapshot(self, state: RunState, outcomes: list[StepOutcome]) -> None:
        every = self.settings.snapshot_every
        if outcomes and state.horizon // every > (state.horizon - len(outcomes)) // every:
            payload = {
                "engine": state.engine.snapshot(),
                "status": state.status.value,
                "stopped_at": state.stopped_at,
                "switched_at": state.switched_at,
            }
            first = state.checkpointed_to + 1  # the LRs since the last snapshot go with it (history)
            lrs = state.values.packed_lrs(first - state.first_step, state.horizon + 1 - state.first_step)
            chunk = ValueChunk(first, state.horizon + 1 - first, state.n_groups, pack_lrs(lrs))
            jsonable = codec.to_jsonable(payload)
            snapshot = Snapshot(state.horizon, state.last_seq, jsonable, codec.encoded(jsonable))
            self.store.save_snapshot(state.run_id, snapshot, chunk, created_at=state.created_at)
            state.checkpointed_to = state.horizon


def _compute(
    state: RunState,
    horizon: int,
    target: int,
    metric: Metric | None,
    action: PlacedAction | None,
    extra_events: Sequence[NewEvent],
    need: int | None,
    reports: Reports,
    big_work: BigWork | None,
) -> tuple[list[StepOutcome], int | None, list[NewEvent]]:
    """Place the decision above the stored ``horizon`` and compute the steps up to ``target``:
    what the steps did, the step the action went to, and the events to append."""
    new_events, placed = _place(state, horizon, metric, action, reports)
    if metric is None or new_events:  # extra events go with a decision that was taken
        new_events.extend(extra_events)
    outcomes = state.advance_to(max(target, horizon), need=need, big_work=big_work)
    new_events.extend(_output_events(outcomes, horizon, state))
    return outcomes, placed, new_events


def _append(
    state: RunState,
    tx: RunTransaction,
    outcomes: list[StepOutcome],
    new_events: list[NewEvent],
    records: Sequence[MetricRecord],
) -> None:
    """Write what a commit computed: metrics, events, the new horizon."""
    if records:
        tx.append_metrics(records)
    if new_events:
        tx.add_events(new_events)
    if outcomes:  # a commit that only caught up writes nothing
        tx.update_run(horizon=state.engine.step, status=state.marks.status)
    state.last_seq = tx.run.last_seq  # the last event's, once appended


def _place(
    state: RunState,
    horizon: int,
    metric: Metric | None,
    action: PlacedAction | None,
    reports: Reports = (),
) -> tuple[list[NewEvent], int | None]:
    """The decision's events, placed on the first free step above the stored ``horizon``."""
    events: list[NewEvent] = []
    placed = None
    first_free = horizon + 1
    if metric is not None and metric[0] >= first_free and metric[1]:
        events.append(NewEvent(EventKind.METRIC, metric[0], {"values": metric[1]}))
    if reports:
        events.extend(_report_events(reports, first_free, events))
    if action is not None:
        if state.status is RunStatus.STOPPED:  # as of the stored horizon, whoever stopped it
            raise RunConflict(f"run {state.run_id!r} is stopped; it takes no more actions")
        at_step = action.at_step
        if at_step is not None and at_step < first_free:
            raise InvalidInput.at(
                "at_step", f"must be above the horizon ({horizon}), got {at_step}"
            )
        placed = at_step if at_step is not None else first_free
        refuse_after_a_stop(state, placed)
    if events:
        apply_logs(state, [_as_event(event) for event in events])
    if action is not None:  # as apply_logs takes its event, with the action as parsed, not parsed back
        assert placed is not None
        apply_control(state, placed, action.action, action.actor, action.reason)
        events.append(NewEvent(EventKind.CONTROL, placed, action.payload, action.actor, action.reason))
    return events, placed


def refuse_after_a_stop(state: RunState, step: int) -> None:
    """Raises RunConflict where a stop is placed at or before ``step``: the run is stopped by then
    (an action after it would change the LRs of a stopped run, a ``resume`` would be recorded as
    its status although it stays stopped)."""
    stops_at = state.stops_at()
    if stops_at is not None and step >= stops_at:
        raise RunConflict(f"run {state.run_id!r} stops after step {stops_at}; it takes no actions "
                          f"placed at or after that step (this one: {step})")


def behind(stored: RunRecord, state: RunState) -> bool:
    """Whether the loaded ``state`` is behind the stored run: another process went further, or
    deleted it and created it anew (then ``caught_up``)."""
    return stored.horizon > state.horizon or stored.created_at != state.created_at


def _moved(stored: RunHead | LockedRun, state: RunState) -> bool:
    """Whether the stored run is not the one ``state`` holds as of its horizon (another process
    appended, or deleted and created it anew)."""
    return (
        stored.created_at != state.created_at
        or stored.horizon != state.horizon
        or stored.last_seq != state.last_seq
    )


class _Evicting:
    """``Committer._evicting_on_error``'s block (a class, not a generator ``contextmanager``:
    it wraps every commit)."""

    __slots__ = ("_runs", "_state")

    def __init__(self, runs: RunCache, state: RunState) -> None:
        self._runs, self._state = runs, state

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: object) -> None:
        if exc is not None and not isinstance(exc, WouldWait):
            self._runs.evict(self._state)


class _Pending(Exception):
    """An ask of ``advance_now`` written in the group's transaction, not yet committed."""


class _RunReplaced(Exception):
    """A loaded run turned out to be deleted and created anew by another process."""


class RunReplacedMeanwhile(Exception):
    """``Committer.commit(of_run=)``: the run was deleted and created anew (same id) by another
    process after the caller checked its inputs against it; nothing was written."""


def guard_reports(state: RunState, records: Sequence[MetricRecord]) -> list[dict[str, Any]]:
    """The records a spike guard of the run judges, as METRIC event ``reports`` items."""
    if not state.guard_monitors:
        return []
    return [
        {"step": r.step, "rank": r.rank, "name": r.name, "value": r.value}
        for r in records
        if r.name in state.guard_monitors
    ]


def metric_records(metrics: Mapping[str, float], step: int, rank: int) -> list[MetricRecord]:
    """One rank's metrics of one step, as history rows."""
    return [MetricRecord(name, step, rank, float(value)) for name, value in metrics.items()]


def _report_events(reports: Reports, first_free: int, events: list[NewEvent]) -> list[NewEvent]:
    """METRIC events placing each report at its step or ``first_free``; joins a plateau
    metric event of the same step (in ``events``) instead of adding another."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for report in reports:
        groups.setdefault(max(report["step"], first_free), []).append(report)
    added = []
    for at, group in sorted(groups.items()):
        same = next((e for e in events if e.kind is EventKind.METRIC and e.step == at), None)
        if same is not None:
            same.payload["reports"] = group
        else:
            added.append(NewEvent(EventKind.METRIC, at, {"values": {}, "reports": group}))
    return added


def _as_event(new: NewEvent) -> Event:
    return Event(0, new.kind, new.step, new.payload, datetime.now(timezone.utc), new.actor, new.reason)


def _output_events(outcomes: list[StepOutcome], old_horizon: int, state: RunState) -> list[NewEvent]:
    """Events that document what newly final steps did (never replayed)."""
    events = []
    for outcome in outcomes:
        if outcome.step <= old_horizon:
            continue
        for r in outcome.reductions:
            if isinstance(r, ScheduleSwitch):
                events.append(NewEvent(EventKind.SCHEDULE_SWITCH, outcome.step, {
                    "chosen": r.chosen, "lrs": list(r.lrs), "schedule": r.then}))
                continue
            if isinstance(r, Spike):
                events.extend(_spike_events(r, outcome.step))
                continue
            events.append(NewEvent(EventKind.PLATEAU_REDUCTION, outcome.step, {
                "stage": r.stage, "monitor": r.monitor, "value": r.value,
                "lrs_before": list(r.before), "lrs_after": list(r.after)}))
        for control in outcome.statuses:  # the action's doing: its actor and reason
            status = control.action.sets_status
            assert status is not None
            events.append(NewEvent(EventKind.STATUS, outcome.step, {"status": status.value},
                                   control.actor, control.reason))
    return events


def _spike_events(spike: Spike, step: int) -> list[NewEvent]:
    """A ``loss_spike`` event; and the run's stop, when it is one spike too many."""
    events = [NewEvent(EventKind.LOSS_SPIKE, step, spike.payload())]
    if spike.stop:
        reason = (
            f"spike guard: {spike.count} loss spikes, more than max_spikes allows "
            f"(the last on rank {spike.rank} at step {spike.step})"
        )
        events.append(NewEvent(EventKind.STATUS, step, {"status": RunStatus.STOPPED.value}, reason=reason))
    return events
