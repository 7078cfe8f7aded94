"""The storage contract shared by the SQLite and PostgreSQL backends.

A store keeps, per run: one row (spec, labels, status, horizon), an append-only
event log, optional engine snapshots, metric history and metric-barrier reports.

Contract (every backend, every process):

- **Per-run ordering.** Events of one run get consecutive ``seq`` numbers from 1, in
  the order their transactions committed. Events are never changed or deleted
  (except with their run).
- **Global ids.** Every event also gets a ``gid``, increasing across all runs and
  processes in commit order (``read_feed`` reads them in that order).
- **One writer per run at a time.** ``lock_run`` opens a transaction that holds the
  run's lock (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL)
  until it commits; everything written through it lands together or not at all.
  Other runs are not blocked (PostgreSQL) or only for the commit (SQLite).
- **Durability.** When a write method or a ``lock_run`` block returns, the data
  survives a ``kill -9`` of the process.
- **Immutability of answers.** Returned objects are frozen snapshots; they never
  change under the caller.
- **Thread and process safety.** A store object may be shared by all threads of a
  process; several processes may open the same database.
"""

from __future__ import annotations

import abc
import sys
from array import array
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from lrserve.service.engine.status import RunStatus
from lrserve.service.store.events import Event, EventKind, FeedEntry, NewEvent


class WouldWait(Exception):
    """Raised, inside ``BaseStore.without_waiting()``, where the store would have to wait (for
    the write slot another thread or process holds, for the network): nothing was written."""


class Lock(Protocol):
    """What ``held`` needs of a lock (``threading.Lock``, ``threading.RLock``)."""

    def acquire(self, blocking: bool = ...) -> bool: ...

    def release(self) -> None: ...


class held:
    """Hold ``lock`` (``None``: nothing) for the block; ``now``: only if it is free at once,
    else ``WouldWait`` naming ``what`` another thread holds.

    A class, not a generator ``contextmanager``: it is entered twice per commit, and a
    generator's set-up and teardown cost several times the lock itself."""

    __slots__ = ("_lock", "_now", "_what")

    def __init__(self, lock: Lock | None, *, now: bool, what: str) -> None:
        self._lock, self._now, self._what = lock, now, what

    def __enter__(self) -> None:
        if self._lock is not None and not self._lock.acquire(blocking=not self._now):
            raise WouldWait(f"another thread holds {self._what}")

    def __exit__(self, *_: object) -> None:
        if self._lock is not None:
            self._lock.release()


@dataclass(frozen=True)
class RunRecord:
    """A run's row. ``spec`` is the create request (schedule, base_lrs, ...), immutable."""

    run_id: str
    spec: dict[str, Any]
    labels: dict[str, str]
    status: RunStatus
    horizon: int
    last_seq: int
    created_at: datetime
    updated_at: datetime
    last_seen: datetime | None = None
    """When any rank last asked the server about the run (flushed in batches; None: never)."""


@dataclass(frozen=True)
class RunHead:
    """What says whether a run moved: the fields of its row a commit compares (``run_head``)."""

    created_at: datetime
    horizon: int
    last_seq: int


@dataclass(frozen=True)
class LockedRun:
    """A run's row as a writer holding its lock sees it (``RunTransaction.run``): what a commit
    compares (``RunHead``'s fields) and what it changes; not the spec, labels or times."""

    run_id: str
    status: RunStatus
    horizon: int
    last_seq: int
    created_at: datetime


@dataclass(frozen=True)
class HistoryMark:
    """What a run's history (``GET .../history``) is made of, in four numbers: its row's
    ``created_at`` (a run deleted and created again), ``horizon`` (its final LRs),
    ``last_seq`` (its events) and how many metric rows it has (``history_mark``), counted up
    to one past ``MARK_METRIC_ROWS``.

    Each only grows while the run exists: final values never change, events and metric rows
    are only appended (a metric already stored is kept as it was). So two equal ``exact``
    marks mean the same history, and an answer built after reading a mark is at least that
    new. A mark that is not ``exact`` (more metric rows than it counts) tells nothing: no
    answer is kept under it."""

    created_at: datetime
    horizon: int
    last_seq: int
    metric_rows: int

    @property
    def exact(self) -> bool:
        """Whether every metric row was counted (so an equal mark means the same history)."""
        return self.metric_rows <= MARK_METRIC_ROWS


MARK_METRIC_ROWS = 100_000
"""Most metric rows a ``HistoryMark`` counts (a few ms on the primary key), so that reading a
mark costs no more however long the run: a run with more builds each history anew, at the
cost its ``max_points`` bounds (``ReadModels.history``)."""


MetricRow = tuple[int, int, float]
"""A metric's ``(step, rank, value)``."""


@dataclass(frozen=True)
class MetricEnds:
    """A metric's first rows and, where it has more, the rows of its last step (``metric_ends``)."""

    name: str
    head: list[MetricRow]
    last: list[MetricRow]  # empty when ``head`` is all of it


@dataclass(frozen=True)
class ValueChunk:
    """Final LRs of steps ``first_step .. first_step + steps - 1``, packed (see ``value_chunks``)."""

    first_step: int
    steps: int
    groups: int
    lrs: bytes

    def pieces(self, max_bytes: int) -> list[ValueChunk]:
        """This chunk as consecutive chunks of at most ``max_bytes`` each (at least one step):
        the same steps and bytes, each piece found by ``read_lrs`` as the chunk is."""
        width = self.groups * 8
        per = max(1, max_bytes // max(1, width))
        return [ValueChunk(self.first_step + start, min(per, self.steps - start), self.groups,
                           self.lrs[start * width:(start + per) * width])
                for start in range(0, self.steps, per)] or [self]


def pack_lrs(lrs: array[float]) -> bytes:
    """An ``array('d')`` of LRs as ``value_chunks.lrs`` bytes (float64, little-endian)."""
    if sys.byteorder == "big":
        lrs = array("d", lrs)
        lrs.byteswap()
    return lrs.tobytes()


def unpack_lrs(data: bytes) -> array[float]:
    """``pack_lrs``'s bytes back into an ``array('d')`` (bit for bit)."""
    lrs = array("d")
    lrs.frombytes(data[: len(data) - len(data) % 8])
    if sys.byteorder == "big":
        lrs.byteswap()
    return lrs


@dataclass(frozen=True)
class Snapshot:
    """Engine state after applying events up to ``seq`` and stepping to ``step``; ``text``:
    ``state`` as JSON where the caller wrote it already (``codec.encoded``), else the store does."""

    step: int
    seq: int
    state: dict[str, Any]
    text: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BarrierTally:
    """A metric barrier as stored: the run's horizon and the reports for one step."""

    horizon: int
    reports: dict[int, dict[str, float]]
    """rank -> {metric name: value}."""


@dataclass(frozen=True)
class MetricRecord:
    """One logged value; ``(run_id, name, step, rank)`` identifies it, so retries are harmless."""

    name: str
    step: int
    rank: int
    value: float


class RunTransaction(abc.ABC):
    """A run locked for writing; obtained from ``BaseStore.lock_run`` (or ``lock_runs``)."""

    run: LockedRun
    """The run's row as read under the lock (the columns a writer compares and changes), then
    as this transaction's own writes left it."""
    dirty: bool = False
    """Whether a write went through it (an error after one spoils the whole transaction)."""

    @abc.abstractmethod
    def read_events(self, after_seq: int = 0) -> list[Event]:
        """Events with ``seq > after_seq``, in order."""

    @abc.abstractmethod
    def append_events(self, events: Sequence[NewEvent]) -> list[Event]:
        """Append events after the last one; returns them with ``seq`` and ``at`` set (their
        ``gid`` is None: global ids are given at commit, in commit order)."""

    def add_events(self, events: Sequence[NewEvent]) -> None:
        """``append_events`` for a writer that needs only the run's new ``last_seq`` (``run``):
        the events as stored are not made (a commit's, each request's)."""
        self.append_events(events)

    @abc.abstractmethod
    def append_metrics(self, records: Sequence[MetricRecord]) -> None:
        """Record metric values with this transaction (as ``BaseStore.append_metrics``; how many
        were new is not known before the commit: PostgreSQL's pipelined commit waits for no
        statement's answer but the run's row)."""

    @abc.abstractmethod
    def update_run(self, *, horizon: int | None = None, status: RunStatus | None = None) -> None:
        """Set the horizon and/or status (``updated_at`` follows). The horizon never goes down."""

    @abc.abstractmethod
    def add_barrier_reports(self, step: int, reports: Mapping[int, Mapping[str, float]]) -> BarrierTally:
        """Record ranks' reports for ``step`` (a rank's first report of a name stands) and read
        the barrier back under the run's lock: every report committed before this transaction
        took it is in the tally, so the reports that complete a barrier see that they do (as
        ``BaseStore.add_barrier_reports``, whose tally may miss a report committed meanwhile)."""


class BaseStore(abc.ABC):
    """Persistent state of every run. See the module docstring for the contract."""

    @abc.abstractmethod
    def create_run(
        self, run_id: str, spec: Mapping[str, Any], labels: Mapping[str, str], created: NewEvent
    ) -> tuple[RunRecord, bool]:
        """Create a run with its first event, unless it exists.

        Returns:
            The run's record and ``True`` if this call created it, or the existing
            record and ``False`` (the caller compares specs).
        """

    @abc.abstractmethod
    def read_run(self, run_id: str) -> RunRecord:
        """Raises:
        RunNotFound: no such run.
        """

    @abc.abstractmethod
    def list_runs(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        after: str | None = None,
        stale_before: datetime | None = None,
    ) -> list[RunRecord]:
        """Runs ordered by ``run_id``, those after ``after`` (the cursor), matching every label.

        ``stale_before``: only active runs last seen (or, never seen, last updated) before it.
        """

    @abc.abstractmethod
    def mark_seen(self, seen: Mapping[str, datetime]) -> None:
        """Move each run's ``last_seen`` forward to the given time (never back; unknown runs are skipped)."""

    @abc.abstractmethod
    def count_by_status(self, *, stale_before: datetime) -> dict[str, int]:
        """How many runs are ``active``, ``held``, ``stopped``, and ``stale`` (active, not seen
        since ``stale_before``)."""

    @abc.abstractmethod
    def count_runs(self) -> int:
        """How many runs exist."""

    @abc.abstractmethod
    def delete_run(self, run_id: str) -> None:
        """Delete a run and everything of it. Raises RunNotFound."""

    @abc.abstractmethod
    def lock_run(self, run_id: str) -> AbstractContextManager[RunTransaction]:
        """Open a transaction holding the run's lock; commits on exit, rolls back on error.

        Raises:
            RunNotFound: no such run (on enter).
            StoreUnavailable: the database failed.
        """

    @abc.abstractmethod
    def lock_runs(
        self, run_ids: Sequence[str], *, skip_locked: bool = False
    ) -> AbstractContextManager[dict[str, RunTransaction]]:
        """``lock_run`` for several runs in one transaction, for group commit: a transaction
        object per run that exists (a missing one is left out); they commit together on exit,
        or none does. ``skip_locked``: a run whose lock another transaction holds is left out
        too, never waited for (PostgreSQL's row locks; SQLite's lock is the file's).

        Raises:
            StoreUnavailable: the database failed.
        """

    @abc.abstractmethod
    def read_events(self, run_id: str, after_seq: int = 0) -> list[Event]:
        """Events with ``seq > after_seq``, in order, without taking the lock."""

    @abc.abstractmethod
    def read_events_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int = 0, through_seq: int | None = None,
        step: int | None = None, above_step: int | None = None, through_step: int | None = None,
        latest: int | None = None, first: int | None = None,
    ) -> list[Event]:
        """Events of ``kinds`` with ``after_seq < seq <= through_seq``, placed on ``step``, or
        above ``above_step`` and at most ``through_step`` (each bound where given), in order, the
        last ``latest`` of them, or the first ``first``, where given, without taking the lock:
        chosen by the database, not read whole."""

    @abc.abstractmethod
    def payload_sizes_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int, through_seq: int, latest: int
    ) -> list[tuple[int, int]]:
        """``(seq, bytes of its payload's JSON)`` of each event ``read_events_of`` with the same
        arguments reads, in the same order: what reading them costs, known without decoding
        any."""

    @abc.abstractmethod
    def weigh_events_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int, through_seq: int, first: int
    ) -> tuple[int, int]:
        """``(how many, bytes of their payloads' JSON)`` of the first ``first`` events of
        ``kinds`` with ``after_seq < seq <= through_seq`` (those ``read_events_of`` with the same
        arguments reads), summed by the database: one row back, none decoded."""

    @abc.abstractmethod
    def count_events_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int, through_seq: int
    ) -> int:
        """How many events of ``kinds`` have ``after_seq < seq <= through_seq``, counted by the
        database without taking the lock (none decoded)."""

    @abc.abstractmethod
    def steps_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int, first_step: int, last_step: int,
        limit: int,
    ) -> list[int]:
        """The distinct steps ``first_step .. last_step`` on which events of ``kinds`` with
        ``seq > after_seq`` were placed, in step order, the first ``limit`` (found by the
        database: however many events, ``limit`` numbers come back)."""

    @abc.abstractmethod
    def read_feed(self, after_gid: int, limit: int = 500) -> list[FeedEntry]:
        """Events of every run with a global id above ``after_gid``, in id order (at most ``limit``).

        Global ids increase across runs and processes and become visible in increasing
        order: a reader going on from the last id it saw misses nothing committed later.
        """

    @abc.abstractmethod
    def watch_commits(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (from the committing thread) after each commit that added events."""

    @abc.abstractmethod
    def commit_listener(self) -> Callable[[Callable[[], None]], Awaitable[None]] | None:
        """An async function waiting for commits of other processes, calling its argument on
        each, where the database can tell (PostgreSQL ``LISTEN``); else None."""

    def run_head(self, run_id: str) -> RunHead:
        """The run's ``created_at``, ``horizon`` and ``last_seq``, without taking a lock (a
        commit's cheap question: did another process move the run?).

        Raises:
            RunNotFound: no such run.
        """
        record = self.read_run(run_id)
        return RunHead(record.created_at, record.horizon, record.last_seq)

    def history_mark(self, run_id: str) -> HistoryMark:
        """The run's ``HistoryMark`` (whether a history built before still holds).

        Raises:
            RunNotFound: no such run.
        """
        record = self.read_run(run_id)
        rows = sum(len(found) for found in self.read_metrics(run_id).values())
        rows = min(rows, MARK_METRIC_ROWS + 1)
        return HistoryMark(record.created_at, record.horizon, record.last_seq, rows)

    def without_waiting(self) -> AbstractContextManager[None]:
        """Within it, on this thread, every call either goes through at once or raises
        ``WouldWait`` before writing anything (for work on the event loop: ``RunManager.now``).
        This default refuses at once: a store that waits on the network waits for every call."""
        raise WouldWait("this store answers over the network")

    @property
    def must_not_wait(self) -> bool:
        """Whether this thread is inside ``without_waiting()``."""
        return False

    @property
    def connections(self) -> int:
        """How many write transactions this store runs at once at most: more threads committing
        at once would only wait for one (``RunManager.in_commit_thread``). PostgreSQL: its pool's
        connections; SQLite: 1 (``one_writer``)."""
        return 1

    @property
    def one_writer(self) -> bool:
        """Whether write transactions take turns (SQLite: one writer per file), so that one
        transaction for many commits saves each its turn (``GroupCommit``)."""
        return False

    def run_listener(self) -> Callable[[Callable[[str | None], None]], Awaitable[None]] | None:
        """An async function waiting for other processes' commits that touch a run's barrier
        (a rank's report, a decision), calling its argument with the run's id on each, and
        with None once listening (anything may have changed before); returns when the
        connection is lost. Where the database can tell (PostgreSQL ``LISTEN``); else None."""
        return None

    @abc.abstractmethod
    def last_gid(self) -> int:
        """The highest global event id committed so far (0 before the first event)."""

    @abc.abstractmethod
    def save_snapshot(self, run_id: str, snapshot: Snapshot, chunk: ValueChunk | None = None, *,
                      created_at: datetime | None = None) -> None:
        """Keep an engine snapshot (replaces one at the same step), with the LRs since the last one;
        ``created_at``: of the run it is a snapshot of (``RunConflict`` if the run is another)."""

    @abc.abstractmethod
    def read_lrs(self, run_id: str, steps: Sequence[int]) -> dict[int, tuple[float, ...]]:
        """The stored final LRs of those of ``steps`` some ``ValueChunk`` holds (one read per step)."""

    @abc.abstractmethod
    def load_snapshot(self, run_id: str, *, max_step: int | None = None) -> Snapshot | None:
        """The snapshot with the highest step (at most ``max_step``), or None."""

    @abc.abstractmethod
    def snapshot_marks(self, run_id: str, *, after_step: int, through_step: int) -> list[tuple[int, int]]:
        """``(step, seq)`` of the run's snapshots with ``after_step < step <= through_step``, by
        step (their states not read). A snapshot at ``step`` is saved after the commit that made
        it final, with the run's ``last_seq`` then: every event placed at or below ``step`` has a
        seq at or below ``seq``."""

    @abc.abstractmethod
    def append_metrics(self, run_id: str, records: Sequence[MetricRecord]) -> int:
        """Record metric values for history; a record already stored is kept as it was.

        Returns:
            How many records were new.
        """

    @abc.abstractmethod
    def read_metrics(self, run_id: str) -> dict[str, list[MetricRow]]:
        """Every metric of a run: name -> ``(step, rank, value)`` sorted by step, then rank."""

    # Reads of a history's metrics (``ReadModels.history``), each bounded by what it asks,
    # not by the run's rows; rows sorted by step, then rank.

    @abc.abstractmethod
    def metric_names(self, run_id: str, most: int) -> list[str]:
        """The first ``most`` names of the run's metrics, in order."""

    @abc.abstractmethod
    def metric_ends(self, run_id: str, names: Sequence[str], rows: int) -> list[MetricEnds]:
        """For each of ``names`` (in order): its first ``rows`` rows, and, where it has that
        many, the rows of its last step (its first ``rows`` ranks)."""

    @abc.abstractmethod
    def metric_rows_at(
        self, run_id: str, name: str, steps: Sequence[int], ranks: Sequence[int]
    ) -> list[MetricRow]:
        """The rows of ``ranks`` at the first step at or after each of ``steps`` that ``name``
        has rows at (each such step once)."""

    @abc.abstractmethod
    def add_barrier_reports(
        self,
        run_id: str,
        step: int,
        reports: Mapping[int, Mapping[str, float]],
        records: Sequence[MetricRecord] = (),
    ) -> BarrierTally:
        """Record ranks' watched metrics for ``step`` (rank -> values), in one transaction;
        idempotent per rank and name: a rank's first report of a name stands.

        Args:
            records: The reports' metrics for history, written in the same transaction.

        Returns:
            The barrier as of this write: so the last rank to report knows it is the last.

        Raises:
            RunNotFound: no such run.
        """

    @abc.abstractmethod
    def read_barrier(self, run_id: str, step: int) -> BarrierTally:
        """The run's horizon and the reports for ``step``, read together.

        Raises:
            RunNotFound: no such run.
        """

    @abc.abstractmethod
    def ping(self) -> None:
        """Raises StoreUnavailable if the database cannot be reached."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""
