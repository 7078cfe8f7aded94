"""``RunManager``: the one place that turns requests into log entries and final values.

It serves windows (the hot path), runs metric barriers, places operator actions and
creates runs; the parts it stands on live beside it:

- ``cache.RunCache``: loading runs from the log and keeping them in memory;
- ``commit.Committer``: the commit protocol (finality, decisions on the first free step);
- ``read_models.ReadModels``: history, the LR range test's curve, the spike guard's bands;
- ``replay.apply_logs``: how log entries change a run's state.

*Parity*: values come from ``Engine``, i.e. from torch's own schedulers.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from lrserve.service.engine import cost
from lrserve.service.engine.actions import action_for_run
from lrserve.service.engine.engine import Values
from lrserve.service.engine.run_spec import RunSpec
from lrserve.service.engine.spike_guard import Spike
from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import InvalidInput, LRServeError, RunConflict, RunNotFound, ServerStopping
from lrserve.service.lru import Lru
from lrserve.service.offload import BigWork, is_big
from lrserve.service.runs.cache import LOAD_TRIES, RunCache, still_the_run
from lrserve.service.runs.commit import (
    LOCAL_ACTOR,
    BarrierDecision,
    Committer,
    PlacedAction,
    Reports,
    RunReplacedMeanwhile,
    behind,
    guard_reports,
    metric_records,
    refuse_after_a_stop,
)
from lrserve.service.runs.read_models import History, LRFinder, ReadModels, SpikeGuardView
from lrserve.service.runs.state import RunState, StepOutcome
from lrserve.service.runs.value_log import ValueLog
from lrserve.service.settings import Settings
from lrserve.service.store.base import (
    BarrierTally,
    BaseStore,
    HistoryMark,
    MetricRecord,
    RunRecord,
    WouldWait,
)
from lrserve.service.store.events import EventKind, NewEvent
from starlette.concurrency import run_in_threadpool

__all__ = ["LOCAL_ACTOR", "ON_LOOP_VALUES", "PlacedAction", "Reports", "RunManager", "SpecConflict", "Window"]

ON_LOOP_VALUES = 4096
"""Most LR values an answer built and serialised on the event loop may hold; bigger answers
are built in a worker thread, so that no answer stalls the requests the loop serves."""

T = TypeVar("T")


@dataclass(frozen=True)
class RankReport:
    """One rank's report at a metric barrier: all its metrics, and the watched ones among them."""

    rank: int
    metrics: Mapping[str, float]
    watched: Mapping[str, float]


@dataclass(frozen=True)
class CheckedCreate:
    """A create request's spec, checked: its stored form (``RunSpec.to_json``) and its
    ``RunSpec``, which becomes the run's own (no parse, no compiling its expressions again)."""

    spec: dict[str, Any]
    run_spec: RunSpec
    started: bool
    """Whether its first steps were taken (a big spec's, in the worker that checked it)."""


@dataclass(frozen=True)
class Window:
    """Final values of steps ``start .. start + len(values) - 1``."""

    run_id: str
    start: int
    values: list[Values] | ValueLog  # a big window's: packed (``RunState.held_packed``)
    status: RunStatus
    stopped_at: int | None
    switched_at: int | None
    watched: tuple[str, ...] = ()  # the metrics the run decides on now (clients report these)
    max_ahead: int = 0  # the server's cap on ``ahead``
    spikes: list[Spike] = field(default_factory=list)


class CommitThreads:
    """``size`` threads for ``RunManager.in_commit_thread``: a call is handed over on a queue and
    its result comes back to the caller's event loop (``call_soon_threadsafe``), with no
    ``concurrent.futures.Future`` between (``run_in_executor`` made one per call, chained to an
    asyncio future by callbacks and locks: ~30 µs of CPU per call at 32 at once, ~11 here).

    A call whose caller was cancelled before a thread took it is not run (as with
    ``run_in_executor``). ``close`` runs what is queued, then stops the threads; a call after
    it raises ``ServerStopping``.
    """

    def __init__(self, size: int, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._calls = queue.SimpleQueue()
        self._size = size
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise ServerStopping("the server is stopping; retry (another replica, or once it is up)")
            if len(self._threads) < self._size:  # one more thread for each call until all are up
                thread = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            self._calls.put((future, call, args))
        return await future

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            future, call, args = item
            if future.cancelled():  # its caller gave up before it began
                continue
            try:
                result = call(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, as an executor does
                _answer(future, _failed, exc)
            else:
                _answer(future, _done, result)
            del item, future, call, args  # not held while waiting for the next call

    def close(self) -> None:
        """Run the calls queued so far, then stop the threads (each takes one ``None``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._calls.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()


def _answer(future: asyncio.Future[Any], give: Callable[[asyncio.Future[Any], Any], None],
            value: Any) -> None:
    try:
        future.get_loop().call_soon_threadsafe(give, future, value)
    except RuntimeError:  # its loop is closed: no one awaits it any more
        pass


def _done(future: asyncio.Future[Any], result: Any) -> None:
    if not future.cancelled():
        future.set_result(result)


def _failed(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(exc)


class RunManager:
    """Creates runs, serves final values, commits new ones.

    Args:
        store: Where the log lives.
        settings: Limits and snapshot cadence.
    """

    def __init__(self, store: BaseStore, settings: Settings, big_work: BigWork | None = None) -> None:
        self.store = store
        self.settings = settings
        self.big_work = big_work or BigWork(0)  # big creates and runs of steps (service.offload)
        self.runs = RunCache(store, snapshot_every=settings.snapshot_every)
        self._specs = CheckedSpecs(SPECS_KEPT)
        self.committer = Committer(store, settings, self.runs, self.big_work)
        self.reads = ReadModels(store, settings, self.runs, self.committer)
        self._commit_threads = CommitThreads(store.connections, "lrserve-commit")

    async def in_commit_thread(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` (a commit, or a route's read beside its commits) in a worker thread.

        PostgreSQL: in one of this manager's commit threads, as many as the store has
        connections (``BaseStore.connections``); calls beyond them queue here, holding no
        thread. Every API commit comes here (``GET .../lr``, ``POST .../step`` and the barrier's
        reports and decisions, ``.../metrics``, ``.../control`` through ``small_or_in_thread``)
        except creates (``Creates``) and deletes; background writers (liveness, webhooks) and
        reads (loading a run, history, the event feed) use the event loop's shared threads. No
        call here waits for another call here (a thread waits for a connection or a row lock,
        both held by running threads), so they cannot deadlock.

        Why: in the loop's shared threads (up to 40), commits beyond the pool's connections only
        wait for one, each a thread's wake-up and a turn at the GIL for nothing
        (docs/performance.md, "PostgreSQL").

        SQLite (``one_writer``): in the shared threads, where commits waiting for the file's
        write slot go in one transaction (``GroupCommit``); one thread would commit one at a time.

        Raises:
            ServerStopping: PostgreSQL, after ``close`` (a 503, not a 500).
        """
        if self.store.one_writer:
            return await run_in_threadpool(call, *args)
        return await self._commit_threads.run(call, *args)

    def close(self) -> None:
        """Wait for the commits in progress, then stop the commit threads (before the store and
        ``big_work`` close: a commit in progress may need them); calls after get ``ServerStopping``."""
        self._commit_threads.close()
        self.reads.close()

    @property
    def on_outcome(self) -> list[Callable[[str, StepOutcome], Any]]:
        """Callbacks ``(run_id, StepOutcome)`` for each newly final step (telemetry)."""
        return self.committer.on_outcome

    def now(self, call: Callable[[], T]) -> T | None:
        """``call()`` here and now if it needs no wait and little work, else None: the caller
        runs it in a worker thread instead.

        For the event loop, where a hop to a worker thread and back costs more than a small
        commit on SQLite (WAL: readers never wait, a commit takes microseconds). "No wait":
        the run is loaded, no other thread holds it, the file's write slot is free at once
        in every process (``BaseStore.without_waiting``); "little work": ``ON_LOOP_WORK``,
        no snapshot due, no replay. A call that cannot go through raises ``WouldWait``
        before it changes anything (PostgreSQL: always, every statement is a round trip);
        a call whose commit went through is not run again, except where a failing schedule
        dropped the run right after its commit, when the worker thread finds the step final
        (as a client's retry would).
        """
        try:
            with self.store.without_waiting():
                return call()
        except WouldWait:
            return None

    # -- the parts, as callers know them ---------------------------------------------------

    def loaded(self, run_id: str) -> RunState | None:
        """The run's state if this process has loaded it; never blocks (event loop safe)."""
        return self.runs.loaded(run_id)

    def state(self, run_id: str) -> RunState:
        """The run's in-memory state, loaded from the log on first use."""
        return self.runs.state(run_id)

    def values_between(self, run_id: str, start: int, end: int) -> list[Values]:
        """Final values of steps ``start..end`` (all at or below the horizon), replaying if needed."""
        return self.runs.values_between(run_id, start, end)

    def caught_up(self, run_id: str) -> RunState:
        """The run's state as of the stored horizon (other processes may have gone further)."""
        return self.committer.caught_up(run_id)

    def read_run(self, run_id: str) -> tuple[RunRecord, RunState]:
        """The run's record (one read) and its state as of it, caught up first if another
        process went further (``GET /v1/runs/{id}``). On the event loop (``now``) the run must
        be loaded already: loading it (a replay) is a worker thread's work.

        Raises:
            RunNotFound: no such run.
        """
        record = self.store.read_run(run_id)
        state = self.runs.loaded(run_id)
        if state is None:
            if self.store.must_not_wait:
                raise WouldWait("loading a run is no work for the event loop")
            state = self.runs.state(run_id)
        if behind(record, state):
            state = self.committer.caught_up(run_id, record)
            record = self.store.read_run(run_id)
        return record, state

    def history_mark(self, run_id: str) -> HistoryMark:
        return self.reads.history_mark(run_id)

    def history(self, run_id: str, max_points: int, mark: HistoryMark | None = None) -> History:
        return self.reads.history(run_id, max_points, mark)

    def lr_finder(self, run_id: str) -> LRFinder:
        return self.reads.lr_finder(run_id)

    def spike_guard(self, run_id: str, max_points: int) -> SpikeGuardView:
        return self.reads.spike_guard(run_id, max_points)

    # -- creating and reading runs ------------------------------------------------

    def create_run(self, request: Mapping[str, Any], *, actor: str = LOCAL_ACTOR) -> tuple[RunRecord, bool]:
        """Create a run, or return the existing one if its spec is identical.

        ``actor`` (who asks) is recorded on the ``created`` event when this call creates it.

        On the event loop (``now``) only a join goes through: the run exists with this spec
        (one read), of at most ``ON_LOOP_SPEC_CHARS``; anything else raises ``WouldWait``
        before it changes anything.

        Raises:
            SpecError: the schedule is invalid.
            RunConflict: the run exists with a different spec.
        """
        if self.store.must_not_wait and not _small_spec(request):
            raise WouldWait("a big spec's key and the stored run's spec are a worker thread's work")
        key = _spec_key(request)
        kept = self._specs.get(key)  # checked before: every rank of a job sends the same spec
        if isinstance(kept, InvalidInput):
            raise copy.copy(kept)  # a copy: other threads may raise it too
        spec = kept
        checked: CheckedCreate | None = None
        if spec is None:
            checked = self._checked(key, request)
            spec = checked.spec
        run_id = request.get("run_id") or f"run-{secrets.token_hex(8)}"
        existing = self._existing(run_id, spec)  # every rank joins: no torch engine built to check it
        if existing is not None:
            return existing, False
        if self.store.must_not_wait:
            raise WouldWait(f"run {run_id!r} is new here: built in a worker thread")
        with self.runs.run_lock(run_id):  # a job's ranks arrive together: one builds the run, the rest join
            existing = self._existing(run_id, spec)
            if existing is not None:
                return existing, False
            if checked is None:  # a new run of a spec kept from another: checked again for its RunSpec
                checked = self._checked(key, request)
                spec = checked.spec
            if not checked.started:
                try:
                    _first_steps(checked.run_spec)
                except InvalidInput as refusal:
                    self._specs.put(key, refusal)
                    raise
            spec = copy.deepcopy(spec)  # the run's own: the one kept (``CheckedSpecs``) is every run's
            created = NewEvent(EventKind.CREATED, 0, {"spec": spec}, actor=actor)
            record, is_new = self.store.create_run(run_id, spec, dict(request.get("labels") or {}), created)
            if is_new:  # its ranks step it next: no load (three reads), no parse, for the state just built
                self.runs.created(record, checked.run_spec)
        return (record if is_new else self._same_run(record, spec)), is_new

    def asks_for(self, record: RunRecord, request: Mapping[str, Any]) -> bool:
        """Whether the create ``request`` asks for ``record``'s run with its spec, by the spec this
        process checked for it (False where it checked none, or refused it: that takes checking it,
        or raising its refusal; and for a spec over ``ON_LOOP_SPEC_CHARS``: called on the event loop).

        Raises:
            RunConflict: ``record`` holds another spec (as ``create_run`` would say, having read it).
        """
        if not _small_spec(request):  # its key and the stored spec: a worker thread's work
            return False
        spec = self._specs.get(_spec_key(request))
        if not isinstance(spec, dict) or record.run_id != request.get("run_id"):
            return False
        return self._same_run(record, spec) is record

    def _checked(self, key: str, request: Mapping[str, Any]) -> CheckedCreate:
        """The request's spec checked (``SpecError``, ``InvalidInput`` where it is not): its stored
        form, kept (``CheckedSpecs``) by ``key``, or its refusal kept, and its ``RunSpec``, the
        run's own once created (its expressions compiled once). A big spec is checked whole, first
        steps included, in a worker process, and comes back with its expressions compiled there;
        a small one's first steps are still to take (``CheckedCreate.started``). On the event loop a
        big spec raises ``WouldWait``."""
        big = is_big(n_groups=len(request["base_lrs"]), steps=cost.CREATE_STEPS, schedule=request["schedule"])
        if big and self.store.must_not_wait:
            raise WouldWait("a big spec is checked in a worker process")
        try:
            if big:
                parsed = self.big_work.run(checked_spec, dict(request), self.settings.work_budget)
            else:
                parsed = RunSpec.from_request(request, check_cost=self._check_schedule_cost)
            spec = parsed.to_json()
        except InvalidInput as refusal:
            self._specs.put(key, refusal)
            raise
        self._specs.put(key, spec)
        return CheckedCreate(spec, parsed, started=big)

    def _existing(self, run_id: str, spec: dict[str, Any]) -> RunRecord | None:
        """The stored run if there is one (``RunConflict`` if its spec differs), else ``None``."""
        try:
            return self._same_run(self.store.read_run(run_id), spec)
        except RunNotFound:
            return None

    @staticmethod
    def _same_run(record: RunRecord, spec: dict[str, Any]) -> RunRecord:
        if record.spec != spec:
            raise SpecConflict(record)
        return record

    def _check_schedule_cost(self, schedule: Any, n_groups: int) -> None:
        check_schedule_cost(schedule, n_groups, self.settings.work_budget)

    def delete_run(self, run_id: str) -> None:
        self.store.delete_run(run_id)
        self.runs.forget(run_id)
        self.reads.bands.forget(run_id)

    # -- the hot path ---------------------------------------------------------------------

    def cached_window(
        self, run_id: str, step: int, ahead: int, *, most_values: int | None = None
    ) -> Window | None:
        """The window if every value in it is final and in memory; never blocks (event loop safe).

        ``most_values``: ``None`` too when the window would hold more values (LRs) than this
        (``ON_LOOP_VALUES`` on the event loop).
        """
        state = self.runs.loaded(run_id)
        if state is None:
            return None
        end = step + min(ahead, self._ahead_cap(state))
        if most_values is not None and (end - step + 1) * state.n_groups > most_values:
            return None
        values = _held(state, step, end)
        if values is None:
            return None
        return self._window(state, step, end, values)

    def window_now(self, run_id: str, step: int, ahead: int, *, most_values: int) -> Window | None:
        """``window(...)`` here and now (``windows_now``: a loaded run, no wait, little work),
        else None: the caller asks in a worker thread.

        Raises:
            LRServeError: what ``window`` would raise for it (a step too far, say).
        """
        (outcome,) = self.windows_now([(run_id, step, ahead)], most_values=most_values)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def windows_now(
        self, asks: Sequence[tuple[str, int, int]], *, most_values: int
    ) -> list[Window | BaseException | None]:
        """``window(run_id, step, ahead)`` for each ask, here and now, the steps to commit
        committed in one transaction (``Committer.advance_now``): for the event loop, where a
        hop to a worker thread and back costs more than a small commit on SQLite, and one
        transaction for the windows asked in one turn of the loop costs less than one each.

        Each ask's outcome, in order: its window (its steps durable); None when it would wait
        or is big — a run not loaded or held by another thread, more values than
        ``most_values``, more work than ``ON_LOOP_WORK``, a snapshot due, the write slot taken,
        PostgreSQL (``windows_grouped``, in a commit thread) — and nothing of it changed: the
        caller asks ``window`` in a worker thread;
        or the error ``window`` raised for it. A run asked twice commits once; the second ask
        is answered if the first made its window final.
        """
        try:
            with self.store.without_waiting():
                return self.windows_grouped(asks, most_values=most_values)
        except WouldWait:  # PostgreSQL (a commit that went through stays final: the route finds it)
            return [None] * len(asks)

    def windows_grouped(
        self, asks: Sequence[tuple[str, int, int]], *, most_values: int
    ) -> list[Window | BaseException | None]:
        """``windows_now`` in a commit thread, for PostgreSQL (``in_commit_thread``), where the
        event loop cannot wait for a round trip: the windows asked in one turn of the loop,
        their steps committed in one transaction (two round trips, one thread's turn, one
        ``COMMIT``, however many runs), each answered once it is durable. The same outcomes as
        ``windows_now``'s: None where it would wait for a run (another thread holds it, or
        another transaction its row) or has big work (the caller asks ``window`` on its own),
        and nothing of it changed. What another process committed to a run is taken in here
        (``Committer.advance_now``).
        """
        outcomes: list[Window | BaseException | None] = [None] * len(asks)
        todo: list[tuple[int, str, int, int]] = []  # (ask, run, its window's end, its step)
        committing: set[str] = set()  # the runs in todo
        again: list[int] = []
        for i, (run_id, step, ahead) in enumerate(asks):
            state = self.runs.loaded(run_id)
            if state is None:
                continue
            if (min(ahead, self._ahead_cap(state)) + 1) * state.n_groups > most_values:
                continue
            window = self.cached_window(run_id, step, ahead)
            if window is not None:
                outcomes[i] = window
                continue
            if run_id in committing:
                again.append(i)
                continue
            if not self._within_reach(state, step):
                continue  # far: its check reads the stored run and its steps are big work
            try:
                self._check_jump(state, step)
            except LRServeError as exc:
                outcomes[i] = exc
                continue
            end = self._end_asked(state, step, ahead)
            todo.append((i, run_id, end, step))
            committing.add(run_id)
        done = self.committer.advance_now([(run_id, end, step) for _, run_id, end, step in todo])
        for (i, run_id, end, step), outcome in zip(todo, done, strict=True):
            state = self.runs.loaded(run_id)
            if outcome is not None:
                outcomes[i] = None if isinstance(outcome, WouldWait) else outcome
            elif state is not None:
                end = min(end, max(state.horizon, step))
                values = _held(state, step, end)  # None: old steps to replay, the route's work
                outcomes[i] = None if values is None else self._window(state, step, end, values)
        for i in again:
            outcomes[i] = self.cached_window(*asks[i], most_values=most_values)
        return outcomes

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
        end = self._end_asked(state, step, ahead)
        if end > state.horizon:
            self.committer.commit(run_id, end, if_behind=True, need=step)
        state = self.state(run_id)
        end = min(end, max(state.horizon, step))
        return self._window(state, step, end, _held(state, step, end))

    def _window(self, state: RunState, step: int, end: int, values: list[Values] | ValueLog | None = None,
                ) -> Window:
        if values is None:
            values = self.values_between(state.run_id, step, end)
        spikes = state.spikes_between(step, end) if state.engine.spikes else []
        return Window(state.run_id, step, values, state.status, state.stopped_at, state.switched_at,
                      state.watching, self._ahead_cap(state), spikes)

    def budget_steps(self, state: RunState) -> int:
        """The most steps from the run's horizon one request may compute (work budget), priced
        by the schedule that takes each (``RunState.prices``: a dearer one from where a
        ``replace_schedule`` placed ahead switches to it). Cached per plan while none is placed
        ahead; with one, the count depends on the horizon, and is priced again (a few switches)."""
        prices = state.prices
        if prices.switches:
            return prices.steps_within(state.horizon, self.settings.work_budget)
        cached = state.budget_steps
        if cached is None or cached[0] is not prices:
            steps = prices.steps_within(state.horizon, self.settings.work_budget)
            state.budget_steps = cached = (prices, steps)
        return cached[1]

    def _ahead_cap(self, state: RunState) -> int:
        """The most steps a window may hold after its first: ``max_ahead``, cut to the work budget."""
        return min(self.settings.max_ahead, self.budget_steps(state) - 1)

    def _within_reach(self, state: RunState, step: int) -> bool:
        """Whether ``step`` is within the jump limit and the work budget of this process's
        horizon: allowed with no read of the stored run (``_check_jump``)."""
        return step <= state.horizon + min(self.settings.max_jump, self.budget_steps(state))

    def _check_jump(self, state: RunState, step: int) -> None:
        """Refuse steps too far beyond the horizon: the stored one, which other processes may
        have moved past this one's cached horizon (so every replica answers alike)."""
        if step < 0:
            raise InvalidInput.at("step", f"must be >= 0, got {step}")
        if self._within_reach(state, step):
            return
        horizon = max(state.horizon, self.store.read_run(state.run_id).horizon)
        if step > horizon + self.settings.max_jump:
            raise InvalidInput.at(
                "step",
                f"step {step} is more than {self.settings.max_jump} steps beyond the horizon "
                f"({horizon}); step through the steps between first",
            )
        cost.check(  # always: ``most`` was priced from this process's horizon, not the stored one
            f"reaching step {step} from the horizon ({horizon}) on {state.n_groups} param groups",
            "step", state.prices.work(horizon, step), self.settings.work_budget,
        )

    def _end_asked(self, state: RunState, step: int, ahead: int) -> int:
        """The last step a window asked at ``step`` commits: ``ahead`` under its cap, before a
        step the schedule is known to fail at, and within the work budget from the horizon."""
        wanted = self._before_failure(state.run_id, step + min(ahead, self._ahead_cap(state)))
        return max(step, min(wanted, state.horizon + self.budget_steps(state)))

    def _window_end(self, state: RunState, step: int, ahead: int) -> int:
        """The last step of the window asked at ``step`` (capped), when ``step`` is the first free one."""
        end = min(step + min(ahead, self._ahead_cap(state)), step + self.settings.max_jump)
        return max(step, self._before_failure(state.run_id, end))

    def _before_failure(self, run_id: str, end: int) -> int:
        """``end``, or the step before the one the run's schedule is known to fail at if that is less."""
        fails_at = self.runs.fails_at.get(run_id)
        return end if fails_at is None else min(end, fails_at - 1)

    def step_run(
        self, run_id: str, step: int, metrics: Mapping[str, float], rank: int, ahead: int
    ) -> Window:
        """Commit ``step`` with the metrics reported with it (API.md ``POST .../step``).

        Metrics for a step that is already final are recorded for history only. A step
        without metrics at or below the cached horizon touches no database (the hot path).
        """
        state = self.state(run_id)
        self._check_jump(state, step)
        records = metric_records(metrics, step, rank)
        watched = {k: float(v) for k, v in metrics.items() if k in state.watched}
        reports = guard_reports(state, records)
        if step > state.horizon:
            # One write transaction: the metrics, the decision and the whole window asked for.
            end = self._window_end(state, step, ahead)
            metric = (step, watched) if watched else None
            self.committer.commit(run_id, end, metric=metric, records=records, reports=reports, need=step)
        elif reports:
            self.committer.commit(run_id, state.horizon, records=records, reports=reports)
        elif records:
            self.store.append_metrics(run_id, records)
        return self.window(run_id, step, ahead)

    # -- the metric barrier -------------------------------------------------------------

    def report_ranks_to_barrier(
        self, run_id: str, step: int, reports: Sequence[RankReport], ahead: int = 0
    ) -> bool:
        """Keep ranks' reports (all their metrics for history, the watched ones for the
        barrier, in one transaction); the report that completes the barrier decides it, and
        commits the window it asks for (``ahead``) with the decision.

        Returns:
            True once ``step`` is final (decided here or already before).

        Raises:
            InvalidInput: ``step`` jumps too far beyond the horizon (as ``step_run`` would say).
        """
        state = self.state(run_id)
        self._check_jump(state, step)
        records: list[MetricRecord] = []
        for report in reports:
            rank_records = metric_records(report.metrics, step, report.rank)
            guarded = guard_reports(state, rank_records)
            if guarded:  # judged per rank, not at the barrier: placed now, at step (or the first free one)
                self.committer.commit(run_id, state.horizon, reports=guarded)
            records += rank_records
        watched: dict[int, Mapping[str, float]] = {}
        for report in reports:
            watched.setdefault(report.rank, report.watched)  # a rank's first report stands
        if self.store.one_writer:  # SQLite: writers take turns, so this tally has every report too
            tally = self.store.add_barrier_reports(run_id, step, watched, records)
            return self._settle_barrier(state, step, tally, timed_out=False, ahead=ahead)
        # PostgreSQL: under the run's row lock, so the reports that complete the barrier see every
        # other report and decide in their own transaction (else two last reports may miss each
        # other, and the decision is a second transaction)
        return self.committer.report_to_barrier(
            run_id, step, watched, records,
            lambda locked, tally: self._barrier_decision(locked, step, tally, False, ahead))

    def resolve_barrier(self, run_id: str, step: int, timed_out: bool, ahead: int = 0) -> bool:
        """Decide the barrier at ``step`` if every rank reported (or time is up).

        The store is asked because ranks may report to other processes or replicas.

        Returns:
            True once ``step`` is final (decided here, by another request, or elsewhere).
        """
        state = self.state(run_id)
        if state.horizon >= step:
            return True
        tally = self.store.read_barrier(run_id, step)
        if tally.horizon >= step:  # decided by another process: its window, here for every rank waiting
            self.committer.caught_up(run_id)
            return True
        return self._settle_barrier(state, step, tally, timed_out, ahead)

    def _settle_barrier(
        self, state: RunState, step: int, tally: BarrierTally, timed_out: bool, ahead: int
    ) -> bool:
        if state.horizon >= step or tally.horizon >= step:
            return True
        decision = self._barrier_decision(state, step, tally, timed_out, ahead)
        if decision is None:
            return False
        self.committer.commit(state.run_id, decision.target, metric=decision.metric,
                              extra_events=decision.extra_events, need=step)
        return True

    def _barrier_decision(
        self, state: RunState, step: int, tally: BarrierTally, timed_out: bool, ahead: int
    ) -> BarrierDecision | None:
        """The decision ``tally`` calls for: the ranks' rank-order means (the missing ranks named
        once time is up) and the window asked for; None while ranks are missing, or once
        ``step`` is final."""
        if state.horizon >= step or tally.horizon >= step:
            return None
        reports = tally.reports
        if len(reports) < state.world_size and not timed_out:
            return None
        missing = [r for r in range(state.world_size) if r not in reports]
        extra = []
        if missing:
            extra.append(NewEvent(EventKind.BARRIER_TIMEOUT, step, {
                "missing_ranks": missing, "reported_ranks": sorted(reports),
                "timeout_s": self.settings.barrier_timeout_s}))
        means = _rank_order_means(reports)
        return BarrierDecision(self._window_end(state, step, ahead), (step, means), extra)

    # -- operator control -----------------------------------------------------------------

    def control(
        self,
        run_id: str,
        request: Mapping[str, Any],
        at_step: int | None,
        *,
        actor: str = LOCAL_ACTOR,
        reason: str | None = None,
    ) -> tuple[int, NewEvent]:
        """Record an operator action (``request``: its fields as ``POST .../control`` takes
        them) at ``at_step`` (default: the first free step).

        ``actor`` and ``reason`` go on the ``control`` event and on the ``status`` event it
        causes.

        Returns:
            The step it applies at, and the ``control`` event recorded there.
        """
        for _ in range(LOAD_TRIES):
            state = self.state(run_id)
            try:
                return self._control_on(state, request, at_step, actor, reason)
            except RunReplacedMeanwhile:  # deleted and created anew by another process: check it again
                continue
            except (InvalidInput, RunConflict):  # refused by the run this process holds: the stored one?
                if state.created_at is None or still_the_run(self.store, run_id, state.created_at):
                    raise
                self.runs.evict(state)  # deleted and created anew meanwhile: ask the new run
        raise RunConflict(f"run {run_id!r} was deleted and created anew at each of {LOAD_TRIES} tries "
                          "while this action was placed; send it again")

    def _control_on(
        self, state: RunState, request: Mapping[str, Any], at_step: int | None, actor: str, reason: str | None
    ) -> tuple[int, NewEvent]:
        """``control``, the action checked against the run ``state`` holds and placed on that run
        only (``RunReplacedMeanwhile``: it is not the stored one any more)."""
        if state.status is RunStatus.STOPPED:  # for good; another replica may know it first (commit)
            raise RunConflict(f"run {state.run_id!r} is stopped; it takes no more actions")
        refuse_after_a_stop(state, state.horizon + 1 if at_step is None else at_step)
        action = action_for_run(
            request, n_groups=state.n_groups, reports_momentum=state.engine.reports_momentum,
            check_cost=lambda s: self._check_schedule_cost(s, state.n_groups),
        )
        placing = PlacedAction(at_step, action, actor, reason)
        placed = self.committer.commit(state.run_id, state.horizon, action=placing, of_run=state.created_at)
        assert placed is not None
        return placed, NewEvent(EventKind.CONTROL, placed, placing.payload, actor, reason)

    def record_metrics(self, run_id: str, records: Sequence[Mapping[str, Any]]) -> int:
        """Store history-only metrics (idempotent per name, step and rank)."""
        state = self.state(run_id)  # 404 for an unknown run
        rows = [MetricRecord(r["name"], r["step"], r["rank"], float(r["value"])) for r in records]
        reports = guard_reports(state, rows)
        if not reports:
            return self.store.append_metrics(run_id, rows)
        if self.store.must_not_wait:  # two transactions: the second must not find the first done
            raise WouldWait("a spike guard judges these metrics")
        new = self.store.append_metrics(run_id, rows)  # first, to count the new ones; resends are
        self.committer.commit(run_id, state.horizon, reports=reports)  # judged once (spike_guard.Detector)
        return new


def _held(state: RunState, step: int, end: int) -> list[Values] | ValueLog | None:
    """``state.held_between``; a window of more than ``ON_LOOP_VALUES`` values packed
    (``held_packed``), so that its answer is written from its doubles, no float object made
    (half a million for 485 steps of 1,024 groups)."""
    if (end - step + 1) * state.n_groups > ON_LOOP_VALUES:
        packed = state.held_packed(step, end)
        if packed is not None:
            return packed
    return state.held_between(step, end)


class SpecConflict(RunConflict):
    """A create's ``RunConflict``: the run is stored with another spec (``record``, as read)."""

    def __init__(self, record: RunRecord) -> None:
        super().__init__(
            f"run {record.run_id!r} already exists with a different spec; pick another run_id", errors=[])
        self.record = record


def checked_spec(request: Mapping[str, Any], work_budget: int) -> RunSpec:
    """Every check of a create (the spec, its cost, the first steps), as big work runs it (in a
    worker process: ``service.offload``): the request's ``RunSpec``, pickled back with its
    expressions compiled (``Expression``), so the server builds the run's engine without
    compiling them again."""
    parsed = RunSpec.from_request(
        request, check_cost=lambda schedule, n_groups: check_schedule_cost(schedule, n_groups, work_budget)
    )
    _first_steps(parsed)
    return parsed


def check_schedule_cost(schedule: Any, n_groups: int, work_budget: int) -> None:
    """Refuse a schedule whose checks (expressions at steps 0..100, the first steps) are over budget."""
    units = cost.cost(schedule, n_groups=n_groups, steps=cost.CREATE_STEPS)
    cost.check(
        f"checking this schedule ({cost.CREATE_STEPS} steps on {n_groups} param groups)",
        "schedule", units, work_budget,
    )


def _first_steps(spec: RunSpec) -> None:
    """Build the run's engine and take steps 1 and 2: a schedule that cannot start is a 422 at create.

    Raises:
        ScheduleError: torch refuses the schedule on these LRs, or a value of step 0, 1 or 2
            would be negative or not finite (e.g. ExponentialLR with gamma 1e308).
    """
    engine = spec.new_engine()
    engine.check_values(0, "the schedule's")
    for _ in range(2):
        engine.advance()


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


SPECS_KEPT = 256
"""Create requests' specs a process keeps, checked (``CheckedSpecs``)."""
SPECS_KEPT_BYTES = 32 << 20
"""At most about this much memory for them (``kept_bytes``: a spec's text is up to the body
limit, 1 MiB by default, and 256 of those would be GiBs kept for good): about four of the
biggest specs, or all 256 of small ones."""
KEPT_BYTES_PER_CHAR = 8
"""Bytes a kept spec holds per character of its key, the key included: its parsed values
(a float 32 B, against ``0.1, ``'s 5 characters) measured with ``tracemalloc`` at 1.6
(1024 groups of random floats) to 6.5 (of ``0.1``) and 6.0 (10,000 milestones), plus 1 for
the key."""
KEPT_BYTES_EACH = 1024
"""And per kept spec: a small spec's dicts (``StepLR`` on one group: 700 B, key 53 characters)."""


def kept_bytes(key: str) -> int:
    """About the memory a spec kept by ``key`` holds, or more (its refusal holds less)."""
    return KEPT_BYTES_EACH + KEPT_BYTES_PER_CHAR * len(key)


Checked = dict[str, Any] | InvalidInput
"""A create request's spec checked: its stored form (``RunSpec.to_json``), or its refusal."""


ON_LOOP_SPEC_CHARS = 16 << 10
"""Most characters (as JSON) of a create's spec that joins its run on the event loop: the join
computes its key (``repr``) and decodes the stored run's spec, 0.2 ms at 3.7 k characters,
0.8 ms at 15 k, 7.8 ms at 59 k and 15 ms at 215 k (SQLite, load 4.5), once per rank; bigger
ones join in a worker thread."""


def _small_spec(request: Mapping[str, Any]) -> bool:
    """Whether the request's spec is at most ``ON_LOOP_SPEC_CHARS`` (as JSON: 0.26 ms for 215 k
    characters, against 5-8 ms for its ``repr``)."""
    try:
        text = orjson.dumps((request["schedule"], request["base_lrs"], request.get("base_momentums")))
    except orjson.JSONEncodeError:  # an int over 64 bits: no join on the loop
        return False
    return len(text) <= ON_LOOP_SPEC_CHARS


def _spec_key(request: Mapping[str, Any]) -> str:
    """What a create request's stored spec depends on, as text: equal texts, equal values
    (``repr`` tells ``1`` from ``1.0`` and ``True``, NaN from ``None``; a dict's key order
    counts, which at worst makes two equal specs two entries)."""
    return repr((request["schedule"], request["base_lrs"], request.get("base_momentums"),
                 request.get("world_size")))


class CheckedSpecs:
    """The stored specs (``RunSpec.to_json``) of create requests this process checked, by
    ``_spec_key``, the last ``size`` of them and at most about ``max_bytes`` of memory
    (``kept_bytes``, measured): every rank of a job sends its create with the
    same spec, and a join compares it with the stored run's without checking the schedule
    again (parsing it, its rules and cost). Checking is a function of the request's spec (the
    key's fields) and the settings alone, so a kept spec is what checking again would give; a
    spec a check refused (``InvalidInput``: its rules, its cost, its first steps) is kept as
    that refusal, raised again to every rank without checking it again. The specs kept are
    shared: never changed in place. Thread safe.
    """

    def __init__(self, size: int, max_bytes: int = SPECS_KEPT_BYTES) -> None:
        self._kept: Lru[str, Checked] = Lru(max_bytes, lambda key, _: kept_bytes(key), most_items=size)

    def get(self, key: str) -> Checked | None:
        return self._kept.get(key, touch=True)

    def put(self, key: str, spec: Checked) -> Checked:
        """Keep ``spec`` (the least recently asked go first, past ``size`` of them or
        ``max_bytes`` of ``kept_bytes``; one bigger than ``max_bytes`` alone is not kept); returns it."""
        self._kept.put(key, spec)
        return spec
