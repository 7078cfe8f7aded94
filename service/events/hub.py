"""The live event feed of one server process: follows the store's global log, fans out to streams.

One ``EventHub`` per process reads events in global-id order (``BaseStore.read_feed``)
and offers each to every open stream (``EventHub.follow``). It reads when woken: at
once by a commit of this process (``BaseStore.watch_commits``), by PostgreSQL's
``NOTIFY`` for commits of other replicas, and every ``poll_s`` in any case (other SQLite
processes, a lost notification). While no stream is open it reads only where the log ends,
every ``poll_s`` (a commit costs no read then): a stream that opens catches up from the
database by itself.

A stream never blocks the hub: each has a bounded buffer (``buffer`` events). A stream
whose consumer falls that far behind while live is cut off: its buffer is dropped and it
ends with an ``Overflow`` marker (the route sends it as an ``overflow`` message); the
consumer resumes from its last id and loses nothing. While a stream is still catching up
from the database it reads on from the database instead, at its own pace.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from lrserve.service.errors import OutageLog, StoreUnavailable
from lrserve.service.store.base import BaseStore
from lrserve.service.store.events import FeedEntry
from starlette.concurrency import run_in_threadpool

log = logging.getLogger("lrserve.events")

DEFAULT_BUFFER = 1000
DEFAULT_POLL_S = 0.25
HEARTBEAT_S = 15.0
PAGE = 500


@dataclass(frozen=True)
class FeedFilter:
    """Which events a stream wants: every given condition must hold."""

    run_id: str | None = None
    labels: Mapping[str, str] | None = None
    kinds: frozenset[str] | None = None

    def matches(self, entry: FeedEntry) -> bool:
        if self.run_id is not None and entry.run_id != self.run_id:
            return False
        if self.kinds is not None and entry.event.kind.value not in self.kinds:
            return False
        return all(entry.labels.get(k) == v for k, v in (self.labels or {}).items())


@dataclass(frozen=True)
class Overflow:
    """The stream was cut off: its consumer fell ``buffer`` events behind. ``last_id`` is
    the last id it was sent (or the one it asked to resume after)."""

    last_id: int
    buffer: int


class _Subscription:
    def __init__(self, feed_filter: FeedFilter, limit: int) -> None:
        self.filter = feed_filter
        self.limit = limit
        self.pending: deque[FeedEntry] = deque()
        self.overflowed = False
        self.ready = asyncio.Event()
        self.beat = False  # the heartbeat's time came (``heartbeat``)
        self.sent_at = 0.0  # the loop's time its consumer last asked for a batch (live from then)

    def offer(self, entry: FeedEntry) -> None:
        if self.overflowed or not self.filter.matches(entry):
            return
        if len(self.pending) >= self.limit:
            self.overflowed = True
            self.pending.clear()
        else:
            self.pending.append(entry)
        self.ready.set()

    def heartbeat(self) -> None:
        """The stream waited ``heartbeat_s`` for an event: wake it to send a heartbeat."""
        self.beat = True
        self.ready.set()


HEARTBEAT_CHECKS = 4
"""Checks for idle streams per ``heartbeat_s`` (``EventHub._heartbeats``): a stream's heartbeat
comes ``heartbeat_s`` to ``(1 + 1 / HEARTBEAT_CHECKS) × heartbeat_s`` after its consumer asked
for its next batch."""


class EventHub:
    """Follows the global event log for this process's streams.

    Args:
        store: The store whose log to follow.
        buffer: Events one stream may fall behind before it is cut off.
        poll_s: Longest pause between two reads of the log.
        listen: An async callable that waits for the database's own wake-ups and calls
            its argument on each (PostgreSQL ``LISTEN``); None where there is none.
    """

    def __init__(
        self,
        store: BaseStore,
        *,
        buffer: int = DEFAULT_BUFFER,
        poll_s: float = DEFAULT_POLL_S,
        listen: Callable[[Callable[[str | None], None]], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.buffer = buffer
        self.heartbeat_s = HEARTBEAT_S
        self.encoded: OrderedDict[int, bytes] = OrderedDict()
        """Recent events as the stream sends them, by id: encoded once, sent to every stream."""
        self.poll_s = poll_s
        self._listen = listen
        self._read_outage = OutageLog(log, "event feed", "cannot read the log")
        self._subs: set[_Subscription] = set()
        self._joined = 0  # streams opened so far (a count, to tell that one opened meanwhile)
        self._wake = asyncio.Event()
        self._last = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.notices: list[Callable[[str | None], None]] = []
        """Also told of each notification the listener brings (a run's id; None once listening)."""

    @property
    def streams(self) -> int:
        """How many streams are open."""
        return len(self._subs)

    async def start(self) -> None:
        """Start following the log from its current end."""
        loop = asyncio.get_running_loop()
        self._last = await run_in_threadpool(self.store.last_gid)

        def committed() -> None:  # in the committing thread; with no stream open, the poll suffices
            if self._subs:
                loop.call_soon_threadsafe(self._wake.set)

        self.store.watch_commits(committed)
        self._tasks.append(asyncio.create_task(self._follow(), name="lrserve-event-hub"))
        self._tasks.append(asyncio.create_task(self._heartbeats(), name="lrserve-event-heartbeats"))
        if self._listen is not None:
            self._tasks.append(asyncio.create_task(self._listen_forever(), name="lrserve-event-listen"))

    async def close(self) -> None:
        """End every stream and stop following."""
        self._closed = True
        for sub in self._subs:
            sub.ready.set()
        self._wake.set()  # the follower ends after its read in flight (a cancelled read's thread
        for task in self._tasks[1:]:  # would still hold a connection while the store closes)
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        """Read the log now (call from the event loop's thread)."""
        self._wake.set()

    async def _follow(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:  # not yet TimeoutError on Python 3.10
                pass
            self._wake.clear()
            if self._closed:
                return
            try:
                if not self._subs and await self._skip_ahead():
                    continue
                while True:
                    page = await run_in_threadpool(self.store.read_feed, self._last, PAGE)
                    for entry in page:
                        self._last = entry.event.gid or self._last
                        for sub in self._subs:
                            sub.offer(entry)
                    if len(page) < PAGE:
                        break
            except StoreUnavailable as exc:
                self._read_outage.failed(exc)
                await asyncio.sleep(self.poll_s)
            else:
                self._read_outage.ok()

    async def _heartbeats(self) -> None:
        """Wake every live stream that has waited ``heartbeat_s`` for its next batch (checked
        ``HEARTBEAT_CHECKS`` times an interval): one timer for all streams. A timer per
        stream's wait (``asyncio.wait_for``, a task each) cost 6 of the ~20 µs of the server's
        CPU that each event cost a stream (``bench.stream_cost``: 20.4 µs, now 14.5)."""
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                await asyncio.sleep(self.heartbeat_s / HEARTBEAT_CHECKS)
                idle_since = loop.time() - self.heartbeat_s
                for sub in self._subs:  # no await in the loop: no stream joins or leaves meanwhile
                    if sub.sent_at <= idle_since:
                        sub.heartbeat()
        except Exception:  # never expected; said, since no stream would get a heartbeat after it
            log.exception("event stream heartbeats stopped")
            raise

    async def _skip_ahead(self) -> bool:
        """With no stream open, move the cursor to the log's end without reading the events:
        a stream that opens catches up from the database itself. False (read on as usual) if
        one opened while the end was read: it may have caught up to an earlier end."""
        joined = self._joined
        last = await run_in_threadpool(self.store.last_gid)
        if self._joined != joined or self._subs:
            return False
        self._last = max(self._last, last)
        self._read_outage.ok()
        return True

    async def _listen_forever(self) -> None:
        assert self._listen is not None
        outage = OutageLog(log, "event feed", "database notifications lost, polling only")

        def woke(run_id: str | None = None) -> None:  # once listening, then on every notification
            outage.ok()
            if self._subs:
                self.wake()
            for notice in self.notices:
                notice(run_id)

        while not self._closed:
            try:
                await self._listen(woke)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the poll still runs; try again later
                outage.failed(exc)
            await asyncio.sleep(max(1.0, self.poll_s))

    async def follow(self, after: int, feed_filter: FeedFilter) -> AsyncIterator[list[FeedEntry] | Overflow]:
        """Every matching event with a global id above ``after``, in id order, then live ones,
        in batches (what is there when the consumer asks); while live, an empty batch once
        the consumer has waited ``heartbeat_s`` (to ``(1 + 1 / HEARTBEAT_CHECKS) ×``) for its
        next one (``_heartbeats``: from ``start`` on).

        Ends with an ``Overflow`` if the consumer falls ``buffer`` events behind while
        live, or plainly when the hub closes.
        """
        sub = _Subscription(feed_filter, self.buffer)
        loop = asyncio.get_running_loop()
        self._subs.add(sub)  # first: what the hub reads from now on reaches the buffer
        self._joined += 1
        self._wake.set()  # the hub may have skipped reads while no stream was open
        try:
            cursor = after
            while not self._closed:  # catch up from the database, at the consumer's pace
                page = await run_in_threadpool(self.store.read_feed, cursor, PAGE)
                if page:
                    cursor = page[-1].event.gid or cursor
                    batch = [entry for entry in page if feed_filter.matches(entry)]
                    if batch:
                        yield batch
                if len(page) == PAGE:
                    continue
                if not sub.overflowed:
                    break
                sub.overflowed = False  # fell behind while catching up: read on from the database
                sub.pending.clear()
            sub.sent_at, sub.beat = loop.time(), False  # live from now: no heartbeat of the catch-up's
            while not self._closed:
                await sub.ready.wait()  # woken by an event, the heartbeats (``_heartbeats``) or close
                sub.ready.clear()
                if sub.overflowed:
                    self._subs.discard(sub)
                    yield Overflow(cursor, self.buffer)
                    return
                batch = []
                while sub.pending:
                    entry = sub.pending.popleft()
                    if (entry.event.gid or 0) > cursor:
                        cursor = entry.event.gid or cursor
                        batch.append(entry)
                if batch or sub.beat:
                    yield batch  # empty: a heartbeat
                    # counted from when the consumer asks again: one that took the heartbeat's
                    # interval to write this batch gets no heartbeat at once
                    sub.sent_at, sub.beat = loop.time(), False
        finally:
            self._subs.discard(sub)
