"""The durable webhook queue on SQLite and PostgreSQL: filled once, heads only, leases, retries.

Two store objects on one database stand for two replicas.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from lrserve.service.events.webhooks import MAX_BACKOFF_S, backoff_s
from lrserve.service.store import open_store
from lrserve.service.store.webhook_queue import WebhookQueue

from tests.service.store.test_contract import advance, make

URL = "http://127.0.0.1:9/hook"


def render(entry):
    return f'{{"run": "{entry.run_id}", "seq": {entry.event.seq}}}'


@pytest.fixture
def replicas(store_url):
    stores = [open_store(store_url), open_store(store_url)]
    yield [WebhookQueue(s) for s in stores]
    for s in stores:
        s.close()


def test_an_endpoint_starts_with_the_next_event_and_is_filled_once_by_racing_replicas(replicas):
    one, two = replicas
    make(one.store, "a")
    one.register(URL)
    two.register(URL)  # already known: keeps its place
    for run_id in ("b", "c"):
        make(one.store, run_id)
    advance(one.store, "a", 30)
    barrier = threading.Barrier(2)

    def fill(queue):
        barrier.wait()
        total = 0
        while True:
            read = queue.fill(URL, render)
            total += read
            if read == 0 and queue.status([URL])[0].queued_after == queue.store.last_gid():
                return total

    with ThreadPoolExecutor(2) as pool:
        totals = list(pool.map(fill, replicas))
    assert sum(totals) == 32  # b and c created, 30 steps of a: read once between the two
    status = one.status([URL])[0]
    assert (status.pending, status.oldest_pending_gid, status.delivered) == (32, 2, 0)


def test_only_heads_are_claimed_a_claim_is_exclusive_and_a_failure_waits_its_backoff(replicas):
    one, two = replicas
    one.register(URL)
    make(one.store, "a")
    make(one.store, "b")
    advance(one.store, "a", 2)
    one.fill(URL, lambda e: render(e) if e.event.kind.value != "created" or e.run_id == "a" else None)
    claimed = one.claim(URL, lease_s=60)
    assert [(d.run_id, d.body, d.attempts) for d in claimed] == [("a", '{"run": "a", "seq": 1}', 1)]
    assert two.claim(URL, lease_s=60) == []  # leased: the other replica does not send it, nor a's next
    one.failed(claimed[0], "HTTP 500", retry_in_s=3600)
    assert two.claim(URL, lease_s=60) == []  # not due yet; a's later events wait behind it
    status = two.status([URL])[0]
    assert (status.pending, status.retrying, status.failures, status.last_error) == (3, 1, 1, "HTTP 500")


def test_idle_work_is_read_without_locks_and_says_what_to_do(replicas):
    one, _ = replicas
    one.register(URL)
    assert one.work(URL) == (False, False)
    make(one.store, "a")
    assert one.work(URL) == (True, False)  # an event to queue
    one.fill(URL, render)
    assert one.work(URL) == (False, True)  # a delivery due
    one.claim(URL, lease_s=60)
    assert one.work(URL) == (False, False)  # leased: nothing for anyone until it is answered


def test_delivered_frees_the_next_of_the_run_and_a_lapsed_lease_is_claimed_again(replicas):
    one, two = replicas
    one.register(URL)
    make(one.store, "a")
    advance(one.store, "a", 1)
    one.fill(URL, render)
    first = one.claim(URL, lease_s=0)  # a lease already over: as if this sender died
    again = two.claim(URL, lease_s=60)
    assert [d.gid for d in first] == [d.gid for d in again] and again[0].attempts == 2
    two.delivered(again[0])
    one.delivered(first[0])  # the late answer of the first sender is not counted twice
    nxt = one.claim(URL, lease_s=60)
    assert [d.body for d in nxt] == ['{"run": "a", "seq": 2}']
    one.delivered(nxt[0])
    status = one.status([URL])[0]
    assert (status.pending, status.delivered, status.last_delivered_at is not None) == (0, 2, True)


def test_the_backoff_doubles_to_its_cap_and_stays_there():
    # It was 1.0 * 2 ** (attempts - 1): past ~1,000 failed attempts of an endpoint down for
    # days, the float overflowed and every send failed with OverflowError.
    assert [backoff_s(n) for n in (0, 1, 2, 3)] == [1.0, 1.0, 2.0, 4.0]
    assert backoff_s(10) == MAX_BACKOFF_S
    assert backoff_s(5_000) == MAX_BACKOFF_S
