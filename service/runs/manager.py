"""``RunManager``: the one place that turns requests into log entries and final values.

Every answer obeys API.md's three rules:

- *Finality*: values at or below a run's horizon are served from memory and never
  recomputed differently; advancing the horizon happens under the run's lock and the
  store's lock, and is durable before the answer leaves.
- *Decisions on the first free step*: a metric or action is placed above the horizon
  read under the store's lock, so every process places it at the same step.
- *Parity*: values come from ``Engine``, i.e. from torch's own schedulers.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from service.engine import codec, cost
from service.engine.engine import Engine, ScheduleSwitch, Values
from service.engine.range_test import RangeTestReport
from service.engine.spec import cycles_momentum, guard_of, parse_schedule, spec_to_json
from service.engine.spike_guard import Band, GuardSettings, Report, Spike, replay_band
from service.errors import InvalidInput, RunConflict, RunNotFound
from service.runs.state import Marks, RunState, StepOutcome
from service.settings import Settings
from service.store.base import (
    BarrierTally,
    BaseStore,
    MetricRecord,
    RunRecord,
    RunTransaction,
    Snapshot,
    ValueChunk,
    pack_lrs,
)
from service.store.events import Event, EventKind, NewEvent

LOCAL_ACTOR = "local"
"""The actor of a call made in this process without a token (tests, a server without tokens)."""


@dataclass(frozen=True)
class Action:
    """An operator action to place: at ``at_step`` (None: the first free step), by ``actor``."""

    at_step: int | None
    payload: dict[str, Any]
    actor: str = LOCAL_ACTOR
    reason: str | None = None


ON_LOOP_VALUES = 4096
"""Most LR values an answer built and serialised on the event loop may hold; bigger answers
are built in a worker thread, so that no answer stalls the requests the loop serves."""


@dataclass(frozen=True)
class Window:
    """Final values of steps ``start .. start + len(values) - 1``."""

    run_id: str
    start: int
    values: list[Values]
    status: str
    stopped_at: int | None
    switched_at: int | None
    watched: tuple[str, ...] = ()  # the metrics the run decides on now (clients report these)
    max_ahead: int = 0  # the server's cap on ``ahead``
    spikes: list[Spike] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class LRFinder:
    """A range test as ``GET .../lr-finder`` shows it: what it found, and where the run switched."""

    test: RangeTestReport
    switched_at: int | None


@dataclass(frozen=True)
class SpikeGuardView:
    """A spike guard at the stored horizon: settings, spikes, backoff, each rank's band."""

    run_id: str
    settings: GuardSettings
    horizon: int
    multiplier: float  # the backoff at the horizon (1.0: none)
    spikes: list[Spike]
    bands: dict[int, Band]  # by rank, downsampled


@dataclass(frozen=True)
class History:
    """A run's curves (downsampled) and events up to the stored horizon."""

    run_id: str
    steps: Sequence[int]
    lrs: list[tuple[float, ...]]  # the LRs of each of ``steps``
    metrics: dict[str, Sequence[tuple[int, int, float]]]  # per name: (step, rank, value) rows
    events: list[Event]  # every event but the metric ones


Reports = Sequence[dict[str, Any]]
"""Spike-guard reports (``step``, ``rank``, ``name``, ``value``): each placed at its ``step``
or the first free step, whichever is later."""


class RunManager:
    """Loads runs lazily, serves final values, commits new ones.

    Args:
        store: Where the log lives.
        settings: Limits and snapshot cadence.
    """

    def __init__(self, store: BaseStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._runs: dict[str, RunState] = {}
        # Only while some thread holds or waits for it: an entry per unknown or deleted run id
        # asked for would otherwise outlive its request (weak values; see ``_RunLock``).
        self._load_locks: weakref.WeakValueDictionary[str, _RunLock] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        # Runs whose schedule fails at a step above the horizon: windows stop before it (so
        # each one does not fail, drop the engine and reload again). One entry per such run.
        self._fails_at: dict[str, int] = {}
        self.on_outcome: list[Any] = []  # callbacks(run_id, StepOutcome), for telemetry

    # -- creating and reading runs ------------------------------------------------

    def create_run(self, request: Mapping[str, Any], *, actor: str = LOCAL_ACTOR) -> tuple[RunRecord, bool]:
        """Create a run, or return the existing one if its spec is identical.

        ``actor`` (who asks) is recorded on the ``created`` event when this call creates it.

        Raises:
            SpecError: the schedule is invalid.
            RunConflict: the run exists with a different spec.
        """
        spec, schedule = self._canonical_spec(request)
        run_id = request.get("run_id") or f"run-{secrets.token_hex(8)}"
        existing = self._existing(run_id, spec)  # every rank joins: no torch engine built to check it
        if existing is not None:
            return existing, False
        with self._run_lock(run_id):  # a job's ranks arrive together: one builds the run, the rest join
            existing = self._existing(run_id, spec)
            if existing is not None:
                return existing, False
            _first_steps(schedule, spec["base_lrs"], spec["base_momentums"])
            created = NewEvent(EventKind.CREATED, 0, {"spec": spec}, actor=actor)
            record, is_new = self.store.create_run(run_id, spec, dict(request.get("labels") or {}), created)
        return (record if is_new else self._same_run(record, spec)), is_new

    def _existing(self, run_id: str, spec: dict[str, Any]) -> RunRecord | None:
        """The stored run if there is one (``RunConflict`` if its spec differs), else ``None``."""
        try:
            return self._same_run(self.store.read_run(run_id), spec)
        except RunNotFound:
            return None

    @staticmethod
    def _same_run(record: RunRecord, spec: dict[str, Any]) -> RunRecord:
        if record.spec != spec:
            raise RunConflict(
                f"run {record.run_id!r} already exists with a different spec; pick another run_id",
                errors=[],
            )
        return record

    def _canonical_spec(self, request: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The stored form of a create request, and its parsed schedule (work budget checked)."""
        base_lrs = [float(v) for v in request["base_lrs"]]
        schedule = parse_schedule(request["schedule"], n_groups=len(base_lrs),
                                  before_checks=lambda s: self._check_schedule_cost(s, len(base_lrs)))
        moms = request.get("base_momentums")
        if moms is not None and len(moms) != len(base_lrs):
            raise InvalidInput.at(
                "base_momentums", f"expected {len(base_lrs)} values (one per param group), got {len(moms)}"
            )
        return {
            "schedule": spec_to_json(schedule),
            "base_lrs": base_lrs,
            "base_momentums": [float(m) for m in moms] if moms is not None else None,
            "world_size": int(request.get("world_size") or 1),
        }, schedule

    def _check_schedule_cost(self, schedule: Any, n_groups: int) -> None:
        """Refuse a schedule whose checks (expressions at steps 0..100, the first steps) are over budget."""
        units = cost.cost(schedule, n_groups=n_groups, steps=cost.CREATE_STEPS)
        cost.check(
            f"checking this schedule ({cost.CREATE_STEPS} steps on {n_groups} param groups)",
            "schedule", units, self.settings.work_budget,
        )

    def delete_run(self, run_id: str) -> None:
        self.store.delete_run(run_id)
        self._fails_at.pop(run_id, None)
        state = self._runs.get(run_id)
        if state is not None:
            self._evict(state)

    # -- loading ----------------------------------------------------------------------

    def loaded(self, run_id: str) -> RunState | None:
        """The run's state if this process has loaded it; never blocks (event loop safe)."""
        return self._runs.get(run_id)

    def state(self, run_id: str) -> RunState:
        """The run's in-memory state, loaded from the log on first use."""
        state = self._runs.get(run_id)
        if state is not None:
            return state
        with self._run_lock(run_id):
            state = self._runs.get(run_id)
            if state is None:
                state = self._load(run_id)
                with self._lock:
                    self._runs[run_id] = state
        return state

    def _run_lock(self, run_id: str) -> _RunLock:
        """This process's lock for creating or loading one run (once, however many ask).

        The entry lives as long as a caller holds the returned object, so every thread that
        asks while another holds or waits for it gets the same lock.
        """
        with self._lock:
            lock = self._load_locks.get(run_id)
            if lock is None:
                lock = self._load_locks[run_id] = _RunLock()
            return lock

    def _evict(self, state: RunState) -> None:
        """Drop ``state`` for good: threads that still hold it must not use it (see ``commit``)."""
        state.evicted = True
        with self._lock:
            if self._runs.get(state.run_id) is state:
                del self._runs[state.run_id]

    def _load(self, run_id: str) -> RunState:
        record = self.store.read_run(run_id)
        snapshot = self.store.load_snapshot(run_id, max_step=record.horizon)
        state = self._fresh_state(record, snapshot)
        state.created_at = record.created_at
        for event in self.store.read_events(run_id):
            if event.kind.is_step_input and event.step > state.horizon:
                state.take_input(event)
            state.note_watched(event)
            state.last_seq = max(state.last_seq, event.seq)
        state.advance_to(record.horizon)
        state.publish()
        return state

    def _fresh_state(self, record: RunRecord, snapshot: Snapshot | None) -> RunState:
        spec = record.spec
        if snapshot is None:
            schedule = parse_schedule(spec["schedule"], n_groups=len(spec["base_lrs"]), validated=True)
            engine = Engine(schedule, spec["base_lrs"], spec["base_momentums"])
            return RunState(record.run_id, spec, engine, last_seq=0)
        saved = codec.from_jsonable(snapshot.state)
        state = RunState(record.run_id, spec, Engine.restore(saved["engine"]), last_seq=0)
        state.restore_marks(Marks(saved["status"], saved["stopped_at"], saved.get("switched_at")))
        return state

    def values_between(self, run_id: str, start: int, end: int) -> list[Values]:
        """Final values of steps ``start..end`` (all at or below the horizon), replaying if needed."""
        state = self.state(run_id)
        if state.cached(start) is not None and state.cached(end) is not None:
            return state.values[start - state.first_step : end - state.first_step + 1]
        record = self.store.read_run(run_id)
        replay = self._fresh_state(record, self.store.load_snapshot(run_id, max_step=start))
        for event in self.store.read_events(run_id):
            if event.kind.is_step_input and event.step > replay.horizon:
                replay.inputs.add(event)
        replay.advance_to(end)
        replay.publish()
        return replay.values[start - replay.first_step : end - replay.first_step + 1]

    # -- the hot path ---------------------------------------------------------------------

    def cached_window(
        self, run_id: str, step: int, ahead: int, *, most_values: int | None = None
    ) -> Window | None:
        """The window if every value in it is final and in memory; never blocks (event loop safe).

        ``most_values``: ``None`` too when the window would hold more values (LRs) than this
        (``ON_LOOP_VALUES`` on the event loop).
        """
        state = self._runs.get(run_id)
        if state is None:
            return None
        end = step + min(ahead, self._ahead_cap(state))
        if most_values is not None and (end - step + 1) * state.n_groups > most_values:
            return None
        if state.cached(step) is None or state.cached(end) is None:
            return None
        return self._window(state, step, end)

    def window(self, run_id: str, step: int, ahead: int) -> Window:
        """Final values for ``step .. step + ahead`` (fewer if capped), committing them.

        Raises:
            InvalidInput: ``step`` is negative or jumps too far beyond the horizon.
            ScheduleError: torch cannot reach that step.
        """
        state = self.state(run_id)  # loads the run if this process has not yet
        window = self.cached_window(run_id, step, ahead)
        if window is not None:
            return window
        self._check_jump(state, step)
        wanted = min(step + min(ahead, self._ahead_cap(state)), self._fails_at.get(run_id, math.inf) - 1)
        end = max(step, min(wanted, state.horizon + self._budget_steps(state)))
        if end > state.horizon:
            self.commit(run_id, end, if_behind=True, need=step)
        state = self.state(run_id)
        return self._window(state, step, min(end, max(state.horizon, step)))

    def _window(self, state: RunState, step: int, end: int) -> Window:
        if state.cached(step) is None:
            values = self.values_between(state.run_id, step, end)
        else:
            values = state.values[step - state.first_step : end - state.first_step + 1]
        spikes = state.spikes_between(step, end) if state.engine.spikes else []
        return Window(state.run_id, step, values, state.status, state.stopped_at, state.switched_at,
                      state.watching, self._ahead_cap(state), spikes)

    def _budget_steps(self, state: RunState) -> int:
        """The most steps of this run's current schedule one request may compute (work budget)."""
        schedule = state.engine.schedule
        cached = state.budget_steps
        if cached is None or cached[0] is not schedule:
            steps = cost.steps_within(schedule, n_groups=state.n_groups, budget=self.settings.work_budget)
            state.budget_steps = cached = (schedule, steps)
        return cached[1]

    def _ahead_cap(self, state: RunState) -> int:
        """The most steps a window may hold after its first: ``max_ahead``, cut to the work budget."""
        return min(self.settings.max_ahead, self._budget_steps(state) - 1)

    def _check_jump(self, state: RunState, step: int) -> None:
        """Refuse steps too far beyond the horizon: the stored one, which other processes may
        have moved past this one's cached horizon (so every replica answers alike)."""
        if step < 0:
            raise InvalidInput.at("step", f"must be >= 0, got {step}")
        most = min(self.settings.max_jump, self._budget_steps(state))
        if step <= state.horizon + most:
            return
        horizon = max(state.horizon, self.store.read_run(state.run_id).horizon)
        if step > horizon + self.settings.max_jump:
            raise InvalidInput.at(
                "step",
                f"step {step} is more than {self.settings.max_jump} steps beyond the horizon "
                f"({horizon}); step through the steps between first",
            )
        if step > horizon + most:
            units = cost.cost(state.engine.schedule, n_groups=state.n_groups, steps=step - horizon)
            cost.check(
                f"reaching step {step} from the horizon ({horizon}) on {state.n_groups} param groups",
                "step", units, self.settings.work_budget,
            )

    def _window_end(self, state: RunState, step: int, ahead: int) -> int:
        """The last step of the window asked at ``step`` (capped), when ``step`` is the first free one."""
        end = min(step + min(ahead, self._ahead_cap(state)), step + self.settings.max_jump)
        return max(step, min(end, self._fails_at.get(state.run_id, math.inf) - 1))

    def step_run(
        self, run_id: str, step: int, metrics: Mapping[str, float], rank: int, ahead: int
    ) -> Window:
        """Commit ``step`` with the metrics reported with it (API.md ``POST .../step``).

        Metrics for a step that is already final are recorded for history only. A step
        without metrics at or below the cached horizon touches no database (the hot path).
        """
        state = self.state(run_id)
        self._check_jump(state, step)
        records = _records(metrics, step, rank)
        watched = {k: float(v) for k, v in metrics.items() if k in state.watched}
        reports = _guard_reports(state, records)
        if step > state.horizon:
            # One write transaction: the metrics, the decision and the whole window asked for.
            end = self._window_end(state, step, ahead)
            metric = (step, watched) if watched else None
            self.commit(run_id, end, metric=metric, records=records, reports=reports, need=step)
        elif reports:
            self.commit(run_id, state.horizon, records=records, reports=reports)
        elif records:
            self.store.append_metrics(run_id, records)
        return self.window(run_id, step, ahead)

    # -- the metric barrier -------------------------------------------------------------

    def report_to_barrier(
        self,
        run_id: str,
        step: int,
        rank: int,
        metrics: Mapping[str, float],
        watched: Mapping[str, float],
        ahead: int = 0,
    ) -> bool:
        """Keep one rank's report (all its metrics for history, the watched ones for the
        barrier, in one transaction); the rank that completes the barrier decides it, and
        commits the window it asks for (``ahead``) with the decision.

        Returns:
            True once ``step`` is final (decided here or already before).

        Raises:
            InvalidInput: ``step`` jumps too far beyond the horizon (as ``step_run`` would say).
        """
        state = self.state(run_id)
        self._check_jump(state, step)
        reports = _guard_reports(state, _records(metrics, step, rank))
        if reports:  # judged per rank, not at the barrier: placed now, at step (or the first free one)
            self.commit(run_id, state.horizon, reports=reports)
        tally = self.store.add_barrier_report(run_id, step, rank, watched, _records(metrics, step, rank))
        return self._settle_barrier(state, step, tally, timed_out=False, ahead=ahead)

    def resolve_barrier(self, run_id: str, step: int, timed_out: bool, ahead: int = 0) -> bool:
        """Decide the barrier at ``step`` if every rank reported (or time is up).

        The store is asked because ranks may report to other processes or replicas.

        Returns:
            True once ``step`` is final (decided here, by another request, or elsewhere).
        """
        state = self.state(run_id)
        if state.horizon >= step:
            return True
        return self._settle_barrier(state, step, self.store.read_barrier(run_id, step), timed_out, ahead)

    def _settle_barrier(
        self, state: RunState, step: int, tally: BarrierTally, timed_out: bool, ahead: int
    ) -> bool:
        if state.horizon >= step or tally.horizon >= step:
            return True
        reports = tally.reports
        if len(reports) < state.world_size and not timed_out:
            return False
        missing = [r for r in range(state.world_size) if r not in reports]
        means = _rank_order_means(reports)
        extra = []
        if missing:
            extra.append(NewEvent(EventKind.BARRIER_TIMEOUT, step, {
                "missing_ranks": missing, "reported_ranks": sorted(reports),
                "timeout_s": self.settings.barrier_timeout_s}))
        end = self._window_end(state, step, ahead)
        self.commit(state.run_id, end, metric=(step, means), extra_events=extra, need=step)
        return True

    # -- committing -------------------------------------------------------------------------

    def commit(
        self,
        run_id: str,
        target: int,
        *,
        metric: tuple[int, dict[str, float]] | None = None,
        action: Action | None = None,
        extra_events: Sequence[NewEvent] = (),
        records: Sequence[MetricRecord] = (),
        reports: Reports = (),
        if_behind: bool = False,
        need: int | None = None,
    ) -> int | None:
        """Advance the run to ``target`` (at least), placing a new decision on the way.

        ``records`` (metric history) and spike-guard ``reports`` are written in the same
        transaction. ``if_behind``
        skips the store when this process holds ``target`` already (another request took
        the run there while this one waited for its lock: ranks asking the same window).
        ``need``: the last step that must be reached; the steps of a window after a step the
        schedule cannot take are left out (``RunState.advance_to``).

        Returns:
            The step an ``action`` was placed at, if one was given.
        """
        while True:
            state = self.state(run_id)
            with state.lock:
                if state.evicted:  # a commit failed while we waited: take the reloaded state
                    continue
                if if_behind and state.horizon >= target:
                    return None
                try:
                    return self._commit_locked(
                        state, target, metric, action, extra_events, records, need, reports
                    )
                except _RunReplaced:  # evicted on the way out; the next turn loads the new run
                    continue

    def _commit_locked(
        self,
        state: RunState,
        target: int,
        metric: tuple[int, dict[str, float]] | None,
        action: Action | None,
        extra_events: Sequence[NewEvent],
        records: Sequence[MetricRecord] = (),
        need: int | None = None,
        reports: Reports = (),
    ) -> int | None:
        run_id = state.run_id
        with self._evicting_on_error(state):
            stored = self.store.read_run(run_id)  # no lock: has another process moved the run?
            if _moved(stored, state):
                with self.store.lock_run(run_id) as tx:  # rare (replicas): catch up and compute in the lock
                    self._catch_up(state, tx)
                    decision = (metric, action, extra_events, records)
                    outcomes, placed = self._write(state, tx, target, *decision, need, reports)
            else:
                # The torch work happens here, before the write slot: the store's lock (on SQLite
                # the file's, which every run's commit needs) is held only to append and commit.
                old_horizon = state.horizon
                new_events, placed = self._place(state, old_horizon, metric, action, reports)
                if metric is None or new_events:  # extra events go with a decision that was taken
                    new_events.extend(extra_events)
                outcomes = state.advance_to(max(target, old_horizon), need=need)
                new_events.extend(_output_events(outcomes, old_horizon, state))
                with self.store.lock_run(run_id) as tx:
                    if _moved(tx.run, state):  # another process committed meanwhile: start again
                        raise _RunReplaced(run_id)
                    self._append(state, tx, outcomes, new_events, records)
            state.publish()  # durable now: other threads may see the new steps
            if state.broken:  # its engine failed past the published steps: the next request reloads
                self._fails_at[run_id] = state.engine.step + 1
                self._evict(state)
            elif self._fails_at.get(run_id, math.inf) <= state.horizon:  # an action moved it past
                self._fails_at.pop(run_id, None)
            for outcome in outcomes:
                for callback in self.on_outcome:
                    callback(run_id, outcome)
            if not state.broken:
                self._maybe_snapshot(state, outcomes)
        return placed

    def _write(
        self,
        state: RunState,
        tx: RunTransaction,
        target: int,
        metric: tuple[int, dict[str, float]] | None,
        action: Action | None,
        extra_events: Sequence[NewEvent],
        records: Sequence[MetricRecord],
        need: int | None,
        reports: Reports = (),
    ) -> tuple[list[StepOutcome], int | None]:
        """Place the decision and compute the steps inside ``tx`` (the run moved elsewhere meanwhile)."""
        old_horizon = tx.run.horizon
        new_events, placed = self._place(state, old_horizon, metric, action, reports)
        if metric is None or new_events:
            new_events.extend(extra_events)
        outcomes = state.advance_to(max(target, old_horizon), need=need)
        new_events.extend(_output_events(outcomes, old_horizon, state))
        self._append(state, tx, outcomes, new_events, records)
        return outcomes, placed

    @staticmethod
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
        appended = tx.append_events(new_events) if new_events else []
        if outcomes:  # a commit that only caught up writes nothing
            tx.update_run(horizon=state.engine.step, status=state.marks.status)
        state.last_seq = appended[-1].seq if appended else tx.run.last_seq

    def _catch_up(self, state: RunState, tx: RunTransaction) -> None:
        """Take in what other processes appended since this one last looked.

        Raises:
            _RunReplaced: the run was deleted and created anew (same id) by another
                process since this one loaded it; this state belongs to the old run.
        """
        if tx.run.created_at != state.created_at or tx.run.horizon < state.horizon:
            raise _RunReplaced(state.run_id)
        if tx.run.last_seq > state.last_seq:
            for event in tx.read_events(state.last_seq):
                if event.kind.is_step_input:
                    state.take_input(event)
            state.last_seq = tx.run.last_seq
        state.advance_to(tx.run.horizon)
        state.publish()  # committed by another process: durable already

    def _place(
        self,
        state: RunState,
        horizon: int,
        metric: tuple[int, dict[str, float]] | None,
        action: Action | None,
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
            if state.status == "stopped":  # as of the stored horizon, whoever stopped it
                raise RunConflict(f"run {state.run_id!r} is stopped; it takes no more actions")
            at_step = action.at_step
            if at_step is not None and at_step < first_free:
                raise InvalidInput.at(
                    "at_step", f"must be above the horizon ({horizon}), got {at_step}"
                )
            placed = at_step if at_step is not None else first_free
            events.append(NewEvent(EventKind.CONTROL, placed, action.payload, action.actor, action.reason))
        for event in events:
            state.take_input(_as_event(event))
        return events, placed

    @contextmanager
    def _evicting_on_error(self, state: RunState) -> Iterator[None]:
        """An error mid-commit leaves the engine ahead of the store: drop it, reload later."""
        try:
            yield
        except BaseException:
            self._evict(state)
            raise

    def _maybe_snapshot(self, state: RunState, outcomes: list[StepOutcome]) -> None:
        every = self.settings.snapshot_every
        if outcomes and state.horizon // every > (state.horizon - len(outcomes)) // every:
            payload = {
                "engine": state.engine.snapshot(),
                "status": state.status,
                "stopped_at": state.stopped_at,
                "switched_at": state.switched_at,
            }
            first = state.checkpointed_to + 1  # the LRs since the last snapshot go with it (history)
            lrs = state.values.packed_lrs(first - state.first_step, state.horizon + 1 - state.first_step)
            chunk = ValueChunk(first, state.horizon + 1 - first, state.n_groups, pack_lrs(lrs))
            self.store.save_snapshot(
                state.run_id, Snapshot(state.horizon, state.last_seq, codec.to_jsonable(payload)), chunk
            )
            state.checkpointed_to = state.horizon

    # -- operator control -----------------------------------------------------------------

    def control(
        self,
        run_id: str,
        action: dict[str, Any],
        at_step: int | None,
        *,
        actor: str = LOCAL_ACTOR,
        reason: str | None = None,
    ) -> tuple[int, NewEvent]:
        """Record an operator action at ``at_step`` (default: the first free step).

        ``actor`` and ``reason`` go on the ``control`` event and on the ``status`` event it
        causes.

        Returns:
            The step it applies at, and the ``control`` event recorded there.
        """
        state = self.state(run_id)
        if state.status == "stopped":  # stopped is for good; another replica may know it first (_place)
            raise RunConflict(f"run {run_id!r} is stopped; it takes no more actions")
        action = self._validate_action(state, action)
        placed = self.commit(run_id, state.horizon, action=Action(at_step, action, actor, reason))
        assert placed is not None
        return placed, NewEvent(EventKind.CONTROL, placed, action, actor, reason)

    def _validate_action(self, state: RunState, action: dict[str, Any]) -> dict[str, Any]:
        kind = action["action"]
        if kind == "set_lr":
            lrs = action.get("lrs")
            if lrs is None:
                lrs = [action["lr"]] * state.n_groups
            if len(lrs) != state.n_groups:
                raise InvalidInput.at(
                    "lrs", f"expected {state.n_groups} values (one per param group), got {len(lrs)}"
                )
            return {"action": "set_lr", "lrs": [float(v) for v in lrs]}
        if kind == "replace_schedule":
            schedule = parse_schedule(action["schedule"], n_groups=state.n_groups,
                                      before_checks=lambda s: self._check_schedule_cost(s, state.n_groups))
            if cycles_momentum(schedule) and not state.engine.reports_momentum:
                raise InvalidInput.at(
                    "schedule",
                    "this run does not cycle momentum, so its new schedule cannot either "
                    "(set cycle_momentum: false)",
                )
            return {"action": kind, "schedule": spec_to_json(schedule)}
        return {k: v for k, v in action.items() if v is not None}

    # -- the range test -------------------------------------------------------------------

    def lr_finder(self, run_id: str) -> LRFinder:
        """The range test's curve, suggestions and choice (API.md, LR range test).

        Raises:
            RunConflict: the run's schedule is not an LRRangeTest.
        """
        state = self.caught_up(run_id)
        with state.lock:
            test = state.engine.range_test
            if test is None:
                raise RunConflict(f"run {run_id!r} has no LRRangeTest schedule")
            return LRFinder(test.report(), state.switched_at)

    # -- the spike guard ------------------------------------------------------------------

    def spike_guard(self, run_id: str, max_points: int) -> SpikeGuardView:
        """The guard's settings, spikes and backoff at the stored horizon, and each rank's
        band (baseline and spike line) as the detector met each report, downsampled.

        Raises:
            RunConflict: the run has no spike guard (now).
        """
        state = self.caught_up(run_id)
        with state.lock:
            guard, horizon = state.engine.guard, state.horizon
            spikes = state.spikes_between(0, horizon)
        if guard is not None:
            settings, multiplier = guard.settings, guard.multiplier
        else:  # not (yet) acting, e.g. the `then` of a range test still running
            spec = guard_of(parse_schedule(state.spec["schedule"], n_groups=state.n_groups), state.n_groups)
            if spec is None:
                raise RunConflict(f"run {run_id!r} has no SpikeGuard schedule")
            settings, multiplier = GuardSettings.from_spec(spec), 1.0
        placed = [
            (event.step, Report.from_payload(r))
            for event in sorted(self.store.read_events(run_id), key=lambda e: (e.step, e.seq))
            if event.kind is EventKind.METRIC and event.step <= horizon
            for r in event.payload.get("reports", ())
            if r.get("name") == settings.monitor
        ]
        bands, _ = replay_band(settings, placed)
        shown = {rank: band.picked(_downsample(range(len(band.steps)), max_points))
                 for rank, band in sorted(bands.items())}
        return SpikeGuardView(run_id, settings, horizon, multiplier, spikes, shown)

    def caught_up(self, run_id: str) -> RunState:
        """The run's state as of the stored horizon (other processes may have gone further)."""
        record = self.store.read_run(run_id)
        state = self.state(run_id)
        if record.horizon > state.horizon or record.created_at != state.created_at:
            self.commit(run_id, record.horizon)
            state = self.state(run_id)
        return state

    # -- history --------------------------------------------------------------------------

    def history(self, run_id: str, max_points: int) -> History:
        """The run's curves and events up to the stored horizon (404 if deleted by any replica)."""
        state = self.caught_up(run_id)
        units = cost.history_cost(n_groups=state.n_groups, points=min(max_points, state.horizon + 1))
        cost.check(f"a history of {max_points} points on {state.n_groups} param groups", "max_points",
                   units, self.settings.work_budget)
        horizon = state.horizon
        steps = _downsample(range(horizon + 1), max_points)
        lrs = self._lrs_at(state, steps)
        metrics = {name: _downsample(rows, max_points)
                   for name, rows in self.store.read_metrics(run_id).items()}
        events = [e for e in self.store.read_events(run_id) if e.kind is not EventKind.METRIC]
        return History(run_id, steps, [lrs[s] for s in steps], metrics, events)

    def _lrs_at(self, state: RunState, steps: Sequence[int]) -> dict[int, tuple[float, ...]]:
        """Final LRs of ``steps`` (at most the horizon): from memory, else as stored with the
        snapshots (a read per step, however long the run), else (runs written before the
        values were stored) replayed."""
        found = {s: state.cached(s)[0] for s in steps if s >= state.first_step}  # type: ignore[index]
        older = [s for s in steps if s < state.first_step]
        if older:
            found.update(self.store.read_lrs(state.run_id, older))
            missing = [s for s in older if s not in found]
            if missing:
                replayed = self.values_between(state.run_id, missing[0], missing[-1])
                found.update({s: replayed[s - missing[0]][0] for s in missing})
        return found

    def record_metrics(self, run_id: str, records: Sequence[Mapping[str, Any]]) -> int:
        """Store history-only metrics (idempotent per name, step and rank)."""
        state = self.state(run_id)  # 404 for an unknown run
        rows = [MetricRecord(r["name"], r["step"], r["rank"], float(r["value"])) for r in records]
        reports = _guard_reports(state, rows)
        if not reports:
            return self.store.append_metrics(run_id, rows)
        new = self.store.append_metrics(run_id, rows)  # first, to count the new ones; resends are
        self.commit(run_id, state.horizon, reports=reports)  # judged once (spike_guard.Detector)
        return new


def _first_steps(schedule: Any, base_lrs: Sequence[float], base_momentums: Sequence[float] | None) -> None:
    """Build the run's engine and take steps 1 and 2: a schedule that cannot start is a 422 at create.

    Raises:
        ScheduleError: torch refuses the schedule on these LRs, or a value of step 0, 1 or 2
            would be negative or not finite (e.g. ExponentialLR with gamma 1e308).
    """
    engine = Engine(schedule, base_lrs, base_momentums)
    engine.check_values(0, "the schedule's")
    for _ in range(2):
        engine.advance()


def _moved(stored: RunRecord, state: RunState) -> bool:
    """Whether the stored run is not the one ``state`` holds as of its horizon (another process
    appended, or deleted and created it anew)."""
    return (
        stored.created_at != state.created_at
        or stored.horizon != state.horizon
        or stored.last_seq != state.last_seq
    )


class _RunLock:
    """A ``threading.Lock`` that a ``WeakValueDictionary`` can hold (a bare lock takes no weak reference)."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _RunReplaced(Exception):
    """A loaded run turned out to be deleted and created anew by another process."""


def _rank_order_means(reports: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Per metric: the sum over ranks in rank order, divided by how many ranks reported it."""
    names = sorted({name for values in reports.values() for name in values})
    means = {}
    for name in names:
        values = [reports[r][name] for r in sorted(reports) if name in reports[r]]
        total = 0.0
        for value in values:  # left to right on purpose: sum() may compensate (Python >= 3.12)
            total += value
        means[name] = total / len(values)
    return means


def _report_events(reports: Reports, first_free: int, events: list[NewEvent]) -> list[NewEvent]:
    """METRIC events placing each report at its step or ``first_free``; joins a plateau
    metric event of the same step (in ``events``) instead of adding another."""
    groups: dict[int, Reports] = {}
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


def _guard_reports(state: RunState, records: Sequence[MetricRecord]) -> list[dict[str, Any]]:
    """The records a spike guard of the run judges, as METRIC event ``reports`` items."""
    if not state.guard_monitors:
        return []
    return [
        {"step": r.step, "rank": r.rank, "name": r.name, "value": r.value}
        for r in records
        if r.name in state.guard_monitors
    ]


def _records(metrics: Mapping[str, float], step: int, rank: int) -> list[Any]:
    return [MetricRecord(name, step, rank, float(value)) for name, value in metrics.items()]


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
        for action in outcome.actions:
            status = {"stop": "stopped", "hold": "held", "resume": "active"}.get(action.payload["action"])
            if status is not None:  # the action's doing: its actor and reason
                events.append(NewEvent(EventKind.STATUS, outcome.step, {"status": status},
                                       action.actor, action.reason))
    return events


def _spike_events(spike: Spike, step: int) -> list[NewEvent]:
    """A ``loss_spike`` event; and the run's stop, when it is one spike too many."""
    events = [NewEvent(EventKind.LOSS_SPIKE, step, spike.payload())]
    if spike.stop:
        reason = (
            f"spike guard: {spike.count} loss spikes, more than max_spikes allows "
            f"(the last on rank {spike.rank} at step {spike.step})"
        )
        events.append(NewEvent(EventKind.STATUS, step, {"status": "stopped"}, reason=reason))
    return events


def _downsample(items: Sequence[Any], max_points: int) -> Sequence[Any]:
    """At most ``max_points`` items, evenly spaced, always keeping the first and the last."""
    n = len(items)
    if n <= max_points:
        return items
    if max_points == 1:
        return [items[-1]]
    picks = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return [items[i] for i in picks]
