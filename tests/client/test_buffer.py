"""MetricBuffer: batching, keyed records, retries that never lose or double, bounded size."""

from __future__ import annotations

import threading

import pytest
from lrserve.client import LimitExceeded, RunNotFound, ServerTimeout, ServerUnavailable
from lrserve.client._buffer import MetricBuffer


class Sink:
    """Stores records by key, as the server does; fails as scripted."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.stored: dict[tuple[str, int, int], float] = {}
        self.batches: list[list[dict]] = []
        self.lock = threading.Lock()

    def __call__(self, records):
        with self.lock:
            self.batches.append(records)
            if self.failures:
                failure = self.failures.pop(0)
                if failure == "lost-answer":
                    self._store(records)
                    raise ServerTimeout("answer lost")
                raise failure
            self._store(records)

    def _store(self, records):
        for r in records:
            self.stored[(r["name"], r["step"], r["rank"])] = r["value"]


@pytest.fixture
def made():
    buffers = []
    yield buffers
    for buffer in buffers:
        buffer.close(1.0)


def make(made, sink, **kwargs):
    kwargs.setdefault("backoff", 0.001)
    kwargs.setdefault("flush_interval_s", 60.0)
    buffer = MetricBuffer(sink, **kwargs)
    made.append(buffer)
    return buffer


def test_records_are_sent_in_batches(made):
    sink = Sink()
    buffer = make(made, sink, batch_size=10)
    for k in range(25):
        buffer.add("loss", k, 0, float(k))
    assert buffer.flush(5.0)
    assert [len(b) for b in sink.batches] == [10, 10, 5]
    assert sink.stored == {("loss", k, 0): float(k) for k in range(25)}
    assert sink.batches[0][0] == {"step": 0, "name": "loss", "value": 0.0, "rank": 0}


def test_records_wait_at_most_the_flush_interval(made):
    sink = Sink()
    buffer = make(made, sink, flush_interval_s=0.01)
    buffer.add("loss", 1, 0, 1.0)
    for _ in range(500):
        if sink.stored:
            break
        threading.Event().wait(0.01)
    assert sink.stored == {("loss", 1, 0): 1.0}


def test_a_record_after_the_buffer_emptied_waits_at_most_the_flush_interval_too(made):
    """Regression: the sender slept until a full batch once the buffer had been empty, so a
    spike guard's loss report could wait for 999 more records."""
    sink = Sink()
    buffer = make(made, sink, flush_interval_s=0.01)
    for step in (1, 2, 3):
        buffer.add("loss", step, 0, 1.0)
        for _ in range(500):
            if ("loss", step, 0) in sink.stored:
                break
            threading.Event().wait(0.01)
        assert ("loss", step, 0) in sink.stored, f"record of step {step} still waiting"


def test_an_urgent_record_goes_without_waiting_for_the_interval(made):
    sink = Sink()
    buffer = make(made, sink)  # flush_interval_s=60: only urgency can send it in time
    buffer.add("train_loss", 1, 0, 0.5)
    buffer.add("loss", 1, 0, float("inf"), urgent=True)
    for _ in range(500):
        if sink.stored:
            break
        threading.Event().wait(0.01)
    assert sink.stored == {("train_loss", 1, 0): 0.5, ("loss", 1, 0): float("inf")}  # together


def test_same_key_keeps_the_last_value(made):
    sink = Sink()
    buffer = make(made, sink)
    buffer.add("loss", 1, 0, 1.0)
    buffer.add("loss", 1, 0, 2.0)
    buffer.add("loss", 1, 1, 3.0)
    assert len(buffer) == 2
    assert buffer.flush(5.0)
    assert sink.stored == {("loss", 1, 0): 2.0, ("loss", 1, 1): 3.0}


def test_transient_failures_are_retried_and_nothing_is_lost(made):
    sink = Sink(ServerUnavailable("down", status_code=503), ServerTimeout("slow"), "lost-answer")
    buffer = make(made, sink)
    for k in range(5):
        buffer.add("loss", k, 0, float(k))
    assert buffer.flush(5.0)
    assert sink.stored == {("loss", k, 0): float(k) for k in range(5)}
    assert len(sink.batches) == 4
    assert all(b == sink.batches[0] for b in sink.batches)  # re-sent with the same keys
    assert buffer.dropped == 0 and buffer.take_problems() == []


def test_too_large_batches_are_halved(made):
    sink = Sink(LimitExceeded("too big", status_code=413))
    buffer = make(made, sink, batch_size=8)
    for k in range(8):
        buffer.add("loss", k, 0, float(k))
    assert buffer.flush(5.0)
    assert [len(b) for b in sink.batches] == [8, 4, 4]
    assert len(sink.stored) == 8


def test_refused_batches_are_dropped_and_reported(made):
    sink = Sink(RunNotFound("no run", status_code=404))
    buffer = make(made, sink)
    buffer.add("loss", 1, 0, 1.0)
    assert buffer.flush(5.0)
    assert buffer.dropped == 1
    problems = buffer.take_problems()
    assert len(problems) == 1 and "refused 1 metric records" in problems[0]
    assert buffer.take_problems() == []


def test_full_buffer_drops_the_oldest(made):
    sink = Sink(*[ServerUnavailable("down", status_code=503)] * 1000)
    buffer = make(made, sink, max_records=3, backoff=10.0)
    results = [buffer.add("loss", k, 0, float(k)) for k in range(5)]
    assert results == [True, True, True, False, False]
    assert buffer.dropped == 2
    sink.failures.clear()
    buffer.close(0.0)  # the sender is waiting out its backoff: close cuts it short


def test_close_reports_what_it_could_not_send(made):
    sink = Sink(*[ServerUnavailable("down", status_code=503)] * 10_000)
    buffer = make(made, sink)
    buffer.add("loss", 1, 0, 1.0)
    assert buffer.close(0.05) == 1
    assert buffer.dropped == 1
    with pytest.raises(RuntimeError):
        buffer.add("loss", 2, 0, 1.0)


def test_flush_of_an_empty_buffer_returns_at_once(made):
    buffer = make(made, Sink())
    assert buffer.flush(0.0)
    assert buffer.close() == 0


def test_sender_thread_starts_lazily_and_stops_on_close(made):
    buffer = make(made, Sink())
    assert buffer._thread is None
    buffer.add("loss", 1, 0, 1.0)
    thread = buffer._thread
    assert thread is not None and thread.daemon
    buffer.close(5.0)
    assert not thread.is_alive()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        MetricBuffer(Sink(), max_records=0)


def test_a_sent_nan_leaves_the_buffer(made):
    """NaN != NaN must not keep a delivered record (it was re-sent forever)."""
    sink = Sink()
    buffer = make(made, sink)
    buffer.add("loss", 1, 0, float("nan"))
    assert buffer.flush(5.0)
    assert len(buffer) == 0
    assert buffer.close(5.0) == 0
    assert len(sink.batches) == 1
