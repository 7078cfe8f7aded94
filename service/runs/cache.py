"""``RunCache``: the runs this process has loaded, each loaded once from the log.

A run's state is built from its latest snapshot (or its spec) and the stored events that
change it (``replay.apply_stored_inputs``: every operator action, the metrics placed above
the snapshot's step), kept while the process lives, and dropped (``evict``) when a
commit fails half-way or the run is deleted: threads that still hold a dropped state see
``evicted`` and take the reloaded one.
"""

from __future__ import annotations

import threading
import weakref
from datetime import datetime
from typing import NoReturn

from lrserve.service.engine import codec
from lrserve.service.engine.engine import Engine, Values
from lrserve.service.engine.run_spec import RunSpec
from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import RunConflict, StoreUnavailable
from lrserve.service.runs.replay import apply_stored_inputs
from lrserve.service.runs.state import Marks, Replayed, RunState
from lrserve.service.store.base import BaseStore, RunRecord, Snapshot, WouldWait

LOAD_TRIES = 3
"""Loads of a run read again, at most, when it was deleted and created again between the
reads of one (``RunCache._load``)."""


def still_the_run(store: BaseStore, run_id: str, created_at: datetime) -> bool:
    """Whether the run is still the one created at ``created_at``, read from its row now: another
    process may have deleted it and created it again since something was read of it (its seqs
    count from 1 again), the one question a load, a catch-up and a history's events ask after
    their reads (``RunNotFound``: deleted)."""
    return store.run_head(run_id).created_at == created_at


class RunCache:
    """Loads runs lazily and keeps them; event loop safe where a method says so."""

    def __init__(self, store: BaseStore, *, snapshot_every: int) -> None:
        self.store = store
        self.snapshot_every = snapshot_every  # steps a read's replay may go on to keep what it replayed
        self._runs: dict[str, RunState] = {}
        # Only while some thread holds or waits for it: an entry per unknown or deleted run id
        # asked for would otherwise outlive its request (weak values; see ``RunLock``).
        self._load_locks: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        # Runs whose schedule fails at a step above the horizon: windows stop before it (so
        # each one does not fail, drop the engine and reload again). One entry per such run.
        self.fails_at: dict[str, int] = {}

    def __len__(self) -> int:
        """How many runs this process holds in memory."""
        return len(self._runs)

    def loaded(self, run_id: str) -> RunState | None:
        """The run's state if this process has loaded it; never blocks (event loop safe)."""
        return self._runs.get(run_id)

    def state(self, run_id: str) -> RunState:
        """The run's in-memory state, loaded from the log on first use."""
        state = self._runs.get(run_id)
        if state is not None:
            return state
        if self.store.must_not_wait:
            raise WouldWait(f"run {run_id!r} is not loaded")
        with self.run_lock(run_id):
            state = self._runs.get(run_id)
            if state is None:
                state = self._load(run_id)
                with self._lock:
                    self._runs[run_id] = state
        return state

    def created(self, record: RunRecord, spec: RunSpec) -> None:
        """Keep the run this process just created (its one event, ``created``, changes no
        state), of ``spec``, its checked ``RunSpec`` (``record.spec`` is its stored form): its
        first use needs no load from the log, nor the spec parsed again. A state already kept
        of the same run stays (another thread may have loaded it, and stepped it, meanwhile);
        one of an earlier run of that id, deleted by another process since, goes (``evict``):
        its final values are not this run's."""
        state = fresh_state(record, None, spec)
        state.created_at = record.created_at
        state.last_seq = record.last_seq
        with self._lock:
            kept = self._runs.get(record.run_id)
            if kept is not None and kept.created_at == record.created_at:
                return
            if kept is not None:
                kept.evicted = True
            self._runs[record.run_id] = state

    def run_lock(self, run_id: str) -> RunLock:
        """This process's lock for creating or loading one run (once, however many ask).

        The entry lives as long as a caller holds the returned object, so every thread that
        asks while another holds or waits for it gets the same lock.
        """
        with self._lock:
            lock = self._load_locks.get(run_id)
            if lock is None:
                lock = self._load_locks[run_id] = RunLock()
            return lock

    def evict(self, state: RunState) -> None:
        """Drop ``state`` for good: threads that still hold it must not use it (see ``commit``)."""
        state.evicted = True
        with self._lock:
            if self._runs.get(state.run_id) is state:
                del self._runs[state.run_id]

    def forget(self, run_id: str) -> None:
        """The run was deleted: drop its state and what this process knew of it."""
        self.fails_at.pop(run_id, None)
        state = self._runs.get(run_id)
        if state is not None:
            self.evict(state)

    def _load(self, run_id: str) -> RunState:
        """The run as stored: its row, its latest snapshot, the inputs after it, read one after
        the other, then its row's ``created_at`` once more: a run deleted and created again
        between the reads (by another process) would mix two runs' logs, so such a load is
        read again (a run replaced at each of ``LOAD_TRIES`` tries: a 409), and so is one
        whose mixed reads did not even make a state (another run's snapshot, say)."""
        for _ in range(LOAD_TRIES):
            record = self.store.read_run(run_id)
            try:
                state = fresh_state(record, self.store.load_snapshot(run_id, max_step=record.horizon))
                state.created_at = record.created_at
                apply_stored_inputs(state, self.store, run_id, through_seq=record.last_seq)
            except StoreUnavailable:
                raise
            except Exception:  # another run's snapshot or log, say: read again if it was replaced
                if still_the_run(self.store, run_id, record.created_at):
                    raise
                continue
            if still_the_run(self.store, run_id, record.created_at):
                state.advance_to(record.horizon)
                state.publish()
                return state
        raise RunConflict(f"run {run_id!r} was deleted and created again while it loaded, "
                          f"{LOAD_TRIES} times: ask again")

    def _replaced(self, state: RunState) -> NoReturn:
        """``state``'s run was deleted and created again since it loaded, or while its steps are
        read: drop it (the next request loads the new run) and say so."""
        self.evict(state)
        raise RunConflict(f"run {state.run_id!r} was deleted and created again while its steps were "
                          "read: ask again")

    def values_between(self, run_id: str, start: int, end: int) -> list[Values]:
        """Final values of steps ``start..end`` (all at or below the horizon), replaying if needed.

        Steps below the state's ``first_step`` (a run loaded from a snapshot) are replayed
        from the snapshot at or below ``start``, once: the replay goes on to the first step
        already held and is kept (``RunState.replayed``), so the next read of those steps, in
        any thread or on the event loop, is a copy from memory. Where going on would cost more
        than twice the read's own replay (and more than ``snapshot_every`` steps), the read
        replays only its own steps and keeps nothing: a read's work stays bounded by what it
        asks for.
        """
        state = self.state(run_id)
        held = state.held_between(start, end)
        if held is not None:
            return held
        if self.store.must_not_wait:
            raise WouldWait("replaying steps is no work for the event loop")
        with state.replaying:  # one replay of a run at a time: the next one finds it kept
            held = state.held_between(start, end)
            if held is not None:
                return held
            record = self.store.read_run(run_id)
            if record.created_at != state.created_at:
                self._replaced(state)
            kept = state.replayed
            until = (state.first_step if kept is None else kept.first) - 1  # the last step not held
            try:
                replay = fresh_state(record, self.store.load_snapshot(run_id, max_step=start))
                apply_stored_inputs(replay, self.store, run_id, through_seq=record.last_seq,
                                    through_step=max(end, until))  # the last step it may replay
            except StoreUnavailable:
                raise
            except Exception:  # another run's snapshot or log, say: a 409 if it was replaced
                if not still_the_run(self.store, run_id, record.created_at):
                    self._replaced(state)
                raise
            if not still_the_run(self.store, run_id, record.created_at):
                self._replaced(state)
            own = end - replay.first_step + 1
            joins = end <= state.horizon and replay.first_step <= until  # what it replays meets what is held
            if not joins or until - replay.first_step + 1 > max(2 * own, self.snapshot_every):
                replay.advance_to(end)
                replay.publish()
                return replay.values[start - replay.first_step : end - replay.first_step + 1]
            replay.advance_to(until)
            replay.publish()
            values = replay.values if kept is None else replay.values.joined(kept.values)
            state.replayed = Replayed(replay.first_step, values)
        held = state.held_between(start, end)
        assert held is not None, "steps replayed up to those held"
        return held


def fresh_state(record: RunRecord, snapshot: Snapshot | None, spec: RunSpec | None = None) -> RunState:
    """The run's state at its snapshot's step (step 0 without one), before any event is applied;
    ``spec``: its ``RunSpec`` where the caller holds it (its create's), else parsed from the record."""
    spec = spec if spec is not None else RunSpec.from_stored(record.spec)
    if snapshot is None:
        return RunState(record.run_id, spec, spec.new_engine(), last_seq=0)
    saved = codec.from_jsonable(snapshot.state)
    state = RunState(record.run_id, spec, Engine.restore(saved["engine"]), last_seq=0)
    state.restore_marks(Marks(RunStatus(saved["status"]), saved["stopped_at"], saved.get("switched_at")))
    return state


class RunLock:
    """A ``threading.Lock`` that a ``WeakValueDictionary`` can hold (a bare lock takes no weak reference)."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
