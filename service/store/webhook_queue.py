"""The durable webhook queue, in the store's database (tables in ``schema``).

Three steps, each one short transaction, safe with any number of server processes:

- ``fill``: copy the events after an endpoint's ``last_gid`` that it wants into
  ``webhook_deliveries`` and move ``last_gid`` on, together. The endpoint's row is locked
  (``FOR UPDATE``; SQLite: the file's write lock), so two replicas never queue an event twice.
- ``claim``: take due deliveries that head their run's queue (no older row of the same
  run and endpoint), locking them ``FOR UPDATE SKIP LOCKED`` and leasing them for
  ``lease_s``: another replica skips them; a sender that dies leaves a lease that runs out,
  and the delivery is sent again (at least once).
- ``delivered`` / ``failed``: delete the row (the run's next becomes its head) or set
  its next attempt, and keep the endpoint's record (counts, last error).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from lrserve.service.store.events import FeedEntry
from lrserve.service.store.schema import webhook_deliveries, webhook_endpoints
from lrserve.service.store.sql import SqlStore
from sqlalchemy import and_, delete, exists, func, select, update

FILL_PAGE = 500


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery: POST ``body`` to ``endpoint``; ``attempts`` counts this one."""

    id: int
    endpoint: str
    run_id: str
    gid: int
    body: str
    attempts: int


@dataclass(frozen=True)
class EndpointStatus:
    endpoint: str
    queued_after: int
    pending: int
    oldest_pending_gid: int | None
    retrying: int
    delivered: int
    failures: int
    last_error: str | None
    last_error_at: datetime | None
    last_delivered_at: datetime | None


def _now() -> datetime:
    return datetime.now(timezone.utc)


class WebhookQueue:
    """The queue's operations over an open ``SqlStore`` (its transactions, its database)."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    def register(self, endpoint: str) -> None:
        """Start queueing for ``endpoint`` with the next event, unless it is known already."""
        with self.store._transaction(write=True) as conn:
            found = conn.execute(select(webhook_endpoints.c.endpoint).where(
                webhook_endpoints.c.endpoint == endpoint)).first()
            if found is None:
                last = self.store._last_gid(conn)
                conn.execute(self.store._insert(webhook_endpoints).values(
                    endpoint=endpoint, last_gid=last, delivered=0, failures=0).on_conflict_do_nothing())

    def work(self, endpoint: str) -> tuple[bool, bool]:
        """``(events to queue, deliveries due)`` for ``endpoint``, read without any lock, so
        an idle sender costs the database a read, never a write lock (SQLite has one)."""
        d, e = webhook_deliveries, webhook_endpoints
        now = _now()
        with self.store._transaction() as conn:
            queued = conn.execute(select(e.c.last_gid).where(e.c.endpoint == endpoint)).scalar()
            newer = queued is not None and queued < self.store._last_gid(conn)
            due = conn.execute(select(d.c.id).where(
                d.c.endpoint == endpoint, d.c.next_at <= now,
                (d.c.lease_until.is_(None)) | (d.c.lease_until < now)).limit(1)).first() is not None
        return newer, due

    def fill(self, endpoint: str, render: Callable[[FeedEntry], str | None]) -> int:
        """Queue the endpoint's next page of events; ``render`` gives the body, or None to skip one.

        Returns:
            How many events were read (a full page means: call again).
        """
        with self.store._transaction(write=True) as conn:
            row = conn.execute(select(webhook_endpoints.c.last_gid).where(
                webhook_endpoints.c.endpoint == endpoint).with_for_update(skip_locked=True)).first()
            if row is None:  # another replica is filling it right now (or it is unknown)
                return 0
            entries = self.store._read_feed(conn, row.last_gid, FILL_PAGE)
            if not entries:
                return 0
            now = _now()
            rows = []
            for entry in entries:
                body = render(entry)
                if body is not None:
                    rows.append({"endpoint": endpoint, "run_id": entry.run_id, "gid": entry.event.gid,
                                 "body": body, "attempts": 0, "next_at": now})
            if rows:
                conn.execute(webhook_deliveries.insert(), rows)
            conn.execute(update(webhook_endpoints).where(webhook_endpoints.c.endpoint == endpoint)
                         .values(last_gid=entries[-1].event.gid))
            return len(entries)

    def claim(self, endpoint: str, *, lease_s: float, limit: int = 50) -> list[Delivery]:
        """Due deliveries heading their run's queue, leased to the caller for ``lease_s``."""
        d = webhook_deliveries
        older = webhook_deliveries.alias()  # Core's: sqlalchemy.orm costs ~0.2 s at start-up
        now = _now()
        heads = select(d.c.id).where(
            d.c.endpoint == endpoint, d.c.next_at <= now,
            (d.c.lease_until.is_(None)) | (d.c.lease_until < now),
            ~exists().where(and_(older.c.endpoint == d.c.endpoint, older.c.run_id == d.c.run_id,
                                 older.c.gid < d.c.gid)),
        ).order_by(d.c.gid).limit(limit).with_for_update(skip_locked=True, of=d)
        with self.store._transaction(write=True) as conn:
            ids = [r.id for r in conn.execute(heads)]
            if not ids:
                return []
            conn.execute(update(d).where(d.c.id.in_(ids)).values(
                lease_until=now + timedelta(seconds=lease_s), attempts=d.c.attempts + 1))
            rows = conn.execute(select(d).where(d.c.id.in_(ids)).order_by(d.c.gid)).all()
        return [Delivery(r.id, r.endpoint, r.run_id, r.gid, r.body, r.attempts) for r in rows]

    def delivered(self, delivery: Delivery) -> None:
        with self.store._transaction(write=True) as conn:
            gone = conn.execute(delete(webhook_deliveries).where(
                webhook_deliveries.c.id == delivery.id).returning(webhook_deliveries.c.id)).first()
            if gone is not None:  # not already counted by a sender whose lease ran out
                conn.execute(update(webhook_endpoints).where(
                    webhook_endpoints.c.endpoint == delivery.endpoint).values(
                    delivered=webhook_endpoints.c.delivered + 1, last_delivered_at=_now()))

    def failed(self, delivery: Delivery, error: str, retry_in_s: float) -> None:
        now = _now()
        with self.store._transaction(write=True) as conn:
            conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery.id).values(
                lease_until=None, next_at=now + timedelta(seconds=retry_in_s), last_error=error[:500]))
            conn.execute(update(webhook_endpoints).where(
                webhook_endpoints.c.endpoint == delivery.endpoint).values(
                failures=webhook_endpoints.c.failures + 1, last_error=error[:500], last_error_at=now))

    def status(self, endpoints: Sequence[str]) -> list[EndpointStatus]:
        """Each endpoint's record and what waits in its queue (endpoints never filled show zeros)."""
        d, e = webhook_deliveries, webhook_endpoints
        with self.store._transaction() as conn:
            records = {r.endpoint: r for r in conn.execute(select(e).where(e.c.endpoint.in_(endpoints)))}
            queued = {r.endpoint: r for r in conn.execute(
                select(d.c.endpoint, func.count().label("n"), func.min(d.c.gid).label("oldest"),
                       func.count().filter(d.c.attempts > 0).label("retrying"))
                .where(d.c.endpoint.in_(endpoints)).group_by(d.c.endpoint))}
        out = []
        for endpoint in endpoints:
            rec, q = records.get(endpoint), queued.get(endpoint)
            out.append(EndpointStatus(
                endpoint=endpoint, queued_after=rec.last_gid if rec else 0,
                pending=q.n if q else 0, oldest_pending_gid=q.oldest if q else None,
                retrying=q.retrying if q else 0,
                delivered=rec.delivered if rec else 0, failures=rec.failures if rec else 0,
                last_error=rec.last_error if rec else None,
                last_error_at=rec.last_error_at if rec else None,
                last_delivered_at=rec.last_delivered_at if rec else None))
        return out
