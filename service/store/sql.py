"""The SQL store: one SQLAlchemy Core code path for SQLite and PostgreSQL.

Every statement runs inside ``SqlStore._transaction``, the one place that begins,
commits, rolls back and turns driver errors into ``StoreUnavailable`` (or its leaner kin: the
hot writes' ``_driver_write``, the row reads' ``_driver_read``, and ``_reading`` for a read of
one statement, each with the same errors). The two dialects
differ in only two places, both below and both branched on purpose:

- ``_insert``: the dialect's ``INSERT`` construct, for ``ON CONFLICT DO NOTHING/UPDATE``.
- ``_run_row``: row locks. PostgreSQL locks the run's row (``FOR NO KEY UPDATE`` for a
  writer holding the run, ``FOR KEY SHARE`` for writes that only need the run to exist,
  ``FOR UPDATE`` to delete it). SQLite has no row locks; there every write transaction
  starts with ``BEGIN IMMEDIATE`` (the engine's begin hook, see ``open_store``), which
  excludes all other writers of the file until commit, and the ``FOR ...`` clauses
  compile to nothing.

Values cross the boundary as JSON text written by ``json`` (floats as ``repr``, so
float64 values come back bit for bit; NaN and infinities as ``NaN``/``Infinity``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import operator
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from secrets import token_hex
from typing import Any, Literal, NoReturn

from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import InvalidInput, RunConflict, RunNotFound, StoreUnavailable
from lrserve.service.store.base import (
    MARK_METRIC_ROWS,
    BarrierTally,
    BaseStore,
    HistoryMark,
    LockedRun,
    MetricEnds,
    MetricRecord,
    MetricRow,
    RunHead,
    RunRecord,
    RunTransaction,
    Snapshot,
    ValueChunk,
    WouldWait,
    held,
    unpack_lrs,
)
from lrserve.service.store.events import Event, EventKind, FeedEntry, NewEvent
from lrserve.service.store.guard import FileIdentity
from lrserve.service.store.schema import (
    RUN_TABLES,
    barrier_reports,
    event_gid_floor,
    event_ids,
    events,
    metrics,
    migrate,
    run_labels,
    runs,
    snapshots,
    value_chunks,
)
from lrserve.service.store.wal import Checkpointer
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Integer,
    LargeBinary,
    Row,
    Select,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.pool import QueuePool

SQLITE_BEGIN_OPTION = "lrserve_sqlite_begin"
"""Execution option read by the SQLite begin hook: ``"IMMEDIATE"``, ``"IMMEDIATE NOW"`` (the
write slot at once or the driver's "database is locked", never the busy handler's wait) or
``"DEFERRED"``."""

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long an SQLite writer waits for the file's write lock before giving up (503)."""
_BEGIN = {"DEFERRED": "BEGIN DEFERRED", "IMMEDIATE": "BEGIN IMMEDIATE"}
_COMMIT = "COMMIT"
"""The hot writes' COMMIT (``SqlStore._driver_write``), run on the transaction's cursor: there it
is a prepared statement of the connection's cache, where sqlite3's ``commit()`` prepares (parses)
its COMMIT anew each time. The same statement, the same errors."""


SQLITE_WAL = "lrserve_wal"
"""``info`` key of a pooled SQLite connection: True once its file is in WAL mode."""
_NO_BUSY_WAIT = "lrserve_no_busy_wait"
"""``info`` key of a pooled SQLite connection whose busy timeout is 0 (``begin_sqlite``)."""


def begin_sqlite(driver: Any, mode: str, info: dict[Any, Any]) -> None:
    """Begin a transaction on a sqlite3 connection as ``SQLITE_BEGIN_OPTION``'s ``mode`` says
    (``info``: the pooled connection's, SQLAlchemy's ``PoolProxiedConnection.info``). ``driver``:
    the connection, or a cursor of it (the hot writes' own: ``connection.execute`` makes a cursor
    for each statement).

    ``IMMEDIATE NOW`` begins with the busy timeout 0 ("database is locked" at once, not after
    a wait). In WAL mode SQLite calls the busy handler only to begin a transaction (and in
    checkpoints), never for a statement or the COMMIT of a write transaction that began, so
    the timeout is left at 0 for the connection's next ``IMMEDIATE NOW`` (the event loop's
    writes, one after the other on the connection ``SqlStore`` keeps for writes): two PRAGMAs
    less per write. Any other begin, and the pool's checkout (``restore_busy_timeout``), put
    it back first. A file not in WAL mode (its COMMIT waits for readers) gets it back at once.
    """
    if mode != "IMMEDIATE NOW":
        restore_busy_timeout(driver, info)
        driver.execute(_BEGIN[mode])
        return
    if not info.get(_NO_BUSY_WAIT):
        info[_NO_BUSY_WAIT] = True  # first: a PRAGMA that failed half way is put back all the same
        driver.execute("PRAGMA busy_timeout=0")
    try:
        driver.execute(_BEGIN["IMMEDIATE"])
    finally:
        if not info.get(SQLITE_WAL):
            restore_busy_timeout(driver, info)


def restore_busy_timeout(driver: Any, info: dict[Any, Any]) -> None:
    """The connection's busy timeout back to ``SQLITE_BUSY_TIMEOUT_S`` if ``begin_sqlite`` left it at 0."""
    if info.get(_NO_BUSY_WAIT):
        driver.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        del info[_NO_BUSY_WAIT]


RowLock = Literal["hold", "keep", "delete"]
"""A run row's lock on PostgreSQL. ``hold``: exclusive for ``lock_run`` (``FOR NO KEY UPDATE``;
lets ``keep`` through). ``keep``: the run must not vanish while we add rows to it (``FOR KEY
SHARE``). ``delete``: excludes both (``FOR UPDATE``)."""

# Statements of the hot paths, built once: building one costs more than running it on SQLite.
_RUN_ROWS: dict[RowLock | None, Any] = {
    None: select(runs).where(runs.c.run_id == bindparam("run_id")),
    "keep": select(runs).where(runs.c.run_id == bindparam("run_id")).with_for_update(
        read=True, key_share=True),
    "delete": select(runs).where(runs.c.run_id == bindparam("run_id")).with_for_update(),
}
_LOCKED = select(runs.c.run_id, runs.c.status, runs.c.horizon, runs.c.last_seq, runs.c.created_at).where(
    runs.c.run_id == bindparam("run_id"))
_LOCKED_ROWS: dict[RowLock, Any] = {
    "hold": _LOCKED.with_for_update(key_share=True),
    "keep": _LOCKED.with_for_update(read=True, key_share=True),
}
"""The hot writes' row locks (``_run_row``), reading only a ``LockedRun``'s columns (no spec to decode)."""
_LOCKED_FREE = _LOCKED.with_for_update(key_share=True, skip_locked=True)
"""``hold`` where the row is free (``lock_runs(skip_locked=True)``): none where another holds it."""
_EVENTS_AFTER = select(events).where(
    events.c.run_id == bindparam("run_id"), events.c.seq > bindparam("after_seq")).order_by(events.c.seq)
_RUN_HEAD = select(runs.c.created_at, runs.c.horizon, runs.c.last_seq).where(
    runs.c.run_id == bindparam("run_id"))
_HISTORY_MARK = select(
    runs.c.created_at, runs.c.horizon, runs.c.last_seq,
    select(func.count()).select_from(
        select(metrics.c.step).where(metrics.c.run_id == bindparam("run_id"))
        .limit(MARK_METRIC_ROWS + 1).subquery()
    ).scalar_subquery().label("metric_rows"),
).where(runs.c.run_id == bindparam("run_id"))
"""A run's ``HistoryMark`` in one statement: its metric rows counted up to one past
``MARK_METRIC_ROWS`` (SQLite walks that many entries of the primary key and stops; so does
PostgreSQL's plan where its statistics know the run's rows, else it first marks every entry of
the run in a bitmap: 35 ms for 800,000, against 3 s sorted in the key's order to stop early)."""
_READ_METRICS = select(
    metrics.c.name, metrics.c.step, metrics.c.rank, metrics.c.value, metrics.c.value_text
).where(metrics.c.run_id == bindparam("run_id")).order_by(metrics.c.name, metrics.c.step, metrics.c.rank)
_RUN_LABELLED = select(
    runs, run_labels.c.key.label("label_key"), run_labels.c.value.label("label_value")
).select_from(
    runs.outerjoin(run_labels, run_labels.c.run_id == runs.c.run_id)
).where(runs.c.run_id == bindparam("run_id"))
"""A run's row once per label (once, with NULLs, without labels): ``read_run`` in one statement.
Its labels, in no order: ``_by_key`` orders them."""
_RUN_LABELS = select(run_labels.c.key, run_labels.c.value).where(run_labels.c.run_id == bindparam("run_id"))
_INSERT_LABELS = run_labels.insert()
_NEXT_GID = update(event_ids).where(event_ids.c.id == 1).values(
    last_gid=event_ids.c.last_gid + 1).returning(event_ids.c.last_gid).cte("next_gid")
_EVENT_VALUES = [c for c in events.c if c.name != "gid"]
_GID_OR_FAIL = cast(func.coalesce(
    cast(select(_NEXT_GID.c.last_gid).scalar_subquery(), Text), "event_ids row 1 is missing"), BigInteger)
_INSERT_NUMBERED_EVENT = events.insert().from_select(
    [*(c.name for c in _EVENT_VALUES), "gid"],  # the same order as the select's, by name
    select(*[bindparam(c.name, type_=c.type) for c in _EVENT_VALUES], _GID_OR_FAIL),
).add_cte(_NEXT_GID)
"""PostgreSQL: an event's row with the next global id (the counter's UPDATE and the INSERT in
one statement, whose answer a pipelined commit does not wait for). Without the counter's row
the statement fails (the cast of the text naming it to bigint), so its transaction keeps
nothing: a commit is never answered with fewer events than it sent."""
_FLOOR_ROW = event_gid_floor.c.id == literal_column("1")
_SQLITE_LAST_GID = func.max(event_gid_floor.c.gid, func.coalesce(
    select(func.max(events.c.gid)).scalar_subquery(), literal_column("0")))
"""SQLite: the last global id given out, in a statement on ``event_gid_floor`` (its one row);
the greatest ``events.gid`` is one seek at the end of its unique index."""
_SQLITE_NUMBERED_EVENT = events.insert().from_select(
    [*(c.name for c in _EVENT_VALUES), "gid"],
    select(*[bindparam(c.name, type_=c.type) for c in _EVENT_VALUES], _SQLITE_LAST_GID + literal_column("1"))
    .where(_FLOOR_ROW),
)
"""SQLite: an event's row with the next global id (``schema.event_gid_floor``); without the
floor's row it inserts nothing, which ``SqlStore._insert_numbered`` turns into a failure."""
EVENTS_CHANNEL = "lrserve_events"
"""PostgreSQL ``NOTIFY`` channel (with the schema's suffix, ``schema_channel``): a transaction that
appended events notifies it on commit, with ``"<sender> <run_id>"`` as payload (``sender``:
the store that wrote, see ``SqlStore``)."""
REPORTS_CHANNEL = "lrserve_reports"
"""PostgreSQL ``NOTIFY`` channel (with the schema's suffix): earlier versions' barrier reports
notified it. This version reports under the run's lock and decides in the same transaction
(``SqlRunTransaction.add_barrier_reports``), so it sends nothing here; ``run_listener`` still
listens for replicas of older versions during a rolling upgrade, whose report may miss a
report of ours (no lock) and which then decide nothing: their report wakes our waiters, who
read the barrier again and decide."""
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")
_UPDATE_RUN = update(runs).where(runs.c.run_id == bindparam("b_run_id")).values(
    horizon=bindparam("b_horizon"), status=bindparam("b_status"), last_seq=bindparam("b_last_seq"),
    updated_at=bindparam("b_updated_at"))
_FREE_ROWS = select(runs.c.run_id).where(
    runs.c.run_id == any_(bindparam("run_ids", type_=ARRAY(Text)))
).order_by(runs.c.run_id).with_for_update(key_share=True, skip_locked=True)
"""PostgreSQL: the rows of ``run_ids`` that no transaction holds, locked as ``_MARK_SEEN``'s
UPDATE locks them (``FOR NO KEY UPDATE``), without waiting (``mark_seen``)."""
_HEARD = func.coalesce(runs.c.last_seen, runs.c.updated_at)
"""When a run was last heard from (never seen since the upgrade to schema v2: its last change)."""
_MARK_SEEN = update(runs).where(
    runs.c.run_id == bindparam("b_run_id"),
    or_(runs.c.last_seen.is_(None), runs.c.last_seen < bindparam("b_seen")),
).values(last_seen=bindparam("b_seen"))
_SELECT_REPORTS = select(barrier_reports.c.rank, barrier_reports.c.name, barrier_reports.c.value,
                         barrier_reports.c.value_text).where(
    barrier_reports.c.run_id == bindparam("run_id"), barrier_reports.c.step == bindparam("step")
).order_by(barrier_reports.c.rank, barrier_reports.c.name)


_BARRIER_TALLY = select(
    runs.c.horizon, barrier_reports.c.rank, barrier_reports.c.name, barrier_reports.c.value,
    barrier_reports.c.value_text,
).select_from(runs.outerjoin(barrier_reports, and_(
    barrier_reports.c.run_id == runs.c.run_id, barrier_reports.c.step == bindparam("step")))
).where(runs.c.run_id == bindparam("run_id")).order_by(barrier_reports.c.rank, barrier_reports.c.name)
"""A barrier as stored: the run's horizon once per report (once, with NULLs, before the first)."""


def schema_channel(name: str, schema: str) -> str:
    """The ``NOTIFY`` channel ``name`` of the stores in ``schema``: channels are the database's,
    not the schema's, so each schema's are its own (servers on other schemas of the database
    would otherwise wake for runs that are not theirs). The suffix is hex, so the name needs no
    quoting, and short: 32 bytes of PostgreSQL's 63."""
    return f"{name}_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


_ENCODER = json.JSONEncoder(allow_nan=True, ensure_ascii=False, separators=(",", ":"))
"""``json.dumps``' own encoder for these arguments, built once (``dumps`` builds one per call)."""
_DECODER = json.JSONDecoder()


def _dumps(value: Any) -> str:
    """JSON text that restores every float64 exactly, NaN and infinities included."""
    return _ENCODER.encode(value)


def _loads(raw: str) -> Any:
    return _DECODER.decode(raw) if type(raw) is str else json.loads(raw)


def _split_float(value: float) -> tuple[float | None, str | None]:
    """``(value, value_text)`` columns: SQLite's REAL loses NaN and -0.0, so spell those out."""
    value = float(value)
    negative_zero = value == 0.0 and math.copysign(1.0, value) < 0
    if math.isfinite(value) and not negative_zero:
        return value, None
    return None, repr(value)  # "nan", "inf", "-inf", "-0.0"


def _metric_tuples(rows: Iterable[Sequence[Any]]) -> list[MetricRow]:
    """``(step, rank, value)`` of rows of ``_METRIC_COLUMNS``."""
    return [(step, rank, _join_float(value, value_text)) for step, rank, value, value_text in rows]


def _join_float(value: float | None, value_text: str | None) -> float:
    if value_text is not None:
        return float(value_text)
    assert value is not None, "_split_float fills one of the two columns"
    return float(value)


class _DriverSql:
    """A Core statement compiled once for a dialect and run on the DBAPI cursor.

    For the commit path's few small statements: there SQLAlchemy's per-execution work
    (execution context, cache key, result set-up) cost about ten times the statement itself
    on SQLite. The SQL is SQLAlchemy's own compilation; values go through the columns' own
    bind processors and come back through their result processors, as Core would do.
    """

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self.positional = bool(dialect.positional)
        self.names: list[str] = (list(compiled.positiontup or ()) if self.positional
                                 else list(dict.fromkeys(re.findall(r"%\((\w+)\)s", self.sql))))
        binds = compiled.binds
        self.defaults = {name: binds[name].value for name in self.names if binds[name].value is not None}
        self.processors = [binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in self.names]
        self._processed = [(i, process) for i, process in enumerate(self.processors) if process is not None]
        self._values = (operator.itemgetter(*self.names) if len(self.names) > 1 and not self.defaults
                        else None)  # the parameters' values in order, in one call (none defaulted)
        self._dialect = dialect
        columns = getattr(statement, "selected_columns", None)  # a SELECT's, or
        self._types: list[Any] = list(columns if columns is not None  # an INSERT's RETURNING
                                      else getattr(statement, "exported_columns", ()))
        self.columns = [c.key for c in self._types]
        self._results: list[Any] | None = None  # the columns' result processors, on first use

    def params(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        if self._values is not None:
            out = list(self._values(values))
        else:
            out = [values[name] if name in values else self.defaults[name] for name in self.names]
        for i, process in self._processed:
            out[i] = process(out[i])
        return tuple(out) if self.positional else dict(zip(self.names, out, strict=True))

    def execute(self, cursor: Any, values: Mapping[str, Any]) -> Any:
        cursor.execute(self.sql, self.params(values))
        return cursor

    def executemany(self, cursor: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        """The statement once per row. How many rows it changed is the cursor's ``rowcount``
        once the server answered (pipelined on PostgreSQL: at the transaction's end)."""
        if len(rows) == 1:  # a commit's usual one row (on PostgreSQL both only queue: ``PgCursor``)
            cursor.execute(self.sql, self.params(rows[0]))
        else:
            cursor.executemany(self.sql, [self.params(row) for row in rows])

    def one(self, cursor: Any) -> dict[str, Any] | None:
        """The next row of a SELECT as a dict by column, its values as Core would return them."""
        raw = cursor.fetchone()
        if raw is None:
            return None
        results = self._processors(cursor)
        return {name: (value if process is None else process(value))
                for name, process, value in zip(self.columns, results, raw, strict=True)}

    def rows(self, cursor: Any) -> list[tuple[Any, ...]]:
        """The remaining rows of a SELECT as tuples in column order, values as Core would return them."""
        raw = cursor.fetchall()
        return self._converted(raw, self._processors(cursor))

    @staticmethod
    def _converted(raw: Sequence[Sequence[Any]], results: list[Any]) -> list[tuple[Any, ...]]:
        if not any(results):
            return [tuple(row) for row in raw]
        return [tuple(value if process is None else process(value)
                      for process, value in zip(results, row, strict=True)) for row in raw]

    def rows_each(self, cursor: Any, each: Sequence[Mapping[str, Any]]) -> list[list[tuple[Any, ...]]]:
        """``rows(execute(cursor, values))`` for each item of ``each``, in order: on PostgreSQL
        sent together and answered in one round trip (``PgCursor.execute_each``), not one each."""
        execute_each = getattr(cursor, "execute_each", None)
        if execute_each is None:  # SQLite: in process, nothing to gain
            return [self.rows(self.execute(cursor, values)) for values in each]
        found = execute_each(self.sql, [self.params(values) for values in each])
        results = self._processors(cursor) if found else []
        return [self._converted(raw, results) for raw in found]

    def _processors(self, cursor: Any) -> list[Any]:
        if self._results is None:  # PostgreSQL's need the driver's type codes
            self._results = [c.type.dialect_impl(self._dialect).result_processor(self._dialect, d[1])
                             for c, d in zip(self._types, cursor.description, strict=True)]
        return self._results


class _Hurried:
    """``SqlStore.without_waiting``'s block: the thread's flag set inside it (a class, not a
    generator ``contextmanager``: it wraps every write on the event loop)."""

    __slots__ = ("_flag",)

    def __init__(self, flag: threading.local) -> None:
        self._flag = flag

    def __enter__(self) -> None:
        self._flag.on = True

    def __exit__(self, *_: object) -> None:
        self._flag.on = False


class _Failures:
    """``SqlStore._failures``' block (a class, not a generator ``contextmanager``: it wraps
    every transaction)."""

    __slots__ = ("_now", "_store")

    def __init__(self, store: SqlStore, now: bool) -> None:
        self._store, self._now = store, now

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: object) -> None:
        if exc is None:
            return
        store = self._store
        if isinstance(exc, sa_exc.DBAPIError):  # raised through SQLAlchemy (and by the pool's connect)
            store._failed(exc.orig, exc, self._now)
        if isinstance(exc, store._driver_error):  # raised on the DBAPI cursor (``_DriverSql``)
            store._failed(exc, exc, self._now)
        if isinstance(exc, sa_exc.TimeoutError):  # the connection pool stayed exhausted
            raise StoreUnavailable(f"{store._where}: no free database connection") from exc


class _Counted:
    """``SqlStore._driver_write``'s second cursor, for a statement whose row count is read once
    the transaction committed (on PostgreSQL only then: its statements are pipelined)."""

    def __init__(self) -> None:
        self.cursor: Any = None
        self.rows = 0


CHUNK_PIECE_BYTES = 1 << 20
"""The most bytes of a value chunk one write transaction carries (``save_snapshot``)."""


class SqlStore(BaseStore):
    """``BaseStore`` over a SQLAlchemy engine (SQLite file or PostgreSQL).

    Build it through ``open_store``, which configures the engine for its dialect.
    Opening runs the schema migrations (see ``service.store.schema``).
    """

    def __init__(
        self, engine: Engine, *, where: str, secrets: Sequence[str] = (), guard: FileIdentity | None = None
    ) -> None:
        """Take ownership of ``engine`` and bring its schema up to date.

        Args:
            engine: A configured engine; closed by ``close`` (or here, if opening fails).
            where: The database in words, without credentials; starts every error message.
            secrets: Strings never to repeat in an error message (the password).
            guard: The SQLite file's identity, checked before each write commits, on ``ping`` and
                (``open_store`` installs it) on each connection the pool opens.

        Raises:
            StoreUnavailable: the database cannot be reached.
            SchemaTooNew: the database was written by a newer lrserve.
        """
        self._engine = engine
        self._where = where
        self._secrets = tuple(s for s in secrets if s)
        self._guard = guard
        self._postgres = engine.dialect.name == "postgresql"
        """The backend, asked one way (``open_store`` opens SQLite or PostgreSQL, nothing else)."""
        # SQLite has one writer per file; a writer that finds it taken sleeps in SQLite's busy
        # handler (up to 100 ms a nap) and may miss its turn. Threads of this process queue
        # here instead and go in as soon as the last one commits; other processes still nap.
        self._sqlite_writers = None if self._postgres else threading.RLock()
        # SQLite's WAL checkpoints, outside that slot (its own COMMIT ran them: ``store/wal.py``)
        self.checkpointer = (Checkpointer(engine, self, write_slot=self._sqlite_writers)
                             if self._sqlite_writers is not None else None)
        self._hurried = threading.local()  # ``without_waiting``: .on is True inside it
        self._commit_watchers: list[Callable[[], object]] = []
        self._compiled: dict[str, _DriverSql] = {}
        self._writer: tuple[Any, int] | None = None  # SQLite: ``_driver_write``'s kept connection
        self._disposals = 0  # how often the pool was replaced (``_replace_pool``)
        self._sender = token_hex(6)
        """Names this store in its notifications, so its own listener can skip them."""
        self._channels: dict[str, str] = {}
        """PostgreSQL: ``EVENTS_CHANNEL`` and ``REPORTS_CHANNEL`` as this store's schema names them."""
        try:
            with self._transaction(write=True) as conn:
                migrate(conn)
                if self._postgres:
                    schema = conn.execute(text("SELECT current_schema()")).scalar_one()
                    self._channels = {name: schema_channel(name, schema)
                                      for name in (EVENTS_CHANNEL, REPORTS_CHANNEL)}
        except BaseException:
            engine.dispose()
            raise

    # -- the transaction helper and the dialect branches ---------------------------------

    def without_waiting(self) -> AbstractContextManager[None]:
        """SQLite: inside it, on this thread, a write transaction begins only if the file's write
        slot is free at once (in this process and in every other), else ``WouldWait``; reads
        of a WAL file never wait. PostgreSQL: ``WouldWait`` at once (every statement is a
        round trip). See ``BaseStore.without_waiting``."""
        if self._sqlite_writers is None:
            raise WouldWait("PostgreSQL answers over the network")
        return _Hurried(self._hurried)

    @property
    def must_not_wait(self) -> bool:
        return getattr(self._hurried, "on", False)

    @property
    def one_writer(self) -> bool:
        return self._sqlite_writers is not None

    @property
    def connections(self) -> int:
        if self._sqlite_writers is not None:
            return 1  # one writer per file: SQLite's pool serves readers, which never wait (WAL)
        pool = self._engine.pool  # PostgreSQL's opens none beyond its size (``POSTGRES_POOL_OVERFLOW``)
        return pool.size() if isinstance(pool, QueuePool) else 1

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[Connection]:
        """One transaction: commit on success, roll back on error, driver errors → StoreUnavailable.

        ``write`` makes SQLite take its write lock at ``BEGIN`` rather than on the first
        write, so a transaction that reads and then writes never fails on lock upgrade.
        Inside ``without_waiting`` a write that would wait for that lock raises ``WouldWait``.
        """
        turn = self._sqlite_writers if write and self._sqlite_writers is not None else None
        now = turn is not None and self.must_not_wait
        if write and self._guard is not None:
            self._guard.check()  # first: a fault is named as the file's (and logged once), not a driver error
        with self._failures(now=now):
            with held(turn, now=now, what="the write slot"), self._engine.connect() as conn:
                if write:
                    conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE NOW" if now else "IMMEDIATE"})
                with conn.begin():
                    yield conn
                    if write and self._guard is not None:
                        self._guard.check()  # never commit (and acknowledge) into a file that is gone
            if write and self.checkpointer is not None:
                self.checkpointer.wrote()

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection for one read statement. PostgreSQL: outside any transaction (the
        statement its own, ``AUTOCOMMIT``), one round trip: in ``_transaction`` it was three
        (psycopg's ``BEGIN``, the statement, the ``COMMIT``: 256 against 147 µs a read here).
        SQLite: ``_transaction()``'s (no round trip to save). Reads of several statements keep
        ``_transaction()`` (on PostgreSQL, at READ COMMITTED, each of its statements still sees
        the commits before it, not one snapshot).
        """
        if not self._postgres:
            with self._transaction() as conn:
                yield conn
            return
        with self._failures(), self._engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def _driver_write(self, counted: _Counted | None = None) -> Iterator[Any]:
        """``_transaction(write=True)`` for the hot writes (commits, metrics, barrier reports): a
        DBAPI cursor for their few ``_DriverSql`` statements, without SQLAlchemy's connection,
        transaction and pool checkout around each (on SQLite they cost several times the
        statements themselves). Same begin, same guard, same commit and the same errors.

        SQLite: this process's writes take turns in the write slot anyway, so the connection a
        write committed on is kept for the next one (``_writer``), not checked in and out of the
        pool; a write that fails gives it back to the pool as ``_transaction`` does (rolled
        back; a connection found dead discarded, ``_discard``), and the next one checks out a
        connection anew. PostgreSQL: a pooled connection per transaction, its statements
        pipelined (``pg_pipeline.pipelined``): sent together and waited for where a statement's
        rows are read and at COMMIT, whose answer is in before this returns.

        ``counted``: a second cursor of the transaction for the block (``counted.cursor``), whose
        row count ``counted.rows`` gets once the transaction committed; it is closed, as the
        first, before the connection goes back (or to the next write).
        """
        sqlite_file = self._sqlite_writers is not None
        now = sqlite_file and self.must_not_wait
        with self._failures(now=now), held(self._sqlite_writers, now=now, what="the write slot"):
            raw, since = self._take_writer()
            try:
                if sqlite_file:
                    cursor = raw.cursor()
                    try:
                        if counted is not None:
                            counted.cursor = raw.cursor()
                        begin_sqlite(cursor, "IMMEDIATE NOW" if now else "IMMEDIATE", raw.info)
                        yield cursor
                        if self._guard is not None:
                            self._guard.check()  # never commit (and acknowledge) into a file that is gone
                        cursor.execute(_COMMIT)
                        if counted is not None:
                            counted.rows = max(int(counted.cursor.rowcount), 0)
                    finally:
                        try:
                            cursor.close()
                        finally:
                            if counted is not None and counted.cursor is not None:
                                counted.cursor.close()
                else:
                    from lrserve.service.store.pg_pipeline import pipelined  # not on a SQLite server

                    with pipelined(raw.driver_connection) as pipeline:
                        if counted is not None:
                            counted.cursor = pipeline.cursor()
                        yield pipeline.cursor()
                    if counted is not None:  # known once COMMIT answered
                        counted.rows = max(int(counted.cursor.rowcount), 0)
            except self._driver_error as exc:
                self._discard(raw, exc)
                raise
            except BaseException:
                raw.close()  # back to the pool, which rolls back
                raise
            if sqlite_file:
                self._writer = (raw, since)
            else:
                raw.close()
        if self.checkpointer is not None:
            self.checkpointer.wrote()

    def _take_writer(self) -> tuple[Any, int]:
        """The connection for a write, with the pool's generation (``_disposals``) it was taken
        from: on SQLite the one the last write committed on, unless the pool was replaced since
        (``_replace_pool``); else a pooled one, once the file's identity is checked (the check
        before COMMIT is each write's own). SQLite: only in the write slot."""
        kept, self._writer = self._writer, None
        if kept is not None:
            if kept[1] == self._disposals:
                return kept  # the file is checked before COMMIT (a kept connection writes on its inode)
            kept[0].invalidate()
        if self._guard is not None:  # first: a connection to a file gone would create an empty one,
            self._guard.check()  # and a fault is named as the file's (logged once), not a driver error
        since = self._disposals  # read first: a pool replaced while connecting is not trusted
        return self._engine.raw_connection(), since

    def _failures(self, *, now: bool = False) -> AbstractContextManager[None]:
        """Driver errors as ``StoreUnavailable`` naming the database (``WouldWait`` where ``now``
        and another process holds SQLite's write slot); an exhausted pool too."""
        return _Failures(self, now)

    def _failed(self, error: BaseException | None, raised: BaseException, now: bool) -> NoReturn:
        if now and _busy(error):
            raise WouldWait("another process holds the write slot") from raised
        self._after_failure(error)
        raise StoreUnavailable(f"{self._where}: {self._reason(error)}") from raised

    @functools.cached_property
    def _driver_error(self) -> type[Exception]:
        return self._engine.dialect.loaded_dbapi.Error

    def _driver_sql(self, name: str, statement: Any) -> _DriverSql:
        found = self._compiled.get(name)
        if found is None:
            found = self._compiled[name] = _DriverSql(statement, self._engine.dialect)
        return found

    def _after_failure(self, error: BaseException | None) -> None:
        """After SQLite reports a damaged or unreadable file, drop every pooled connection:
        their page caches may hold what it read before, and fresh ones see the file as it is
        now (restored, say). A busy file is not damage. PostgreSQL's pool drops connections a
        restart broke at checkout (``service.store._install_postgres_hooks``), and after a
        statement fails on one (SQLAlchemy's disconnect check, ``_discard``)."""
        if self._postgres or "locked" in str(error):
            return
        self._replace_pool()

    def _discard(self, raw: Any, error: Any) -> None:
        """A DBAPI connection the driver failed on: back to the pool, which rolls it back (a
        busy file, a refused statement), unless the failure shows it dead (the server restarted
        or ended the session, the network went): then it is never used again and the pool's
        others are replaced too, so the next request connects anew. SQLAlchemy does this for
        the statements it runs; the raw paths (``_driver_write``, ``_driver_read``) do it here."""
        if not self._engine.dialect.is_disconnect(error, raw.driver_connection, None):
            raw.close()
            return
        raw.invalidate(error)
        self._replace_pool()

    def _replace_pool(self) -> None:
        self._disposals += 1  # the kept writer connection goes too (``_take_writer``)
        self._engine.dispose()

    def _reason(self, error: BaseException | None) -> str:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = lines[0]
        for secret in self._secrets:
            reason = reason.replace(secret, "***")
        return reason

    def _insert(self, table: Table) -> Any:
        """The dialect's INSERT, which knows ``on_conflict_do_nothing/do_update``."""
        if self._postgres:
            from sqlalchemy.dialects import postgresql  # not at start-up: ~0.15 s a SQLite server needs not

            return postgresql.insert(table)
        return sqlite.insert(table)

    @functools.cached_property
    def _insert_new_reports(self) -> Any:
        return self._insert(barrier_reports).on_conflict_do_nothing()

    @functools.cached_property
    def _insert_new_run(self) -> Any:
        """``create_run``'s INSERT, built once with its values as parameters: built per call with
        ``.values(row)``, SQLAlchemy computed its cache key anew each time (walking every
        column's type: ~0.4 ms of a create's ~1 ms in the store). RETURNING, not rowcount:
        psycopg's rowcount reads -1 here under SQLAlchemy 2.1."""
        insert = self._insert(runs).on_conflict_do_nothing(index_elements=["run_id"])
        return insert.returning(runs.c.run_id)

    @functools.cached_property
    def _insert_new_run_row(self) -> Any:
        """``_insert_new_run`` returning the whole row as stored (PostgreSQL's pipelined create)."""
        return self._insert(runs).on_conflict_do_nothing(index_elements=["run_id"]).returning(*runs.c)

    @functools.cached_property
    def _insert_new_metrics(self) -> Any:  # built once: building it cost more than running it
        return self._insert(metrics).on_conflict_do_nothing()

    @functools.cached_property
    def _insert_new_metrics_of_run(self) -> Any:
        """``_insert_new_metrics`` of a row only where its run exists (``append_metrics`` on SQLite)."""
        columns = list(metrics.c)
        rows = select(*[bindparam(c.name, type_=c.type) for c in columns]).where(
            select(runs.c.run_id).where(runs.c.run_id == bindparam("run_id")).exists())
        return self._insert(metrics).from_select([c.name for c in columns], rows).on_conflict_do_nothing()

    @staticmethod
    def _run_row(conn: Connection, run_id: str, lock: RowLock | None = None) -> Row[Any] | None:
        """The run's row, locked as asked (``RowLock``) on PostgreSQL (SQLite: see the module docstring)."""
        return conn.execute(_RUN_ROWS[lock], {"run_id": run_id}).one_or_none()

    def _require_run(self, conn: Connection, run_id: str, lock: RowLock | None = None) -> Row[Any]:
        row = self._run_row(conn, run_id, lock)
        if row is None:
            raise RunNotFound(run_id)
        return row

    # -- runs ------------------------------------------------------------------------------

    def create_run(
        self, run_id: str, spec: Mapping[str, Any], labels: Mapping[str, str], created: NewEvent
    ) -> tuple[RunRecord, bool]:
        """Create a run with its first event (seq 1), unless it exists.

        A concurrent create of the same id (any process) is settled by the primary key:
        ``ON CONFLICT DO NOTHING`` waits for the other insert, and the loser reads the winner's row.

        Returns:
            The record and ``True`` if this call created it, else the existing record and ``False``.

        Raises:
            InvalidInput: a label holds a NUL character (PostgreSQL cannot store one, so
                SQLite refuses it too: both backends take the same labels).
            StoreUnavailable: the database failed.
        """
        for key, value in labels.items():
            if "\x00" in key or "\x00" in value:
                raise InvalidInput.at("labels", "must not contain NUL characters")
        now = _now()
        row = {"run_id": run_id, "spec": _dumps(dict(spec)), "status": RunStatus.ACTIVE.value, "horizon": 0,
               "last_seq": 1, "created_at": now, "updated_at": now, "last_seen": now}
        if self._postgres:
            return self._create_run_pipelined(row, labels, created)
        with self._transaction(write=True) as conn:
            if conn.execute(self._insert_new_run, row).first() is None:
                return self._read_record(conn, self._require_run(conn, run_id)), False
            if labels:
                conn.execute(run_labels.insert(), [
                    {"run_id": run_id, "key": k, "value": v} for k, v in labels.items()
                ])
            with _cursor(conn) as cursor:
                self._insert_numbered(cursor, [_event_row(run_id, 1, created, now, None)])
            record = self._read_record(conn, self._require_run(conn, run_id))
        self._events_committed()
        return record, True

    def _create_run_pipelined(
        self, row: dict[str, Any], labels: Mapping[str, str], created: NewEvent
    ) -> tuple[RunRecord, bool]:
        """``create_run`` on PostgreSQL in two round trips (``_driver_write``'s pipeline): ``BEGIN``
        with the run's INSERT, its stored row returned; then the labels, the ``NOTIFY`` and the
        event numbered in its own INSERT (``_INSERT_NUMBERED_EVENT``) with ``COMMIT``, answered
        once COMMIT is. The record is the row as stored with the labels as sent, by key (what a
        read returns). A run that exists is read in the same transaction instead (the INSERT waited
        for a concurrent create of it to end), then committed: three round trips. Through
        SQLAlchemy's transaction a create was a round trip per statement (nine), with the event
        id counter's row locked from the third on, so every other create and commit of every
        process waited behind those round trips."""
        run_id = row["run_id"]
        insert = self._driver_sql("create_run", self._insert_new_run_row)
        with self._driver_write() as cursor:
            stored = insert.one(insert.execute(cursor, row))
            if stored is None:
                return self._labelled_record(cursor, run_id), False  # (RunNotFound: deleted since)
            if labels:
                self._driver_sql("insert_labels", _INSERT_LABELS).executemany(
                    cursor, [{"run_id": run_id, "key": k, "value": v} for k, v in labels.items()])
            self._notify_on(cursor, EVENTS_CHANNEL, run_id)
            self._insert_numbered(cursor, [_event_row(run_id, 1, created, row["created_at"], None)])
        self._events_committed()
        return _record_of(stored, _by_key(labels.items())), True  # in the order a read gives

    def read_run(self, run_id: str) -> RunRecord:
        """The run's record: its row and its labels in one statement (one read, no transaction).

        Raises:
            RunNotFound: no such run.
            StoreUnavailable: the database failed.
        """
        with self._driver_read() as cursor:
            return self._labelled_record(cursor, run_id)

    def _labelled_record(self, cursor: Any, run_id: str) -> RunRecord:
        """The run's record with its labels, read on ``cursor`` in one statement (``RunNotFound``)."""
        sql = self._driver_sql("run_labelled", _RUN_LABELLED)
        row = sql.one(sql.execute(cursor, {"run_id": run_id}))
        if row is None:
            raise RunNotFound(run_id)
        more = sql.rows(cursor)
        key, value = sql.columns.index("label_key"), sql.columns.index("label_value")
        first = [(row["label_key"], row["label_value"])] if row["label_key"] is not None else []
        return _record_of(row, _by_key([*first, *((found[key], found[value]) for found in more)]))

    def run_head(self, run_id: str) -> RunHead:
        """The run's ``created_at``, ``horizon`` and ``last_seq`` in one statement (one row,
        read at once: no transaction of its own).

        Raises:
            RunNotFound: no such run.
            StoreUnavailable: the database failed.
        """
        row = self._read_one("head", _RUN_HEAD, run_id)
        return RunHead(row["created_at"], row["horizon"], row["last_seq"])

    def history_mark(self, run_id: str) -> HistoryMark:
        """The run's ``HistoryMark`` in one statement (its row, and its metric rows counted up
        to one past ``MARK_METRIC_ROWS``: C speed, a few ms per 100,000 rows).

        Raises:
            RunNotFound: no such run.
            StoreUnavailable: the database failed.
        """
        row = self._read_one("history_mark", _HISTORY_MARK, run_id)
        return HistoryMark(row["created_at"], row["horizon"], row["last_seq"], int(row["metric_rows"]))

    def _read_one(self, name: str, statement: Any, run_id: str) -> Any:
        """The one row ``statement`` reads for ``run_id`` (read at once: no transaction of its own).

        Raises:
            RunNotFound: no such run.
            StoreUnavailable: the database failed.
        """
        sql = self._driver_sql(name, statement)
        with self._driver_read() as cursor:
            row = sql.one(sql.execute(cursor, {"run_id": run_id}))
        if row is None:
            raise RunNotFound(run_id)
        return row

    @contextmanager
    def _driver_read(self) -> Iterator[Any]:
        """A DBAPI cursor on a pooled connection, for reads of a row or two (``_DriverSql``).

        PostgreSQL: each statement is its own transaction (``pg_pipeline.reading``: the
        statement and a sync in one write), so a read of one statement is one round trip (in a
        transaction it was three: psycopg's ``BEGIN``, the statement and the pool's ``ROLLBACK``).
        """
        with self._failures():
            conn = self._engine.raw_connection()
            try:
                if self._postgres:
                    from lrserve.service.store.pg_pipeline import reading  # not on a SQLite server

                    driver = conn.driver_connection
                    assert driver is not None, "a connection the pool gave out is open"
                    with reading(driver) as pipeline:
                        yield pipeline.cursor()
                else:
                    cursor = conn.cursor()
                    try:
                        yield cursor
                    finally:
                        cursor.close()
            except self._driver_error as exc:
                self._discard(conn, exc)
                raise
            except BaseException:
                conn.close()
                raise
            conn.close()  # back to the pool, which rolls back what the reads began

    def _read_record(self, conn: Connection, row: Row[Any]) -> RunRecord:
        found = conn.execute(_RUN_LABELS, {"run_id": row.run_id})
        return _record(row, _by_key((r.key, r.value) for r in found))

    @staticmethod
    def _labels_of(conn: Connection, run_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        found: dict[str, list[tuple[str, str]]] = {}
        if not run_ids:
            return {}
        for row in conn.execute(select(run_labels).where(run_labels.c.run_id.in_(run_ids))):
            found.setdefault(row.run_id, []).append((row.key, row.value))
        return {run_id: _by_key(pairs) for run_id, pairs in found.items()}

    def list_runs(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        after: str | None = None,
        stale_before: datetime | None = None,
    ) -> list[RunRecord]:
        """Runs ordered by ``run_id``: those after the cursor, with this status, matching every label.

        Args:
            labels: Every pair must be among the run's labels.
            status: Only runs with this status.
            limit: At most this many runs.
            after: The cursor: the last ``run_id`` of the previous page.
            stale_before: Only active runs not heard from since then (``_STALE``).

        Returns:
            The page, in ``run_id`` order.

        Raises:
            StoreUnavailable: the database failed.
        """
        query = select(runs).order_by(runs.c.run_id).limit(max(0, limit))
        if after is not None:  # no stored id holds NUL: "x\0..." and "x" split them alike
            query = query.where(runs.c.run_id > after.split("\x00", 1)[0])
        if status is not None:
            query = query.where(runs.c.status == status.value)
        if stale_before is not None:
            query = query.where(runs.c.status == RunStatus.ACTIVE.value, _HEARD < stale_before)
        for key, value in (labels or {}).items():
            if "\x00" in key or "\x00" in value:  # PostgreSQL cannot even compare such text
                return []
            matching = select(run_labels.c.run_id).where(
                run_labels.c.key == key, run_labels.c.value == value
            )
            query = query.where(runs.c.run_id.in_(matching))
        with self._transaction() as conn:
            rows = conn.execute(query).all()
            labels_by_run = self._labels_of(conn, [r.run_id for r in rows])
        return [_record(r, labels_by_run.get(r.run_id, {})) for r in rows]

    def mark_seen(self, seen: Mapping[str, datetime]) -> None:
        """Move ``last_seen`` forward, in ``run_id`` order (two replicas flushing at once lock
        the rows in the same order, so they never deadlock).

        SQLite: one short transaction. PostgreSQL: the rows no transaction holds, in one
        transaction that waits for no lock (``SKIP LOCKED``); then each held row in a
        transaction of its own, which waits for that row alone. A run's commit holds its row
        while it computes (a big run of steps: a second or more), and one transaction for all
        held the rows it had written while it waited for that one: another run's commit waited
        for the flush, so for the big run's computation (docs/hardening.md, "Lock scope on
        PostgreSQL: the flush of last_seen").

        Raises:
            StoreUnavailable: the database failed.
        """
        if not seen:
            return
        rows = [{"b_run_id": run_id, "b_seen": seen[run_id]} for run_id in sorted(seen)]
        if not self._postgres:
            with self._transaction(write=True) as conn:
                conn.execute(_MARK_SEEN, rows)
            return
        with self._transaction(write=True) as conn:
            free = set(conn.execute(_FREE_ROWS, {"run_ids": [row["b_run_id"] for row in rows]}).scalars())
            if free:
                conn.execute(_MARK_SEEN, [row for row in rows if row["b_run_id"] in free])
        for row in rows:
            if row["b_run_id"] not in free:  # held by a commit (or gone): alone, holding no other row
                with self._transaction(write=True) as conn:
                    conn.execute(_MARK_SEEN, [row])

    def count_by_status(self, *, stale_before: datetime) -> dict[str, int]:
        """Runs per status, and the stale ones (active, not heard from since ``stale_before``).

        Raises:
            StoreUnavailable: the database failed.
        """
        counts = {status.value: 0 for status in RunStatus}
        active = runs.c.status == RunStatus.ACTIVE.value
        stale = func.sum(case((and_(active, _HEARD < stale_before), 1), else_=0))
        query = select(runs.c.status, func.count(), stale).group_by(runs.c.status)
        with self._reading() as conn:
            rows = conn.execute(query).all()
        for status, count, _ in rows:
            counts[status] = int(count)
        counts["stale"] = sum(int(s or 0) for _, _, s in rows)
        return counts

    def count_runs(self) -> int:
        """How many runs exist.

        Raises:
            StoreUnavailable: the database failed.
        """
        with self._reading() as conn:
            return int(conn.execute(select(func.count()).select_from(runs)).scalar_one())

    def delete_run(self, run_id: str) -> None:
        """Delete a run and all its rows in one transaction (no foreign keys needed).

        The run's row is locked first, so a ``lock_run`` holder or a concurrent metric
        write finishes before (and its rows go too) or finds the run gone.

        Raises:
            RunNotFound: no such run.
            StoreUnavailable: the database failed.
        """
        with self._transaction(write=True) as conn:
            self._require_run(conn, run_id, "delete")
            for table in RUN_TABLES:
                conn.execute(delete(table).where(table.c.run_id == run_id))
            conn.execute(delete(runs).where(runs.c.run_id == run_id))

    # -- the event log ---------------------------------------------------------------------

    @contextmanager
    def lock_run(self, run_id: str) -> Iterator[RunTransaction]:
        """Open a transaction holding the run's lock; commits on exit, rolls back on error.

        PostgreSQL: ``SELECT ... FOR NO KEY UPDATE`` on the run's row (other runs, and
        metric writes to this one, go on). SQLite: ``BEGIN IMMEDIATE`` (all writers of the
        file, in every process, wait until this commits; readers go on, WAL). So inside the
        block, write only through the transaction: another write method of the store
        would wait for this very lock on SQLite (and fail after the busy timeout).

        Raises:
            RunNotFound: no such run (on enter).
            StoreUnavailable: the database failed.
        """
        with self.lock_runs([run_id]) as locked:
            if run_id not in locked:
                raise RunNotFound(run_id)
            yield locked[run_id]

    @contextmanager
    def lock_runs(
        self, run_ids: Sequence[str], *, skip_locked: bool = False
    ) -> Iterator[dict[str, RunTransaction]]:
        """``lock_run`` for several runs in one transaction (group commit): a ``RunTransaction``
        per run that exists, by id; all of them commit together on exit, or none does.
        ``skip_locked`` (PostgreSQL's ``SKIP LOCKED``): a run whose row another transaction
        holds is left out as well, not waited for (SQLite: the file's write lock is the one lock).

        Rows are locked in ``run_id`` order, before anything is written, so that two
        processes locking overlapping sets never deadlock (and the global event ids, whose
        counter row an append locks on PostgreSQL, are taken only once every row is held).

        Raises:
            StoreUnavailable: the database failed.
        """
        hold = (self._driver_sql("hold free", _LOCKED_FREE) if skip_locked
                else self._driver_sql("hold", _LOCKED_ROWS["hold"]))
        with self._driver_write() as cursor:
            locked: dict[str, SqlRunTransaction] = {}
            ids = sorted(set(run_ids))
            held_rows = hold.rows_each(cursor, [{"run_id": run_id} for run_id in ids])
            for run_id, row in zip(ids, held_rows, strict=True):
                if row:  # one row, or none
                    locked[run_id] = SqlRunTransaction(_locked_run(*row[0]), self, cursor)
            try:
                yield dict(locked)
                self._write_held(cursor, list(locked.values()))
            finally:
                for tx in locked.values():
                    tx.closed = True
        if any(tx.appended for tx in locked.values()):
            self._events_committed()

    def read_events(self, run_id: str, after_seq: int = 0) -> list[Event]:
        """Events with ``seq > after_seq``, in order, without the lock (an unknown run has none).

        Raises:
            StoreUnavailable: the database failed.
        """
        with self._driver_read() as cursor:
            return self._events_after(cursor, run_id, after_seq)

    def read_events_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int = 0, through_seq: int | None = None,
        step: int | None = None, above_step: int | None = None, through_step: int | None = None,
        latest: int | None = None, first: int | None = None,
    ) -> list[Event]:
        """Events of ``kinds`` with ``after_seq < seq <= through_seq``, placed on ``step``, or
        above ``above_step`` and at most ``through_step`` (each bound where given), in order, the
        last ``latest`` of them, or the first ``first``, where given (filtered in the database,
        which scans the run's rows after ``after_seq`` by its primary key, backwards from
        ``through_seq`` for ``latest``, stopping at ``first``; only the matching ones are decoded
        here).

        Raises:
            StoreUnavailable: the database failed.
        """
        within = _of_kinds(run_id, kinds, after_seq, through_seq, step=step, above_step=above_step,
                           through_step=through_step)
        query = _in_seq_order(select(events).where(*within), latest, first)
        with self._reading() as conn:
            found = [_event(row) for row in conn.execute(query)]
        return found if latest is None else found[::-1]

    def payload_sizes_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int, through_seq: int, latest: int
    ) -> list[tuple[int, int]]:
        """``(seq, bytes of its payload's JSON)`` of each event ``read_events_of`` with the same
        arguments reads, in the same order, none decoded (``_payload_size``).

        Raises:
            StoreUnavailable: the database failed.
        """
        within = _of_kinds(run_id, kinds, after_seq, through_seq)
        newest = _in_seq_order(select(events.c.seq, self._payload_size()).where(*within), latest)
        with self._reading() as conn:
            return [(int(seq), int(size)) for seq, size in conn.execute(newest)][::-1]

    def weigh_events_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int, through_seq: int, first: int
    ) -> tuple[int, int]:
        """``(how many, bytes of their payloads' JSON)`` of the first ``first`` events of
        ``kinds`` with ``after_seq < seq <= through_seq``, summed in the database: one row back,
        however many (``payload_sizes_of`` brings a row back per event: ~3 µs each here).

        Raises:
            StoreUnavailable: the database failed.
        """
        within = _of_kinds(run_id, kinds, after_seq, through_seq)
        first_ones = _in_seq_order(select(self._payload_size().label("size")).where(*within), None, first)
        sizes = first_ones.subquery()
        query = select(func.count(), func.coalesce(func.sum(sizes.c.size), 0))
        with self._reading() as conn:
            count, size = conn.execute(query).one()
        return int(count), int(size)

    def _payload_size(self) -> Any:
        """An event's payload's bytes, read from its header: PostgreSQL's ``octet_length`` (its
        ``length`` would unpack the text to count characters), SQLite's ``length`` of it as a
        blob."""
        payload = events.c.payload
        return func.octet_length(payload) if self._postgres else func.length(cast(payload, LargeBinary))

    def count_events_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int, through_seq: int
    ) -> int:
        """How many events of ``kinds`` have ``after_seq < seq <= through_seq`` (counted in the
        database: none is read).

        Raises:
            StoreUnavailable: the database failed.
        """
        within = _of_kinds(run_id, kinds, after_seq, through_seq)
        query = select(func.count()).select_from(events).where(*within)
        with self._reading() as conn:
            return int(conn.execute(query).scalar_one())

    def steps_of(
        self, run_id: str, kinds: Sequence[EventKind], *, after_seq: int, first_step: int, last_step: int,
        limit: int,
    ) -> list[int]:
        """The distinct steps ``first_step .. last_step`` of the events of ``kinds`` with
        ``seq > after_seq``, in step order, the first ``limit`` (one statement).

        Raises:
            StoreUnavailable: the database failed.
        """
        query = select(events.c.step).distinct().where(
            *_of_kinds(run_id, kinds, after_seq), events.c.step.between(first_step, last_step),
        ).order_by(events.c.step).limit(limit)
        with self._reading() as conn:
            return list(conn.execute(query).scalars())

    def _events_after(self, cursor: Any, run_id: str, after_seq: int) -> list[Event]:
        sql = self._driver_sql("events_after", _EVENTS_AFTER)
        sql.execute(cursor, {"run_id": run_id, "after_seq": after_seq})
        found = []
        while (row := sql.one(cursor)) is not None:
            found.append(_event(row))
        return found

    def read_feed(self, after_gid: int, limit: int = 500) -> list[FeedEntry]:
        """Events of every run with a global id above ``after_gid``, in id order, at most ``limit``.

        Ids become visible in increasing order (see ``schema.event_ids`` and
        ``schema.event_gid_floor``), so reading on
        from the last id returned never skips an event committed later.

        Raises:
            StoreUnavailable: the database failed.
        """
        with self._transaction() as conn:
            return self._read_feed(conn, after_gid, limit)

    def _read_feed(self, conn: Connection, after_gid: int, limit: int) -> list[FeedEntry]:
        query = select(events).where(events.c.gid > after_gid).order_by(events.c.gid).limit(max(1, limit))
        rows = conn.execute(query).all()
        labels = self._labels_of(conn, sorted({r.run_id for r in rows}))
        return [FeedEntry(r.run_id, labels.get(r.run_id, {}), _event(r)) for r in rows]

    def _write_held(self, cursor: Any, txs: Sequence[SqlRunTransaction]) -> None:
        """What run transactions hold back to their commit: their runs' rows (one UPDATE each),
        then their events. The events go last: on PostgreSQL their INSERT takes the global id
        counter's row lock, held until COMMIT, which every transaction that appends events, in
        every process, waits for (so it is held for the last statements, not for a whole
        group's work)."""
        changed = [row for tx in txs if (row := tx.run_row()) is not None]
        if changed:
            self._driver_sql("update_run", _UPDATE_RUN).executemany(cursor, changed)
        self._insert_held_events(cursor, txs)

    def _insert_held_events(self, cursor: Any, txs: Sequence[SqlRunTransaction]) -> None:
        """Insert the events the transactions appended so far, numbered with global ids."""
        held = [tx for tx in txs if tx.held_events]
        if not held:
            return
        for tx in held:  # sent at COMMIT, whatever the order: before the counter's lock
            self._notify_on(cursor, EVENTS_CHANNEL, tx.run.run_id)
        self._insert_numbered(cursor, [row for tx in held for row in tx.held_events])
        for tx in held:
            tx.held_events = []

    def _insert_numbered(self, cursor: Any, rows: Sequence[dict[str, Any]]) -> None:
        """Insert events, each row numbered with the next global id in its own INSERT, in order.

        PostgreSQL: from the ``event_ids`` counter, whose row stays locked until this transaction
        ends: a transaction that takes ids after this one waits for it to commit or roll back, so
        ids become visible in increasing order. SQLite: one above the last id given out
        (``schema.event_gid_floor``); the file's one writer orders them. Without the counter's
        (the floor's) row the transaction fails as the database's (``StoreUnavailable``, a 503,
        naming the row) and keeps nothing."""
        if self._sqlite_writers is None:  # no answer to wait for (pipelined)
            self._driver_sql("insert_numbered_events", _INSERT_NUMBERED_EVENT).executemany(cursor, rows)
            return
        self._driver_sql("insert_sqlite_numbered_events", _SQLITE_NUMBERED_EVENT).executemany(cursor, rows)
        if cursor.rowcount != len(rows):
            raise StoreUnavailable(f"{self._where}: event_gid_floor row 1 is missing")

    def _notify_on(self, cursor: Any, channel: str, run_id: str) -> None:
        if self._postgres:
            payload = {"channel": self._channels[channel], "payload": f"{self._sender} {run_id}"}
            self._driver_sql("notify", _NOTIFY).execute(cursor, payload)

    def watch_commits(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (from the committing thread) after each commit that added events."""
        self._commit_watchers.append(callback)

    def _events_committed(self) -> None:
        for callback in self._commit_watchers:
            callback()

    def commit_listener(self) -> Callable[[Callable[[], None]], Awaitable[None]] | None:
        """PostgreSQL: an async function that ``LISTEN``s for commits of every process and
        calls its argument on each (returns when the connection is lost). SQLite: None."""
        if not self._postgres:
            return None
        conninfo = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        channel = self._channels[EVENTS_CHANNEL]

        async def listen(wake: Callable[[], None]) -> None:
            import psycopg

            async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, connect_timeout=5) as conn:
                await conn.execute(f"LISTEN {channel}")
                wake()  # commits between the last read and the LISTEN
                async for _ in conn.notifies():
                    wake()

        return listen

    def run_listener(self) -> Callable[[Callable[[str | None], None]], Awaitable[None]] | None:
        """PostgreSQL: an async function that ``LISTEN``s for other processes' decisions (their
        events) and older replicas' reports (``REPORTS_CHANNEL``) and calls its argument with
        the run's id on each (None once listening); returns when the connection is lost.
        SQLite: None (see ``BaseStore.run_listener``)."""
        if not self._postgres:
            return None
        conninfo = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        mine = f"{self._sender} "
        channels = self._channels[EVENTS_CHANNEL], self._channels[REPORTS_CHANNEL]

        async def listen(wake: Callable[[str | None], None]) -> None:
            import psycopg

            async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, connect_timeout=5) as conn:
                for channel in channels:
                    await conn.execute(f"LISTEN {channel}")
                wake(None)  # commits between the last read and the LISTEN
                async for notice in conn.notifies():
                    run_id = notice.payload.partition(" ")[2]
                    if run_id and not notice.payload.startswith(mine):
                        wake(run_id)

        return listen

    def last_gid(self) -> int:
        """The highest global event id committed so far (0 before the first event).

        Raises:
            StoreUnavailable: the database failed.
        """
        with self._reading() as conn:
            return self._last_gid(conn)

    def _last_gid(self, conn: Connection) -> int:
        """The last global event id given out. Without the row it is read from (the counter's,
        the floor's) the database is broken: ``StoreUnavailable``, as an append finds it."""
        if not self._postgres:
            last = conn.execute(select(_SQLITE_LAST_GID).where(_FLOOR_ROW)).scalar()
            where = "event_gid_floor"
        else:
            last = conn.execute(select(event_ids.c.last_gid).where(event_ids.c.id == 1)).scalar()
            where = "event_ids"
        if last is None:
            raise StoreUnavailable(f"{self._where}: {where} row 1 is missing")
        return int(last)

    # -- snapshots -------------------------------------------------------------------------

    def save_snapshot(self, run_id: str, snapshot: Snapshot, chunk: ValueChunk | None = None, *,
                      created_at: datetime | None = None) -> None:
        """Keep an engine snapshot; one at the same step is replaced. ``chunk``: the run's final
        LRs since the last snapshot (for ``read_lrs``). ``created_at``: the run's it is a snapshot
        of: a snapshot is saved after its commit, in transactions of its own, and another process
        may delete the run and create it again in between; that run must not get this one's
        engine or LRs (checked in each transaction, under the row's lock).

        The chunk is written in pieces of at most ``CHUNK_PIECE_BYTES``, each in a write
        transaction of its own, the snapshot's row with the last: on SQLite every commit of
        every run waits for the file's one write slot, and a 1024-group run's chunk is 8 MB
        (2,000 pages of log, 20-115 ms in one transaction). A piece written by a process that
        died before its snapshot is harmless: the values are final, and the next snapshot's
        pieces start at the same steps and replace it.

        Raises:
            RunNotFound: no such run.
            RunConflict: the run was created again since ``created_at``.
            StoreUnavailable: the database failed.
        """
        row = {"run_id": run_id, "step": snapshot.step, "seq": snapshot.seq,
               "state": snapshot.text if snapshot.text is not None else _dumps(snapshot.state)}
        insert = self._insert(snapshots).values(row)
        upsert = insert.on_conflict_do_update(
            index_elements=["run_id", "step"],
            set_={"seq": insert.excluded.seq, "state": insert.excluded.state},
        )
        pieces = [] if chunk is None else chunk.pieces(CHUNK_PIECE_BYTES)
        for i, piece in enumerate(pieces, 1):
            with self._transaction(write=True) as conn:
                self._require_same_run(conn, run_id, created_at)
                kept = self._insert(value_chunks).values(
                    run_id=run_id, first_step=piece.first_step, steps=piece.steps, groups=piece.groups,
                    lrs=piece.lrs)
                again = {name: kept.excluded[name] for name in ("steps", "groups", "lrs")}  # bound once
                conn.execute(kept.on_conflict_do_update(index_elements=["run_id", "first_step"], set_=again))
                if i == len(pieces):
                    conn.execute(upsert)
        if not pieces:
            with self._transaction(write=True) as conn:
                self._require_same_run(conn, run_id, created_at)
                conn.execute(upsert)

    def _require_same_run(self, conn: Connection, run_id: str, created_at: datetime | None) -> None:
        """The run, its row held against a delete (``RunNotFound``: gone; ``RunConflict``: created
        again since ``created_at``, where given)."""
        row = self._require_run(conn, run_id, "keep")
        if created_at is not None and row.created_at != created_at:
            raise RunConflict(f"run {run_id!r} was deleted and created again while this request "
                              "committed to it: ask again")

    def read_lrs(self, run_id: str, steps: Sequence[int]) -> dict[int, tuple[float, ...]]:
        """The stored final LRs of those of ``steps`` a value chunk holds (a step none holds is left out).

        One statement, however many steps: the steps go in as one bound list, each finds its
        chunk by one index seek (the chunk with the highest first step at or below it) and
        reads only its own bytes of it (``substr``). So the cost is bounded by the number of
        steps asked, not by the run's length (``_read_lrs_query``).

        Raises:
            StoreUnavailable: the database failed.
        """
        if not steps:
            return {}
        dialect = self._engine.dialect.name
        found: dict[int, tuple[float, ...]] = {}
        with self._reading() as conn:
            for row in conn.execute(_read_lrs_query(dialect),
                                    {"b_run_id": run_id, "b_steps": _list_value(dialect, steps)}):
                if row.piece is not None:
                    found[int(row.step)] = tuple(unpack_lrs(bytes(row.piece)))
        return found

    def load_snapshot(self, run_id: str, *, max_step: int | None = None) -> Snapshot | None:
        """The snapshot with the highest step (at most ``max_step``), or None.

        Raises:
            StoreUnavailable: the database failed.
        """
        query = select(snapshots).where(snapshots.c.run_id == run_id)
        if max_step is not None:
            query = query.where(snapshots.c.step <= max_step)
        query = query.order_by(snapshots.c.step.desc()).limit(1)
        with self._reading() as conn:
            row = conn.execute(query).one_or_none()
        if row is None:
            return None
        return Snapshot(step=row.step, seq=row.seq, state=_loads(row.state))

    def snapshot_marks(self, run_id: str, *, after_step: int, through_step: int) -> list[tuple[int, int]]:
        """``(step, seq)`` of the run's snapshots with ``after_step < step <= through_step``, by
        step (one index range; their states not read).

        Raises:
            StoreUnavailable: the database failed.
        """
        within = (snapshots.c.run_id == run_id, snapshots.c.step > after_step,
                  snapshots.c.step <= through_step)
        query = select(snapshots.c.step, snapshots.c.seq).where(*within).order_by(snapshots.c.step)
        with self._reading() as conn:
            return [(int(step), int(seq)) for step, seq in conn.execute(query)]

    # -- metrics and the barrier -------------------------------------------------------------

    def append_metrics(self, run_id: str, records: Sequence[MetricRecord]) -> int:
        """Record metric values; a record already stored (same name, step, rank) is kept as it was.

        Returns:
            How many records were new (duplicates within ``records`` count once).

        Raises:
            RunNotFound: no such run.
            StoreUnavailable: the database failed.
        """
        counted = _Counted()  # the INSERT's own cursor: its count outlives the transaction
        with self._driver_write(counted) as cursor:
            if self._sqlite_writers is None:  # PostgreSQL: the run's row locked first (``keep``)
                self._keep_run(cursor, run_id)
                self._insert_metrics_on(counted.cursor, run_id, records)
            else:  # SQLite: the write slot keeps out a delete until COMMIT; each row checks its run
                self._insert_metrics_on(counted.cursor, run_id, records, if_run=True)
                if counted.cursor.rowcount < len(records):  # resent rows, or no such run
                    self._keep_run(cursor, run_id)
        return counted.rows

    def _keep_run(self, cursor: Any, run_id: str) -> dict[str, Any]:
        """The run's row (a ``LockedRun``'s columns), which must not vanish before this
        transaction ends (``keep``)."""
        keep = self._driver_sql("keep", _LOCKED_ROWS["keep"])
        row = keep.one(keep.execute(cursor, {"run_id": run_id}))
        if row is None:
            raise RunNotFound(run_id)
        return row

    def _insert_metrics_on(
        self, cursor: Any, run_id: str, records: Sequence[MetricRecord], *, if_run: bool = False
    ) -> None:
        """Insert the records (a row stored already is kept); ``if_run``: only if the run exists,
        which the caller tells from the cursor's ``rowcount`` (SQLite: at once)."""
        if not records:
            return
        now = _now()
        rows = [_metric_row(run_id, r, now) for r in records]
        if if_run:
            insert = self._driver_sql("insert_metrics_of_run", self._insert_new_metrics_of_run)
        else:
            insert = self._driver_sql("insert_metrics", self._insert_new_metrics)
        insert.executemany(cursor, rows)

    def read_metrics(self, run_id: str) -> dict[str, list[MetricRow]]:
        """Every metric of a run: name -> ``(step, rank, value)`` sorted by step, then rank.

        Raises:
            StoreUnavailable: the database failed.
        """
        sql = self._driver_sql("metrics", _READ_METRICS)
        with self._driver_read() as cursor:
            rows = sql.rows(sql.execute(cursor, {"run_id": run_id}))
        return {name: _metric_tuples(row[1:] for row in named)  # ordered by name first
                for name, named in itertools.groupby(rows, key=operator.itemgetter(0))}

    def metric_names(self, run_id: str, most: int) -> list[str]:
        """The first ``most`` names of the run's metrics, in order (one statement: a seek per name).

        Raises:
            StoreUnavailable: the database failed.
        """
        if most < 1:
            return []
        with self._reading() as conn:
            return list(conn.execute(_METRIC_NAMES, {"b_run_id": run_id, "b_most": most}).scalars())

    def metric_ends(self, run_id: str, names: Sequence[str], rows: int) -> list[MetricEnds]:
        """For each of ``names``: its first ``rows`` rows, and, where it has that many, the rows
        of its last step (its first ``rows`` ranks): ranges of the primary key (on PostgreSQL
        all the names' statements in one round trip).

        Raises:
            StoreUnavailable: the database failed.
        """
        if not names:
            return []
        head = self._driver_sql("metric_head", _METRIC_HEAD)
        last = self._driver_sql("metric_last", _METRIC_LAST)
        asked = [{"run_id": run_id, "name": name, "rows": rows} for name in names]
        with self._driver_read() as cursor:
            heads = head.rows_each(cursor, asked)
            longer = [values for values, found in zip(asked, heads, strict=True) if len(found) >= rows]
            lasts = iter(last.rows_each(cursor, longer))
        return [MetricEnds(name, _metric_tuples(found),
                           _metric_tuples(next(lasts)) if len(found) >= rows else [])
                for name, found in zip(names, heads, strict=True)]

    def metric_rows_at(
        self, run_id: str, name: str, steps: Sequence[int], ranks: Sequence[int]
    ) -> list[MetricRow]:
        """The rows of ``ranks`` at the first step at or after each of ``steps`` that ``name``
        has rows at, each such step once, by step, then rank: one statement, a seek per step
        and per row, however many rows the metric has.

        Raises:
            StoreUnavailable: the database failed.
        """
        if not steps or not ranks:
            return []
        dialect = self._engine.dialect.name
        values = {"b_run_id": run_id, "b_name": name, "b_steps": _list_value(dialect, steps),
                  "b_ranks": _list_value(dialect, ranks)}
        with self._reading() as conn:
            rows = conn.execute(_metric_rows_at_query(dialect), values).all()
        return _metric_tuples(rows)

    def add_barrier_reports(
        self,
        run_id: str,
        step: int,
        reports: Mapping[int, Mapping[str, float]],
        records: Sequence[MetricRecord] = (),
    ) -> BarrierTally:
        """Record ranks' watched metrics for ``step``; a rank's first report of a name stands.

        One transaction writes the history ``records`` and the reports (the ranks that
        reached this process together), then reads the barrier back. Used where writers take turns
        (SQLite, ``one_writer``; no other process hears of it: SQLite's waiters poll): the last
        rank to report sees every report. On PostgreSQL
        two last reports written here could each miss the other: there the reports go under the
        run's lock instead (``SqlRunTransaction.add_barrier_reports``).

        Returns:
            The run's horizon and every report for ``step``, these included.

        Raises:
            RunNotFound: no such run.
            StoreUnavailable: the database failed.
        """
        with self._driver_write() as cursor:
            row = self._keep_run(cursor, run_id)
            self._insert_metrics_on(cursor, run_id, records)
            return BarrierTally(row["horizon"], self._add_reports_on(cursor, run_id, step, reports))

    def _add_reports_on(
        self, cursor: Any, run_id: str, step: int, reports: Mapping[int, Mapping[str, float]]
    ) -> dict[int, dict[str, float]]:
        """Insert the reports (a rank's first report of a name stands); every report of
        ``step`` this transaction sees, these included."""
        rows = []
        for rank, values in reports.items():
            for name, value in values.items():
                finite, value_text = _split_float(value)
                rows.append({"run_id": run_id, "step": step, "rank": rank, "name": name, "value": finite,
                             "value_text": value_text})
        if rows:
            self._driver_sql("insert_reports", self._insert_new_reports).executemany(cursor, rows)
        stored: dict[int, dict[str, float]] = {}
        select_reports = self._driver_sql("reports", _SELECT_REPORTS)
        select_reports.execute(cursor, {"run_id": run_id, "step": step})
        while (report := select_reports.one(cursor)) is not None:
            value = _join_float(report["value"], report["value_text"])
            stored.setdefault(report["rank"], {})[report["name"]] = value
        return stored

    def read_barrier(self, run_id: str, step: int) -> BarrierTally:
        """The run's horizon and the reports for ``step``, in one statement (one read).

        Raises:
            RunNotFound: no such run.
            StoreUnavailable: the database failed.
        """
        sql = self._driver_sql("barrier_tally", _BARRIER_TALLY)
        with self._driver_read() as cursor:
            rows = sql.rows(sql.execute(cursor, {"run_id": run_id, "step": step}))
        if not rows:
            raise RunNotFound(run_id)
        reports: dict[int, dict[str, float]] = {}
        for _, rank, name, value, value_text in rows:
            if rank is not None:  # the run's row alone: no report yet
                reports.setdefault(rank, {})[name] = _join_float(value, value_text)
        return BarrierTally(rows[0][0], reports)

    # -- health ----------------------------------------------------------------------------

    def ping(self) -> None:
        """Raises StoreUnavailable if the database cannot be reached (or its file changed)."""
        if self._guard is not None:
            self._guard.check()
        with self._transaction() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        """Release every pooled connection (idempotent)."""
        if self.checkpointer is not None:
            self.checkpointer.close()
        with held(self._sqlite_writers, now=False, what="the write slot"):  # a write in flight ends first
            kept, self._writer = self._writer, None
        if kept is not None:
            kept[0].close()
        self._engine.dispose()
        if self._guard is not None:
            self._guard.close()


class SqlRunTransaction(RunTransaction):
    """A run locked for writing; valid only inside its ``lock_run`` (``lock_runs``) block.

    ``run`` starts as the row read under the lock and follows this transaction's own
    writes (``last_seq``, ``horizon``, ``status``). Those reach the ``runs`` row once, as the
    block ends (``run_row``): one UPDATE per commit, not one per call. Appended events are
    held back to the end too (``held_events``; ``read_events`` writes them first), see
    ``SqlStore._write_held``.
    """

    def __init__(self, run: LockedRun, store: SqlStore, cursor: Any) -> None:
        self._cursor = cursor  # the transaction's DBAPI cursor (``SqlStore._driver_write``)
        self.run = run
        self.closed = False
        self._store = store
        self._updated_at: datetime | None = None  # set by a change of the run's row
        self.appended = False
        self.dirty = False
        self.held_events: list[dict[str, Any]] = []  # rows appended, not yet inserted

    def run_row(self) -> dict[str, Any] | None:
        """The run row's UPDATE parameters, if this transaction changed it (``lock_runs``, at the end)."""
        self._open()
        if self._updated_at is None:
            return None
        run, updated_at, self._updated_at = self.run, self._updated_at, None
        return {"b_run_id": run.run_id, "b_horizon": run.horizon, "b_status": run.status.value,
                "b_last_seq": run.last_seq, "b_updated_at": updated_at}

    def append_metrics(self, records: Sequence[MetricRecord]) -> None:
        """Record metric values in this transaction (same rules as ``SqlStore.append_metrics``)."""
        self._writing()
        self._store._insert_metrics_on(self._cursor, self.run.run_id, records)

    def _open(self) -> None:
        if self.closed:
            raise RuntimeError("the run's transaction is over; use it inside its lock_run block")

    def _writing(self) -> None:
        self._open()
        self.dirty = True

    def read_events(self, after_seq: int = 0) -> list[Event]:
        """Events with ``seq > after_seq``, in order (including ones appended here)."""
        self._open()
        self._store._insert_held_events(self._cursor, [self])
        return self._store._events_after(self._cursor, self.run.run_id, after_seq)

    def append_events(self, new_events: Sequence[NewEvent]) -> list[Event]:
        """Append events as ``last_seq + 1, ...`` and move ``runs.last_seq`` along.

        Returns:
            The events as they will be stored (``seq`` and ``at`` set, payloads as read back
            from JSON; ``gid`` is given at commit).
        """
        return [_event(row) for row in self._hold(new_events)]

    def add_events(self, new_events: Sequence[NewEvent]) -> None:
        self._hold(new_events)

    def _hold(self, new_events: Sequence[NewEvent]) -> list[dict[str, Any]]:
        """The events' rows, held back to the end (``_write_held``); ``run.last_seq`` follows."""
        self._writing()
        if not new_events:
            return []
        now, first = _now(), self.run.last_seq + 1
        rows = [_event_row(self.run.run_id, first + i, e, now, None) for i, e in enumerate(new_events)]
        self.held_events.extend(rows)  # inserted at the end, with their global ids (``_write_held``)
        self.appended = True
        run = self.run
        self.run = LockedRun(run.run_id, run.status, run.horizon, first + len(rows) - 1, run.created_at)
        self._updated_at = now
        return rows

    def add_barrier_reports(self, step: int, reports: Mapping[int, Mapping[str, float]]) -> BarrierTally:
        """Record ranks' reports for ``step`` in this transaction and read the barrier back (see
        ``RunTransaction.add_barrier_reports``). No notification: the ranks waiting in other
        processes need only this barrier's decision, which notifies with its events."""
        self._writing()
        stored = self._store._add_reports_on(self._cursor, self.run.run_id, step, reports)
        return BarrierTally(self.run.horizon, stored)

    def update_run(self, *, horizon: int | None = None, status: RunStatus | None = None) -> None:
        """Set the horizon and/or status; ``updated_at`` follows.

        A horizon below the current one is ignored (the stored value is the max of the
        two): the horizon only ever moves forward.
        """
        self._writing()
        if horizon is None and status is None:
            return
        run = self.run
        self.run = LockedRun(run.run_id, run.status if status is None else status,
                             run.horizon if horizon is None else max(int(horizon), run.horizon),
                             run.last_seq, run.created_at)
        self._updated_at = _now()


# -- rows <-> records --------------------------------------------------------------------


def _by_key(labels: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Labels in their keys' code-point order: the one order every path gives (a create's
    record, a read, a listing, the feed) on both backends. An ``ORDER BY key`` would follow the
    column's collation (PostgreSQL's under ``en_US.UTF-8`` puts ``a`` before ``B``; the store's
    create, which answers without reading, puts ``B`` first), so the same run's JSON would
    depend on the path, and the replica, that answered it."""
    return dict(sorted(labels))


def _record(row: Row[Any], labels: dict[str, str]) -> RunRecord:
    return RunRecord(
        run_id=row.run_id,
        spec=_loads(row.spec),
        labels=labels,
        status=RunStatus(row.status),
        horizon=row.horizon,
        last_seq=row.last_seq,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_seen=row.last_seen,
    )


def _busy(error: BaseException | None) -> bool:
    """SQLite's answer to a write lock it could not take at once."""
    return "database is locked" in str(error)


@contextmanager
def _cursor(conn: Connection) -> Iterator[Any]:
    """A DBAPI cursor on the connection of ``conn``'s transaction (for ``_DriverSql``)."""
    # dbapi_connection is None only for a closed connection; a transaction's is open
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    finally:
        cursor.close()


def _locked_run(run_id: str, status: str, horizon: int, last_seq: int, created_at: datetime) -> LockedRun:
    """A ``LockedRun`` from ``_LOCKED``'s row (its columns in ``LockedRun``'s order)."""
    return LockedRun(run_id, RunStatus(status), horizon, last_seq, created_at)


def _record_of(row: Mapping[str, Any], labels: dict[str, str] | None = None) -> RunRecord:
    """A ``RunRecord`` from a runs row read on the DBAPI cursor (without labels unless given)."""
    return RunRecord(run_id=row["run_id"], spec=_loads(row["spec"]), labels={} if labels is None else labels,
                     status=RunStatus(row["status"]), horizon=row["horizon"], last_seq=row["last_seq"],
                     created_at=row["created_at"], updated_at=row["updated_at"], last_seen=row["last_seen"])


def _event_row(run_id: str, seq: int, event: NewEvent, at: datetime, gid: int | None) -> dict[str, Any]:
    kind = EventKind(event.kind)
    return {"run_id": run_id, "seq": seq, "kind": kind.value, "step": event.step,
            "payload": _dumps(event.payload), "at": at, "actor": event.actor, "reason": event.reason,
            "gid": gid}


def _of_kinds(
    run_id: str, kinds: Sequence[EventKind], after_seq: int, through_seq: int | None = None, *,
    step: int | None = None, above_step: int | None = None, through_step: int | None = None,
) -> tuple[Any, ...]:
    """The event reads' filter: the run's events of ``kinds`` with ``after_seq < seq <=
    through_seq``, placed on ``step``, or above ``above_step`` and at most ``through_step``
    (each bound where given)."""
    bounds = ((operator.le, events.c.seq, through_seq), (operator.eq, events.c.step, step),
              (operator.gt, events.c.step, above_step), (operator.le, events.c.step, through_step))
    return (events.c.run_id == run_id, events.c.seq > after_seq, events.c.kind.in_([k.value for k in kinds]),
            *(bound(column, given) for bound, column, given in bounds if given is not None))


def _in_seq_order(query: Select[Any], latest: int | None, first: int | None = None) -> Select[Any]:
    """``query`` (of events) by ``seq``, the first ``first`` of them where given, or, for the
    last ``latest`` of them, newest first, so that the database stops at that many (the caller
    turns them back)."""
    assert latest is None or first is None, "the first or the last, not both"
    if latest is None:
        ordered = query.order_by(events.c.seq)
        return ordered if first is None else ordered.limit(first)
    return query.order_by(events.c.seq.desc()).limit(latest)


def _event(row: Any) -> Event:
    """An ``Event`` from an events row (a Row or the dict that was inserted)."""
    get: Callable[[str], Any] = row.get if isinstance(row, dict) else row._mapping.get
    return Event(seq=get("seq"), kind=EventKind(get("kind")), step=get("step"),
                 payload=_loads(get("payload")), at=get("at"), actor=get("actor"), reason=get("reason"),
                 gid=get("gid"))


def _metric_row(run_id: str, record: MetricRecord, at: datetime) -> dict[str, Any]:
    value, value_text = _split_float(record.value)
    return {"run_id": run_id, "name": record.name, "step": record.step, "rank": record.rank,
            "value": value, "value_text": value_text, "at": at}


def _bound_list(dialect: str, param: str, name: str) -> Any:
    """A table of one column, ``value``, of the integers bound to ``param`` as one value (a
    PostgreSQL array, a JSON array on SQLite: ``_list_value``): a list of any length in one
    statement compiled once (a ``VALUES`` list of 1,000 rows took SQLAlchemy 65 ms to compile
    on every call)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        listed = func.unnest(bindparam(param, type_=postgresql.ARRAY(BigInteger)))
        return listed.table_valued("value").render_derived(name=name)
    return func.json_each(bindparam(param)).table_valued("value").alias(name)


def _list_value(dialect: str, values: Iterable[int]) -> Any:
    """What ``_bound_list``'s parameter is bound to."""
    listed = [int(v) for v in values]
    return listed if dialect == "postgresql" else json.dumps(listed)


@functools.cache
def _read_lrs_query(dialect: str) -> Select[Any]:
    """``read_lrs``'s statement: for each step of one bound list (``b_steps``), its LRs' bytes
    in its value chunk (NULL if none holds it); compiled once."""
    wanted = _bound_list(dialect, "b_steps", "wanted")
    step = wanted.c.value
    c = value_chunks.c
    width = cast(c.groups * 8, Integer)  # PostgreSQL has substr(bytea, int, int) only
    own_bytes = func.substr(c.lrs, cast((step - c.first_step) * width + 1, Integer), width)
    piece = (  # in the last chunk starting at or below ``step`` (one index seek), if it holds it
        select(case((step < c.first_step + c.steps, own_bytes)))
        .where(c.run_id == bindparam("b_run_id"), c.first_step <= step)
        .order_by(c.first_step.desc())
        .limit(1)
        .scalar_subquery()
    )
    return select(step.label("step"), piece.label("piece")).select_from(wanted)


_LATER = metrics.alias("later")
"""The metrics table again, for the seeks of ``metric_names`` and ``metric_rows_at``."""


def _metric_names_query() -> Select[Any]:
    """``metric_names``' statement: the run's first ``b_most`` metric names, each found by one
    seek on the metrics table's primary key past the one before (a skip scan: a recursive
    query), however many rows each name has."""
    run, later = bindparam("b_run_id", type_=Text), _LATER
    found = select(func.min(metrics.c.name).label("name"), literal_column("1").label("depth")).where(
        metrics.c.run_id == run).cte("names", recursive=True)
    following = select(
        select(func.min(later.c.name)).where(later.c.run_id == run, later.c.name > found.c.name)
        .scalar_subquery(),
        found.c.depth + 1,
    ).where(found.c.name.is_not(None), found.c.depth < bindparam("b_most", type_=Integer))
    found = found.union_all(following)
    return select(found.c.name).where(found.c.name.is_not(None)).order_by(found.c.depth)


_METRIC_NAMES = _metric_names_query()
_METRIC_COLUMNS = (metrics.c.step, metrics.c.rank, metrics.c.value, metrics.c.value_text)
_OF_NAME = (metrics.c.run_id == bindparam("run_id"), metrics.c.name == bindparam("name"))
_METRIC_HEAD = select(*_METRIC_COLUMNS).where(*_OF_NAME).order_by(
    metrics.c.step, metrics.c.rank).limit(bindparam("rows"))
"""A metric's first ``rows`` rows, by step, then rank (a range of its primary key)."""
_METRIC_LAST = select(*_METRIC_COLUMNS).where(
    *_OF_NAME, metrics.c.step == select(func.max(metrics.c.step)).where(*_OF_NAME).scalar_subquery(),
).order_by(metrics.c.rank).limit(bindparam("rows"))
"""The first ``rows`` ranks' rows of a metric's last step (a seek, then a range)."""


@functools.cache
def _metric_rows_at_query(dialect: str) -> Select[Any]:
    """``metric_rows_at``'s statement: for each step of ``b_steps``, the first step at or after
    it that the metric has rows at (one seek each; each found once), and there the row of
    each rank of ``b_ranks`` (one seek each); compiled once.

    The join is spelled for each planner, so that it starts from the steps found whatever it
    knows of the table: on SQLite ordered by the lists' columns (ordered by the metric's own,
    it walked the metric's rows in key order instead: 16 s for 800,000 rows, against 20 ms);
    on PostgreSQL a ``LATERAL`` join that it may not flatten (``OFFSET 0``: flattened, with
    statistics older than the rows, it merged the steps with a scan of them all: 350 ms, against
    16 ms). Each row is found by its whole primary key: one row a seek, however many ranks a
    step has."""
    wanted, later = _bound_list(dialect, "b_steps", "wanted"), _LATER
    run, name = bindparam("b_run_id", type_=Text), bindparam("b_name", type_=Text)
    picked = select(
        select(func.min(later.c.step)).where(later.c.run_id == run, later.c.name == name,
                                             later.c.step >= wanted.c.value).scalar_subquery().label("step")
    ).select_from(wanted).distinct().subquery("picked")
    ranks = _bound_list(dialect, "b_ranks", "ranks")
    at_key = (metrics.c.run_id == run, metrics.c.name == name, metrics.c.step == picked.c.step,
              metrics.c.rank == ranks.c.value)
    steps_and_ranks = picked.join(ranks, literal_column("true"))
    if dialect == "postgresql":
        found = select(*_METRIC_COLUMNS).where(*at_key).offset(literal_column("0")).lateral("found")
        return select(found.c.step, found.c.rank, found.c.value, found.c.value_text).select_from(
            steps_and_ranks.join(found, literal_column("true"))).order_by(picked.c.step, ranks.c.value)
    return select(*_METRIC_COLUMNS).select_from(
        steps_and_ranks.join(metrics, and_(*at_key))).order_by(picked.c.step, ranks.c.value)
