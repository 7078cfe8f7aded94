"""Tables of the SQL store and the versioned migrations that create them.

The database records its schema version in ``schema_version`` (one row). Opening a store
brings an older database up to ``SCHEMA_VERSION`` by running the missing steps of
``MIGRATIONS`` in one transaction, under a lock, so that two processes opening a fresh
database at once neither crash nor run a step twice. A database written by a newer
version of the code is refused (``SchemaTooNew``) rather than misread.

Rules for changing the schema: never edit a released step; append a new one, bump
``SCHEMA_VERSION`` implicitly by appending, and keep ``metadata`` describing the newest
schema. Step 1 creates the version-1 tables from ``metadata``; the first step that alters
one of them must therefore freeze the version-1 definitions inside ``_migrate_v1``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from lrserve.service.errors import StoreUnavailable
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.schema import CreateColumn


class SchemaTooNew(StoreUnavailable):
    """The database was written by a newer lrserve; this one must not touch it."""


_SQLITE_DATETIME_FORMAT = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"
)
"""SQLAlchemy's default text for a SQLite ``DATETIME`` (``sqlalchemy.dialects.sqlite.DATETIME``)."""


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL keeps ``timestamptz`` (returned in the session's zone, so we convert);
    SQLite keeps text without a zone, so we store naive UTC and reattach the zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, ``process_bind_param`` and the dialect's own text format (SQLAlchemy's
        ``%(year)04d-...%(microsecond)06d``) in one step, from a tuple rather than a dict of
        the fields, and the last text kept for the same object bound again: the same text for
        every datetime in a third of the instructions, or none (a control binds one ``now``
        twice: its event's ``at``, the run's ``updated_at``). Elsewhere, or with another storage
        format, SQLAlchemy's composition."""
        if dialect.name != "sqlite" or not self._sqlite_default(dialect):
            return super().bind_processor(dialect)
        utc = timezone.utc
        last: list[tuple[datetime | None, str]] = [(None, "")]  # the last one bound: a commit's
        # events and its run row bind the same ``now`` object (read and replaced whole: no lock)

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            seen, text = last[0]
            if value is seen:  # the very object: the same text
                return text
            if value.tzinfo is None:
                raise ValueError("naive datetime given to the store; use timezone-aware UTC")
            at = value if value.tzinfo is utc else value.astimezone(utc)
            text = "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 - fewer instructions than an f-string
                at.year, at.month, at.day, at.hour, at.minute, at.second, at.microsecond)
            last[0] = (value, text)
            return text

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        """On SQLite, the text this type writes (``bind_processor``: 26 characters, no zone)
        read as UTC in one ``fromisoformat``, with the zone written on: SQLAlchemy's
        ``fromisoformat`` then ``process_result_value``'s ``replace`` cost five times more
        (callgrind), once per run row a hot write locks. Any other text, or another dialect,
        goes through SQLAlchemy's composition."""
        composed = super().result_processor(dialect, coltype)
        if dialect.name != "sqlite" or composed is None or not self._sqlite_default(dialect):
            return composed
        utc_text = datetime.fromisoformat

        def process(value: Any) -> Any:
            if type(value) is str and len(value) == 26 and value[19] == ".":  # ...SS.ffffff: no zone
                return utc_text(value + "+00:00")
            return composed(value)

        return process

    def _sqlite_default(self, dialect: Dialect) -> bool:
        """Whether SQLite's ``DATETIME`` here is SQLAlchemy's default text (no storage format or
        regular expression of its own)."""
        impl = self.impl_instance.dialect_impl(dialect)
        return (getattr(impl, "_storage_format", None) == _SQLITE_DATETIME_FORMAT
                and getattr(impl, "_reg", 1) is None)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _double() -> Float[float]:
    """A 64-bit float column (DOUBLE PRECISION on PostgreSQL, REAL on SQLite)."""
    return Float(precision=53)


metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one row
    Column("version", Integer, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("spec", Text, nullable=False),  # JSON
    Column("status", String(32), nullable=False),
    Column("horizon", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=True),  # v2: last request of any rank (liveness)
)

run_labels = Table(
    "run_labels",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", String(256), nullable=False),
    Index("ix_run_labels_key_value", "key", "value"),
)

events = Table(
    "events",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(32), nullable=False),
    Column("step", BigInteger, nullable=True),
    Column("payload", Text, nullable=False),  # JSON
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(128), nullable=False, server_default="server"),  # v2
    Column("reason", Text, nullable=True),  # v2: an operator's words with an action
    # v3: the global event id, increasing across runs in commit order (see ``event_ids``);
    # NULL only while ``_migrate_v3`` numbers the rows of an older database.
    Column("gid", BigInteger, nullable=True),
    Index("ux_events_gid", "gid", unique=True),
)

event_ids = Table(
    "event_ids",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one row
    Column("last_gid", BigInteger, nullable=False),
)
"""PostgreSQL (SQLite up to schema v5): the last global event id given out. A transaction
appending events takes the next ids from this row, which locks it until that transaction
commits: so ids become visible in increasing order, and a reader that has seen id ``n`` never
later finds a smaller one committed (on PostgreSQL a sequence would not promise that)."""

event_gid_floor = Table(
    "event_gid_floor",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one row
    Column("gid", BigInteger, nullable=False),
)
"""SQLite (schema v6 on): every global event id given out is at most the greater of ``gid``
and the greatest ``events.gid``; an event takes the next one in its own INSERT
(``sql._SQLITE_LAST_GID``). SQLite has one writer per file, whose transaction holds the file
until it commits, so ids become visible in increasing order without a counter row updated
(and logged) by every commit, as ``event_ids`` was; ``gid`` changes only where events are
deleted (the trigger ``_RAISE_GID_FLOOR``, whoever deletes them), so that no id is given out
twice."""

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("endpoint", String(512), primary_key=True),  # the configured URL
    Column("last_gid", BigInteger, nullable=False),  # events up to here are queued (or did not match)
    Column("delivered", BigInteger, nullable=False, server_default="0"),
    Column("failures", BigInteger, nullable=False, server_default="0"),  # failed attempts, all time
    Column("last_error", Text, nullable=True),
    Column("last_error_at", UTCDateTime, nullable=True),
    Column("last_delivered_at", UTCDateTime, nullable=True),
)
"""One row per configured webhook URL: how far its queue has been filled, and its record."""

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("endpoint", String(512), nullable=False),
    Column("run_id", String(128), nullable=False),
    Column("gid", BigInteger, nullable=False),
    Column("body", Text, nullable=False),  # the exact bytes signed and sent, every attempt
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_at", UTCDateTime, nullable=False),
    Column("lease_until", UTCDateTime, nullable=True),  # claimed by a sender until then
    Column("last_error", Text, nullable=True),
    Index("ux_webhook_deliveries_order", "endpoint", "run_id", "gid", unique=True),
    Index("ix_webhook_deliveries_due", "endpoint", "next_at"),
)
"""The durable webhook queue: a row per event still to deliver to an endpoint (deleted once
delivered). Only a run's oldest row per endpoint is ever sent, so runs stay in order."""

snapshots = Table(
    "snapshots",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("step", BigInteger, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("state", Text, nullable=False),  # JSON
)

value_chunks = Table(
    "value_chunks",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("first_step", BigInteger, primary_key=True, autoincrement=False),
    Column("steps", BigInteger, nullable=False),
    Column("groups", Integer, nullable=False),
    Column("lrs", LargeBinary, nullable=False),  # float64 little-endian, step-major: steps × groups
)
"""A run's final LRs, saved with each engine snapshot (the steps since the last one), so that
``GET .../history`` reads the values of the steps it shows, however long the run, instead of
replaying it from step 0 after a restart. Chunks may overlap (replicas); final values agree."""

# Float values: ``value`` holds the number; where SQLite's REAL cannot (it turns NaN into
# NULL and -0.0 into 0.0), ``value`` is NULL and ``value_text`` spells it ("nan", "-inf", "-0.0").
metrics = Table(
    "metrics",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("step", BigInteger, primary_key=True, autoincrement=False),
    Column("rank", Integer, primary_key=True, autoincrement=False),
    Column("value", _double(), nullable=True),
    Column("value_text", String(8), nullable=True),
    Column("at", UTCDateTime, nullable=False),
)

barrier_reports = Table(
    "barrier_reports",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("step", BigInteger, primary_key=True, autoincrement=False),
    Column("rank", Integer, primary_key=True, autoincrement=False),
    Column("name", String(128), primary_key=True),
    Column("value", _double(), nullable=True),
    Column("value_text", String(8), nullable=True),
)

RUN_TABLES = (run_labels, events, snapshots, metrics, barrier_reports, value_chunks)
"""Tables keyed by ``run_id`` besides ``runs`` itself (deleted with the run)."""


def _v1_metadata() -> MetaData:
    """The version-1 tables, frozen: ``_migrate_v1`` creates exactly these, forever."""
    v1 = MetaData()
    Table("runs", v1, Column("run_id", String(128), primary_key=True), Column("spec", Text, nullable=False),
          Column("status", String(32), nullable=False), Column("horizon", BigInteger, nullable=False),
          Column("last_seq", BigInteger, nullable=False), Column("created_at", UTCDateTime, nullable=False),
          Column("updated_at", UTCDateTime, nullable=False))
    Table("run_labels", v1, Column("run_id", String(128), primary_key=True),
          Column("key", String(128), primary_key=True), Column("value", String(256), nullable=False),
          Index("ix_run_labels_key_value", "key", "value"))
    Table("events", v1, Column("run_id", String(128), primary_key=True),
          Column("seq", BigInteger, primary_key=True, autoincrement=False),
          Column("kind", String(32), nullable=False), Column("step", BigInteger, nullable=True),
          Column("payload", Text, nullable=False), Column("at", UTCDateTime, nullable=False))
    Table("snapshots", v1, Column("run_id", String(128), primary_key=True),
          Column("step", BigInteger, primary_key=True, autoincrement=False),
          Column("seq", BigInteger, nullable=False), Column("state", Text, nullable=False))
    Table("metrics", v1, Column("run_id", String(128), primary_key=True),
          Column("name", String(128), primary_key=True),
          Column("step", BigInteger, primary_key=True, autoincrement=False),
          Column("rank", Integer, primary_key=True, autoincrement=False),
          Column("value", _double(), nullable=True), Column("value_text", String(8), nullable=True),
          Column("at", UTCDateTime, nullable=False))
    Table("barrier_reports", v1, Column("run_id", String(128), primary_key=True),
          Column("step", BigInteger, primary_key=True, autoincrement=False),
          Column("rank", Integer, primary_key=True, autoincrement=False),
          Column("name", String(128), primary_key=True), Column("value", _double(), nullable=True),
          Column("value_text", String(8), nullable=True))
    return v1


def _migrate_v1(conn: Connection) -> None:
    """Initial schema."""
    _v1_metadata().create_all(conn, checkfirst=True)


_V2_COLUMNS = (
    ("events", Column("actor", String(128), nullable=False, server_default="server")),
    ("events", Column("reason", Text, nullable=True)),
    ("runs", Column("last_seen", UTCDateTime, nullable=True)),
)


def _migrate_v2(conn: Connection) -> None:
    """Who caused each event (``actor``, ``reason``) and when a run was last heard from.

    Events written before it record the actor ``server``. A column already there (a
    half-applied step on a backend without transactional DDL) is left as it is.
    """
    inspector = inspect(conn)
    for table_name, column in _V2_COLUMNS:
        if column.name in {c["name"] for c in inspector.get_columns(table_name)}:
            continue
        ddl = CreateColumn(column).compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE {table_name} ADD COLUMN {ddl}"))


def _migrate_v3(conn: Connection) -> None:
    """Global event ids: ``events.gid`` (existing events numbered in the order they were
    written) and the ``event_ids`` counter."""
    if "gid" not in {c["name"] for c in inspect(conn).get_columns("events")}:
        conn.execute(text("ALTER TABLE events ADD COLUMN gid BIGINT"))
    ordered = conn.execute(
        select(events.c.run_id, events.c.seq).where(events.c.gid.is_(None))
        .order_by(events.c.at, events.c.run_id, events.c.seq)
    ).all()
    start = conn.execute(select(func.coalesce(func.max(events.c.gid), 0))).scalar_one()
    if ordered:
        conn.execute(
            update(events).where(events.c.run_id == bindparam("b_run"), events.c.seq == bindparam("b_seq"))
            .values(gid=bindparam("b_gid")),
            [{"b_run": r.run_id, "b_seq": r.seq, "b_gid": start + i} for i, r in enumerate(ordered, 1)],
        )
    next(i for i in events.indexes if i.name == "ux_events_gid").create(conn, checkfirst=True)
    event_ids.create(conn, checkfirst=True)
    last = start + len(ordered)
    if conn.execute(select(event_ids.c.id)).first() is None:
        conn.execute(event_ids.insert().values(id=1, last_gid=last))


def _migrate_v4(conn: Connection) -> None:
    """The webhook queue: ``webhook_endpoints`` and ``webhook_deliveries``."""
    metadata.create_all(conn, tables=[webhook_endpoints, webhook_deliveries], checkfirst=True)


def _migrate_v5(conn: Connection) -> None:
    """Stored final LRs for history: ``value_chunks`` (runs written before it replay instead)."""
    metadata.create_all(conn, tables=[value_chunks], checkfirst=True)


def _migrate_v6(conn: Connection) -> None:
    """SQLite: events number themselves (``event_gid_floor``) instead of taking ids from the
    ``event_ids`` counter, whose UPDATE was a statement and a page of the log in every commit
    that appended events. The counter's table goes: a process of an older version still
    running on the file then fails each append (no such table: a 503, nothing written)
    rather than numbering events from a counter nobody else moves. PostgreSQL keeps the
    counter: its writers run concurrently, and the row's lock is what orders their ids.

    A trigger raises the floor to each deleted event's id above it (``_RAISE_GID_FLOOR``), so
    whatever deletes events (``SqlStore.delete_run``, or an older process's, which knows no
    floor) never lets an id be given out twice: a reader past it would skip the new event."""
    if conn.dialect.name != "sqlite":
        return
    event_gid_floor.create(conn, checkfirst=True)
    if conn.execute(select(event_gid_floor.c.id)).first() is None:
        last = conn.execute(select(event_ids.c.last_gid).where(event_ids.c.id == 1)).scalar_one_or_none()
        conn.execute(event_gid_floor.insert().values(id=1, gid=last or 0))
    conn.execute(text(_RAISE_GID_FLOOR))
    event_ids.drop(conn, checkfirst=True)


_RAISE_GID_FLOOR = """
CREATE TRIGGER IF NOT EXISTS events_raise_gid_floor AFTER DELETE ON events
WHEN OLD.gid > (SELECT gid FROM event_gid_floor WHERE id = 1)
BEGIN
    UPDATE event_gid_floor SET gid = OLD.gid WHERE id = 1;
END
"""
"""SQLite (v6 on): a deleted event's id above ``event_gid_floor``'s becomes the floor."""


MIGRATIONS: list[Callable[[Connection], None]] = [
    _migrate_v1, _migrate_v2, _migrate_v3, _migrate_v4, _migrate_v5, _migrate_v6,
]
"""``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``; append only."""

SCHEMA_VERSION = len(MIGRATIONS)

_PG_MIGRATION_LOCK = 0x6C72_7376  # advisory lock key ("lrsv"); held for the migration only


def migrate(conn: Connection) -> int:
    """Create or upgrade the schema inside the caller's (write) transaction.

    The caller's transaction must already exclude other writers on SQLite
    (``BEGIN IMMEDIATE``); on PostgreSQL this takes a transaction-scoped advisory lock,
    because two ``CREATE TABLE IF NOT EXISTS`` racing there can still collide.

    Returns:
        The version the database is at afterwards.

    Raises:
        SchemaTooNew: the database is newer than this code.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    schema_version.create(conn, checkfirst=True)
    current = conn.execute(select(schema_version.c.version)).scalar_one_or_none()
    if current is not None and current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database schema is version {current}, newer than this lrserve understands "
            f"({SCHEMA_VERSION}); upgrade lrserve or point it at another database"
        )
    for step in MIGRATIONS[current or 0 :]:
        step(conn)
    _record_version(conn, current)
    return SCHEMA_VERSION


def _record_version(conn: Connection, previous: int | None) -> None:
    values: dict[str, Any] = {"version": SCHEMA_VERSION}
    if previous is None:
        conn.execute(schema_version.insert().values(id=1, **values))
    elif previous != SCHEMA_VERSION:
        conn.execute(schema_version.update().where(schema_version.c.id == 1).values(**values))
