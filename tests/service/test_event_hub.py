"""The event hub on a real store: a live stream that falls behind is cut off, one catching up is not.

Streams over HTTP are tested against real servers in tests/e2e/test_event_stream.py; here the
hub is driven directly so that a consumer can stop reading at an exact point.
"""

from __future__ import annotations

import asyncio
import time

from lrserve.service.events.hub import DEFAULT_BUFFER, EventHub, FeedFilter, Overflow
from lrserve.service.settings import Settings
from lrserve.service.store import EventKind, NewEvent, open_store


async def _next_events(stream, n: int) -> list:
    """The next ``n`` events of a hub stream (it yields them in batches)."""
    got: list = []
    while len(got) < n:
        batch = await asyncio.wait_for(anext(stream), 30)
        assert not isinstance(batch, Overflow), batch
        got.extend(batch)
    assert len(got) == n
    return got


def _run(scenario, *stores) -> None:
    """``scenario()`` on a new event loop, then ``stores`` closed, whatever happened."""
    try:
        asyncio.run(scenario())
    finally:
        for store in stores:
            store.close()


async def _beating(store, heartbeat_s: float) -> EventHub:
    """A started hub that reads the log every 10 ms and sends heartbeats after ``heartbeat_s``."""
    hub = EventHub(store, poll_s=0.01)
    hub.heartbeat_s = heartbeat_s
    await hub.start()
    return hub


def _append(store, n: int) -> None:
    with store.lock_run("r") as tx:
        tx.append_events([NewEvent(EventKind.CONTROL, 1, {"i": i}) for i in range(n)])


def test_a_live_stream_that_falls_a_buffer_behind_is_cut_off_and_the_rest_go_on(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/hub.db")
    store.create_run("r", {}, {}, NewEvent(EventKind.CREATED, None, {}))
    assert Settings().events_buffer == DEFAULT_BUFFER == 1000

    async def scenario():
        hub = EventHub(store)
        await hub.start()
        slow = hub.follow(1, FeedFilter())
        fast = hub.follow(1, FeedFilter())
        for gid in (2, 3):  # whether 2 comes from the database or live, 3 comes live
            both = asyncio.gather(_next_events(slow, 1), _next_events(fast, 1))
            await asyncio.to_thread(_append, store, 1)
            assert [e[0].event.gid for e in await both] == [gid, gid]
        fast_got = []

        async def read_fast():
            async for batch in fast:
                fast_got.extend(batch)
                if len(fast_got) >= DEFAULT_BUFFER + 5:
                    return

        reader = asyncio.create_task(read_fast())
        for _ in range(DEFAULT_BUFFER + 5):  # one commit each: the hub offers them as they come
            await asyncio.to_thread(_append, store, 1)
        await asyncio.wait_for(reader, 60)
        assert [e.event.gid for e in fast_got] == list(range(4, DEFAULT_BUFFER + 9))
        cut = await anext(slow)
        assert cut == Overflow(last_id=3, buffer=DEFAULT_BUFFER)
        assert hub.streams == 1  # the slow one is gone; resuming from its last id loses nothing
        resumed = hub.follow(cut.last_id, FeedFilter())
        assert (await anext(resumed))[0].event.gid == 4
        await slow.aclose()
        await fast.aclose()
        await resumed.aclose()
        await hub.close()

    _run(scenario, store)


def test_a_stream_catching_up_reads_on_from_the_database_however_far_behind(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/hub.db")
    store.create_run("r", {}, {}, NewEvent(EventKind.CREATED, None, {}))
    _append(store, 2500)  # more than a page and more than the buffer, before the stream opens

    async def scenario():
        hub = EventHub(store, buffer=10)
        await hub.start()
        stream = hub.follow(0, FeedFilter(kinds=frozenset({"control"})))
        got = await _next_events(stream, 499)  # the first page: gid 1 is the created event
        for _ in range(30):  # live events arrive while it is still reading the backlog
            await asyncio.to_thread(_append, store, 1)
        await asyncio.sleep(0.5)  # the hub has offered them all: the buffer overflowed
        got += await _next_events(stream, 2530 - 499)
        assert [g.event.gid for g in got] == list(range(2, 2532))
        await stream.aclose()
        await hub.close()

    _run(scenario, store)


def test_an_idle_stream_gets_heartbeats(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/hub.db")

    async def scenario():
        hub = EventHub(store)
        hub.heartbeat_s = 0.05  # 15 s by default (HEARTBEAT_S): the interval is not the point here
        await hub.start()
        stream = hub.follow(0, FeedFilter())
        assert [await anext(stream), await anext(stream)] == [[], []]
        await stream.aclose()
        await hub.close()

    _run(scenario, store)


def test_a_stream_that_gets_events_gets_no_heartbeat_and_one_idle_for_the_interval_does(tmp_path):
    """One timer for every stream (``EventHub._heartbeats``): a stream's heartbeat comes only
    after ``heartbeat_s`` without a batch, never between events that come more often."""
    store = open_store(f"sqlite:///{tmp_path}/hub.db")
    store.create_run("r", {}, {}, NewEvent(EventKind.CREATED, None, {}))

    async def scenario():
        hub = await _beating(store, 0.5)
        loop = asyncio.get_running_loop()
        stream = hub.follow(1, FeedFilter())
        got: list[tuple[float, int]] = []  # (when, how many events) of each batch, as it came

        async def read() -> None:
            async for batch in stream:
                got.append((loop.time(), len(batch)))
                if len(got) > 1 and not batch and sum(n for _, n in got) == 12:
                    return  # the heartbeat after the last event

        reader = asyncio.create_task(read())
        try:
            for _ in range(12):  # 1.2 s of an event every 0.1 s: more than two intervals
                await asyncio.to_thread(_append, store, 1)
                await asyncio.sleep(0.1)
            await asyncio.wait_for(reader, 30)
        finally:
            await hub.close()
        # a batch is yielded in the reader's own task, and the interval counts from when it
        # asks again: after the time noted here
        gaps = [when - before for (before, _), (when, n) in zip(got, got[1:], strict=False) if n == 0]
        assert gaps and min(gaps) >= 0.5, got  # never before the interval without a batch

    _run(scenario, store)


def test_a_stream_slow_to_catch_up_or_to_take_a_batch_gets_no_heartbeat_at_once(tmp_path, monkeypatch):
    """A stream's heartbeat counts from when its consumer asks for the next batch: a catch-up
    read, or a consumer's write, that took longer than the interval brings no heartbeat at
    once (the first version of the shared timer sent one right away after either)."""
    store = open_store(f"sqlite:///{tmp_path}/hub.db")
    store.create_run("r", {}, {}, NewEvent(EventKind.CREATED, None, {}))
    reading = store.read_feed

    def slow_from_the_start(after, limit=500):
        if after == 0:
            time.sleep(0.8)  # the stream's catch-up read (the hub reads on from gid 1)
        return reading(after, limit)

    monkeypatch.setattr(store, "read_feed", slow_from_the_start)

    async def scenario():
        hub = await _beating(store, 0.5)
        loop = asyncio.get_running_loop()
        stream = hub.follow(0, FeedFilter())
        try:
            assert [e.event.gid for e in await asyncio.wait_for(anext(stream), 30)] == [1]  # caught up
            asked = loop.time()
            assert await asyncio.wait_for(anext(stream), 30) == []
            assert loop.time() - asked >= 0.5  # a heartbeat, an interval after it asked
            await asyncio.to_thread(_append, store, 1)
            assert [e.event.gid for e in await _next_events(stream, 1)] == [2]  # (a heartbeat first
            # only if the hub took the interval to read it: a busy machine)
            await asyncio.sleep(0.8)  # the consumer busy with that batch for longer than the interval
            asked = loop.time()
            assert await asyncio.wait_for(anext(stream), 30) == []
            assert loop.time() - asked >= 0.5
        finally:
            await stream.aclose()
            await hub.close()

    _run(scenario, store)


def test_on_postgres_a_commit_of_another_process_wakes_the_hub_through_notify(database_url):
    """The hub's poll is set to an hour: only NOTIFY can bring it another store's commit."""
    url = database_url("postgres")
    mine, other = open_store(url), open_store(url)  # two stores: two processes' pools
    other.create_run("r", {}, {}, NewEvent(EventKind.CREATED, None, {}))

    async def scenario():
        hub = EventHub(mine, poll_s=3600, listen=mine.commit_listener())
        await hub.start()
        stream = hub.follow(await asyncio.to_thread(mine.last_gid), FeedFilter())
        waiting = asyncio.ensure_future(_next_events(stream, 1))
        await asyncio.sleep(0.5)  # the stream is live and the listener connected
        await asyncio.to_thread(_append, other, 1)
        (event,) = await asyncio.wait_for(waiting, 30)
        assert event.event.kind is EventKind.CONTROL
        await stream.aclose()
        await hub.close()

    _run(scenario, mine, other)


def test_with_no_stream_open_commits_cost_no_read_and_a_stream_opened_later_misses_nothing(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/hub.db")
    store.create_run("r", {}, {}, NewEvent(EventKind.CREATED, None, {}))
    reads: list[int] = []
    read_feed = store.read_feed
    store.read_feed = lambda after, limit=500: reads.append(after) or read_feed(after, limit)

    async def scenario():
        hub = EventHub(store, poll_s=0.05)
        await hub.start()
        for _ in range(20):
            await asyncio.to_thread(_append, store, 1)
        await asyncio.sleep(0.3)  # several polls: each reads only where the log ends
        assert reads == []
        stream = hub.follow(1, FeedFilter())  # from just after the created event
        got = await _next_events(stream, 20)
        live = asyncio.ensure_future(_next_events(stream, 3))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(_append, store, 3)
        got += await live
        assert [e.event.gid for e in got] == list(range(2, 25))
        await stream.aclose()
        await hub.close()

    _run(scenario, store)


def test_on_postgres_the_hub_passes_each_notification_on_with_its_run(database_url):
    """One LISTEN connection per process: the hub's, which tells the metric barrier too."""
    url = database_url("postgres")
    mine, other = open_store(url), open_store(url)
    other.create_run("r", {}, {}, NewEvent(EventKind.CREATED, None, {}))

    async def scenario():
        hub = EventHub(mine, poll_s=3600, listen=mine.run_listener())
        told: list[str | None] = []
        connected = asyncio.Event()
        heard = asyncio.Event()
        hub.notices.append(lambda run_id: told.append(run_id) or (heard if run_id else connected).set())
        await hub.start()
        await asyncio.wait_for(connected.wait(), 30)
        await asyncio.to_thread(_append, other, 1)  # another process's commit
        await asyncio.to_thread(_append, mine, 1)  # this process's own commit: not told again
        await asyncio.wait_for(heard.wait(), 30)
        await asyncio.sleep(0.3)
        assert told[0] is None and told[1:] == ["r"]
        await hub.close()

    _run(scenario, mine, other)
