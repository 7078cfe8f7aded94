"""Liveness: when each run was last heard from, and which active runs went quiet (``stale``).

Every request a job's rank makes about its run (``GET .../lr``, ``POST .../step``,
``POST .../metrics``) that the server answers with success marks the run as seen. On
the hot path that is one set lookup and one dict write (``observe``, called by the
telemetry middleware, which knows every answer's route and status, the fast path's
included); the database learns of it in batches: every ``LRSERVE_LAST_SEEN_FLUSH_S``
each process writes the runs it saw since its last flush, in one transaction
(``Liveness.flush``). ``last_seen`` in an answer is the later of the stored time and
this process's unflushed one (or the one its last flush wrote, kept in memory until the next
flush: an answer whose row was read before that write still carries it); another replica's
unflushed sightings are at most one flush interval behind, far below
``LRSERVE_STALE_AFTER_S``.

A run is ``stale`` when it is ``active`` and has not been heard from for
``LRSERVE_STALE_AFTER_S`` (a ``held`` job is expected to be quiet; a ``stopped`` one is
done). A run never seen since its database was upgraded counts from its last change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import OutageLog, StoreUnavailable
from lrserve.service.store.base import BaseStore, RunRecord
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

log = logging.getLogger("lrserve")

RANK_ROUTES = frozenset({"/v1/runs/{run_id}/lr", "/v1/runs/{run_id}/step", "/v1/runs/{run_id}/metrics"})
"""The routes a job's ranks call: a successful answer on one marks its run as seen."""
MAX_PENDING = 100_000
"""Most distinct runs one process remembers between two flushes (more are seen at the next)."""


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


class Liveness:
    """This process's unflushed sightings, and the rules that turn ``last_seen`` into ``stale``.

    Args:
        stale_after_s: An active run not heard from for this long is stale.
        clock: The wall clock in seconds since the epoch (a float is cheaper to take than a
            datetime, on every request), for tests.
    """

    def __init__(self, stale_after_s: float, clock: Callable[[], float] = time.time) -> None:
        self.stale_after = timedelta(seconds=stale_after_s)
        self._clock = clock
        self._pending: dict[str, float] = {}
        self._flushed: dict[str, float] = {}
        """The last flush's sightings, being written or written: a row read before that write
        (a request that read it as the flush ran) is answered with them all the same."""
        self._flush_lock = threading.Lock()

    def observe(self, route: str, scope: Scope, status: int) -> None:
        """Called as every answer starts, before the client can read it (``TelemetryMiddleware``,
        which has its route and status anyway): a set lookup for most requests, one dict write
        for a rank's."""
        if status < 300 and route in RANK_ROUTES:
            run_id = scope.get("path_params", {}).get("run_id")
            if run_id is not None:
                self.seen(run_id)

    def seen(self, run_id: str) -> None:
        """A rank asked about ``run_id`` just now (a dict write: safe from the event loop)."""
        pending = self._pending
        if len(pending) < MAX_PENDING or run_id in pending:
            pending[run_id] = self._clock()

    def flush(self, store: BaseStore) -> int:
        """Write the sightings since the last flush; on a database failure they are kept for the next.

        Returns:
            How many runs were written.
        """
        with self._flush_lock:
            batch, self._pending = self._pending, {}
            self._flushed = batch  # visible until the next flush: longer than any read in flight
            try:
                store.mark_seen({run_id: _utc(at) for run_id, at in batch.items()})
            except StoreUnavailable:
                for run_id, at in batch.items():  # merge back: newer sightings win
                    if self._pending.get(run_id, at) <= at:
                        self._pending[run_id] = at
                raise
            return len(batch)

    def last_seen(self, record: RunRecord) -> datetime | None:
        """The later of the stored ``last_seen`` and this process's latest sighting (unflushed,
        or written by the last flush, which ``record`` may have been read before)."""
        pending = self._latest(record.run_id)
        stored = record.last_seen
        if pending is None or (stored is not None and stored >= _utc(pending)):
            return stored
        return _utc(pending)

    def stale_before(self) -> datetime:
        """Runs last heard from before this instant are stale (if active)."""
        return _utc(self._clock()) - self.stale_after

    def is_stale(self, record: RunRecord, status: RunStatus) -> bool:
        heard = self.last_seen(record) or record.updated_at
        return status is RunStatus.ACTIVE and heard < self.stale_before()

    def heard_recently(self, run_id: str) -> bool:
        """This process saw the run after the stale cut-off (its database row may not say so yet)."""
        pending = self._latest(run_id)
        return pending is not None and _utc(pending) >= self.stale_before()

    def _latest(self, run_id: str) -> float | None:
        """This process's latest sighting of ``run_id`` (two dict lookups: the hot reads call it)."""
        pending = self._pending.get(run_id)
        return self._flushed.get(run_id) if pending is None else pending

    async def flush_every(self, store: BaseStore, interval_s: float, after: Callable[[], Any]) -> None:
        """Flush every ``interval_s`` until cancelled, then ``after()`` (the gauges); failures are logged."""
        outage = OutageLog(log, "last_seen", "not written (kept for the next try)")
        while True:
            await asyncio.sleep(interval_s)
            try:
                await run_in_threadpool(self.flush, store)
                await run_in_threadpool(after)
            except StoreUnavailable as exc:
                outage.failed(exc)
            else:
                outage.ok()
