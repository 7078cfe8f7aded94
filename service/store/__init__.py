"""Persistent state of runs: the store contract and ``open_store``, which picks the backend.

``open_store`` is the only place that reads a database URL's scheme (optuna's
``get_storage``): ``sqlite:///path`` opens an SQLite file, ``postgresql+psycopg://...``
a PostgreSQL database. Both are served by the same ``SqlStore``.
"""

from __future__ import annotations

import os
import select
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lrserve.service.errors import StoreUnavailable
from lrserve.service.settings import DEFAULT_SQLITE_SYNCHRONOUS, SQLITE_SYNCHRONOUS
from lrserve.service.store.base import BaseStore, MetricRecord, RunRecord, RunTransaction, Snapshot
from lrserve.service.store.events import Event, EventKind, FeedEntry, NewEvent
from lrserve.service.store.guard import DatabaseMissing, FileIdentity, check_existed, unwritable, write_marker
from lrserve.service.store.schema import SchemaTooNew
from lrserve.service.store.sql import (
    SQLITE_BEGIN_OPTION,
    SQLITE_BUSY_TIMEOUT_S,
    SQLITE_WAL,
    SqlStore,
    begin_sqlite,
    restore_busy_timeout,
)
from lrserve.service.store.wal import WAL_KEEP_BYTES
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy import exc as sa_exc

__all__ = [
    "BaseStore",
    "DatabaseMissing",
    "Event",
    "EventKind",
    "FeedEntry",
    "MetricRecord",
    "NewEvent",
    "RunRecord",
    "RunTransaction",
    "SchemaTooNew",
    "Snapshot",
    "open_store",
    "wait_for_store",
]

POSTGRES_CONNECT_TIMEOUT_S = 5


def open_store(
    url: str, *, sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS, create_db: bool = False
) -> SqlStore:
    """Open (and create or migrate) the store a database URL names.

    Args:
        url: ``sqlite:///path/to/file.db`` or ``postgresql+psycopg://user@host:port/db``
            (``postgresql://`` means psycopg too).
        sqlite_synchronous: SQLite's ``synchronous`` pragma. With WAL, ``NORMAL`` makes a
            commit survive a crash of the process, ``FULL`` also a power loss.
        create_db: Create an SQLite file even where one existed before and is gone
            (``service.store.guard``); a first start creates it regardless.

    Returns:
        An open store; call ``close`` when done.

    Raises:
        ValueError: the URL names no supported backend, the SQLite mode is unknown, or
            psycopg's libpq is older than 14 (``require_pipeline``).
        StoreUnavailable: the database cannot be reached (the message names the host or
            file, never the password).
        SchemaTooNew: the database was written by a newer lrserve.
        DatabaseMissing: the SQLite file existed here before and is gone (not ``create_db``).
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        # the text itself is not repeated: it may hold a password
        raise ValueError(
            "not a database URL: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        ) from exc
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return _open_sqlite(parsed, sqlite_synchronous, create_db)
    if parsed.drivername in ("postgresql", "postgresql+psycopg"):
        return _open_postgres(parsed.set(drivername="postgresql+psycopg"))
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: "
        "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
    )


def wait_for_store(
    url: str,
    *,
    wait_s: float = 0.0,
    sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS,
    create_db: bool = False,
    on_wait: Callable[[StoreUnavailable, float], None] | None = None,
    poll_s: float = 1.0,
) -> BaseStore:
    """``open_store``, retried for up to ``wait_s`` seconds after its first failure while the
    database cannot be reached.

    Services start in any order (a compose file, a database restarting under its
    replicas): waiting a little at start-up beats crashing into a restart loop. A schema
    newer than the code is not retried; waiting cannot fix it.

    Args:
        url: As for ``open_store``.
        wait_s: How long to keep trying after the first try failed; 0 tries once.
        sqlite_synchronous: As for ``open_store``.
        on_wait: Called before each pause with the error and the seconds left.
        poll_s: Pause between tries.

    Raises:
        ValueError, StoreUnavailable, SchemaTooNew, DatabaseMissing: as ``open_store``, once
            time is up (the last two at once: waiting cannot fix them).
    """
    deadline: float | None = None  # from the first failure: a slow first try (a busy host) still waits
    while True:
        try:
            return open_store(url, sqlite_synchronous=sqlite_synchronous, create_db=create_db)
        except (SchemaTooNew, DatabaseMissing):
            raise
        except StoreUnavailable as exc:
            if deadline is None:
                deadline = time.monotonic() + max(0.0, wait_s)
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if on_wait is not None:
                on_wait(exc, left)
            time.sleep(min(poll_s, left))


def _open_sqlite(url: URL, synchronous: str, create_db: bool) -> SqlStore:
    """An SQLite file in WAL mode, shared by threads through a pool of connections, its
    identity guarded (``service.store.guard``)."""
    mode = synchronous.upper()
    if mode not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
    path = url.database or ""
    if path in ("", ":memory:") or path.startswith("file::memory:"):
        raise ValueError("an in-memory SQLite database cannot be shared; give a file path")
    if path.startswith("file:"):
        raise ValueError("give the SQLite database as sqlite:///PATH (not a file: URI)")
    database = Path(os.path.abspath(path))
    check_existed(database, create=create_db)
    if (why := unwritable(database)) is not None:
        raise StoreUnavailable(f"SQLite database {path}: {why}")
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        pool_size=10,
        max_overflow=30,
    )
    _install_sqlite_hooks(engine, mode, database)
    try:
        with engine.connect():  # creates the file: its identity is what the guard keeps
            pass
    except sa_exc.DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        raise StoreUnavailable(f"SQLite database {path}: {reason}") from exc
    guard = FileIdentity(database)
    event.listen(engine, "connect", guard.refuse_another_file, insert=True)  # before its PRAGMAs
    store = SqlStore(engine, where=f"SQLite database {path}", guard=guard)
    write_marker(database)
    return store


def _install_sqlite_hooks(engine: Engine, synchronous: str, database: Path) -> None:
    """Let SQLAlchemy, not the sqlite3 module, emit BEGIN (SQLAlchemy's pysqlite recipe).

    sqlite3 (Python < 3.12 default) begins transactions lazily and not for SELECT or
    DDL; we need a real BEGIN, and ``BEGIN IMMEDIATE`` for write transactions (the
    store sets the ``SQLITE_BEGIN_OPTION`` execution option for those).

    SQLite opens a file it cannot write read-only, and the connection stays so after the
    file is writable again (its first write fails, even after ``BEGIN IMMEDIATE``): a
    connection opened while the file was unwritable is marked, and the pool discards it at
    checkout once the file is writable, so the first write after recovery succeeds.
    """

    created = [False]  # the store's first connection creates the file (where allowed); no other may

    @event.listens_for(engine, "do_connect")
    def _before_connect(_dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        record.info[_OPENED_READ_ONLY] = unwritable(database) is not None  # before: a race only discards
        if created[0]:
            # mode=rw: a pool's new connection after the file was deleted or moved fails
            # ("unable to open database file": a 503) instead of creating an empty database
            # at the path, which a restart would then have taken for the run history
            cargs[:] = [f"file:{quote(str(database))}?mode=rw"]
            cparams["uri"] = True

    @event.listens_for(engine, "first_connect")
    def _first(_dbapi_connection: Any, _record: Any) -> None:
        created[0] = True

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.get(_OPENED_READ_ONLY) and unwritable(database) is None:
            raise sa_exc.DisconnectionError("opened read-only; the file is writable now")
        restore_busy_timeout(dbapi_connection, record.info)  # an event loop's writer given back

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own
        cursor = dbapi_connection.cursor()
        try:
            record.info[SQLITE_WAL] = _enable_wal(cursor)
            cursor.execute(f"PRAGMA synchronous={synchronous}")  # checked against a fixed list
            cursor.execute("PRAGMA wal_autocheckpoint=0")  # not in a COMMIT: a thread's (store/wal.py)
            cursor.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")  # the log's file once it restarts
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # on the driver's connection: a statement through SQLAlchemy costs ten times this one
        # (an error is the driver's own; SqlStore._transaction reports both kinds alike)
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        begin_sqlite(conn.connection.driver_connection, mode, conn.connection.info)


_OPENED_READ_ONLY = "lrserve_opened_read_only"


def _enable_wal(cursor: Any) -> bool:
    """Put the file in WAL mode (it stays so), waiting while another connection writes to it;
    whether it is (a file system without shared memory keeps a rollback journal).

    Only a new file switches; while another connection holds a write transaction on it (a
    second store opening the same new file, say), SQLite answers "database is locked" at
    once rather than calling its busy handler, so the wait is here.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            (mode,) = cursor.execute("PRAGMA journal_mode=WAL").fetchone()
            return str(mode).lower() == "wal"
        except sqlite3.OperationalError as exc:
            if "database is locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


POSTGRES_POOL_SIZE = 12
POSTGRES_POOL_OVERFLOW = 0
"""Connections one process holds, and none beyond them: the pool closed an overflow connection
as soon as it came back to a full pool, so under figure 5's commit load 3-7 % of commits
opened a new session (a server process forked, psycopg's connect). The server is shared: two
processes of a 1,000-rank job held up to ~60 of its 100 with 10 + 20; now at most 12 each,
plus one ``LISTEN`` connection. The API's commits run in as many threads
(``RunManager.in_commit_thread`` says which)."""


def _open_postgres(url: URL) -> SqlStore:
    """PostgreSQL through psycopg 3, with a pool that drops connections the server closed."""
    import psycopg

    require_pipeline(psycopg.Pipeline.is_supported(), psycopg.pq.version())
    # psycopg prepares nothing of its own: once it has, its rollback() sends DEALLOCATE ALL,
    # which drops the pipeline's prepared statements too (``pg_pipeline``'s notes)
    connect_args: dict[str, Any] = {"prepare_threshold": None}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    engine = create_engine(
        url, connect_args=connect_args, pool_size=POSTGRES_POOL_SIZE, max_overflow=POSTGRES_POOL_OVERFLOW,
    )
    _install_postgres_hooks(engine)
    where = f"PostgreSQL at {url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
    return SqlStore(engine, where=where, secrets=[url.password or ""])


def require_pipeline(supported: bool, libpq: int) -> None:
    """Writes to PostgreSQL are pipelined (``pg_pipeline.pipelined``), which needs libpq 14 or newer.

    Raises:
        ValueError: ``supported`` is False (``psycopg.Pipeline.is_supported()``), naming
            ``libpq`` (``psycopg.pq.version()``, as 140005 for 14.5): at start-up, not at the first write.
    """
    if not supported:
        raise ValueError(f"PostgreSQL needs libpq 14 or newer (pipeline mode); psycopg here uses libpq "
                         f"{libpq // 10000}.{libpq % 10000}: install psycopg[binary] or a newer libpq")


def _install_postgres_hooks(engine: Engine) -> None:
    """Drop a pooled connection the server has closed, and with it the whole pool, at checkout.

    A restarted server (or ``pg_terminate_backend``) ends its sessions with a message and
    closes their sockets: an idle pooled connection's socket is then readable, which a poll
    without waiting sees (a system call, where ``pool_pre_ping`` sent a statement: a round
    trip per transaction). An idle connection is otherwise sent nothing (pooled ones never
    ``LISTEN``), so anything there means the session is over. The pool then replaces every
    connection it held before (a restart broke them all) and the request gets a new one. A
    connection that breaks without a word (a lost network) is found by its first failure
    instead (``SqlStore._discard``): that request's 503, then the pool is replaced as here.
    """

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if _hung_up(dbapi_connection):
            raise sa_exc.InvalidatePoolError("the server closed the connection")


def _hung_up(connection: Any) -> bool:
    """Whether the server closed this idle psycopg connection (or the driver knows it broken)."""
    if connection.closed or connection.broken:
        return True
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN)
    return bool(poller.poll(0))
