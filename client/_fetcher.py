"""Background fetches: ``WindowFetcher`` (windows of final values) and ``TailFetcher`` (the
provisional tail), each on a thread of its own.

The training thread submits one fetch at a time to each and takes its result when it
wants it; the window thread retries a failed fetch with backoff until the server answers
(or the fetch is dropped), delivering first any watched-metric reports that waited for
the server. The tail is fetched apart so that its answers (thousands of values, which
take the server a moment to compute and the client a moment to parse) never delay a
window the loop is about to need. Neither touches the scheduler's values on its own:
merging them stays on the training thread, so the hot path needs no lock, with one
exception: a decision handed off (``WindowFetcher.hand_off``, ``overlap_decisions=True``)
is taken into the scheduler's state on the window thread, as that contract says.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
from lrserve.client._client import DEFAULT_MAX_BACKOFF, LRClient, backoff_delay
from lrserve.client._exceptions import (
    ClientClosed,
    LRServiceError,
    ScheduleError,
    ServerError,
    TransportError,
)

__all__ = [
    "HANDLED",
    "NOT_READY",
    "TAIL_CHUNK_VALUES",
    "EndOfSchedule",
    "TailFetcher",
    "WindowFetcher",
    "is_outage",
    "tail_chunk",
]

#: What ``take()`` answers when no result is there to take.
NOT_READY: Any = object()
#: What ``take()`` answers for a hand-off whose answer the window thread already took in
#: (``WindowFetcher.hand_off``): nothing is left to merge.
HANDLED: Any = object()
#: Most values (steps x param groups) of tail one request asks for: its answer is parsed on
#: the tail thread holding the GIL (~3 ms for 8,192 one-group steps with orjson here), so a
#: tail of 60 s of training comes in a few such pauses of the training thread, not one long one.
TAIL_CHUNK_VALUES = 8192


def tail_chunk(groups: int) -> int:
    """Steps of tail one request asks for at most, with ``groups`` param groups."""
    return max(1, TAIL_CHUNK_VALUES // max(1, groups))


class _Job:
    """One fetch handed to a worker thread: ``fn(*args)``, then its result or error.

    Lighter than a ``concurrent.futures.Future`` (no condition of its own, no callbacks):
    the training thread submits one per report, so what a hand-off costs it counts. The
    worker sets ``value``/``error`` before ``done``; a reader that sees ``done`` sees both.
    ``finish``, when set, is called with the job instead of setting ``done`` (it must set
    it); ``revoked`` tells it that the submitter stopped waiting (``WindowFetcher.hand_off``).
    """

    __slots__ = ("args", "done", "error", "finish", "fn", "notify", "revoked", "value")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        notify: Callable[[], None] | None,
        finish: Callable[[_Job], None] | None = None,
    ) -> None:
        self.fn, self.args, self.notify, self.finish = fn, args, notify, finish
        self.done = self.revoked = False
        self.value: Any = None
        self.error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class EndOfSchedule:
    """The answer when the schedule cannot produce ``step`` (torch would raise there)."""

    def __init__(self, step: int) -> None:
        self.step = step


def is_outage(exc: BaseException) -> bool:
    """Whether an error means "the server is away" (retry later), not "the request is wrong"."""
    return isinstance(exc, TransportError) or (isinstance(exc, ServerError) and exc.retryable)


class WindowFetcher:
    """One daemon thread that fetches windows (``GET .../lr``) and delivers late reports.

    Args:
        client: The connection (shared with the training thread; its senders are thread-safe).
        run_id: Returns the run's id (it changes when a checkpoint of another run is loaded).
        current_step: Returns the step the job is at.
        limit_ahead: ``(first, ahead) -> ahead`` that stays before the next report step.
        tail_fields: ``first -> fields`` a request for the window from ``first`` sends after
            the job rode the provisional tail (``provisional_from``: the outage is settled).
        rank: Sent with late reports.
        report_timeout: Timeout of a report (a metric barrier may hold it).
        clock: Measures how long fetches take.
        rand: Random numbers for the backoff jitter.
        plan: ``(step, now) -> ahead`` of a hand-off's report, on this thread (``hand_off``).
        accept: ``answer -> HANDLED`` (or what the training thread must take itself, e.g.
            ``EndOfSchedule``): a hand-off's answer taken into the scheduler, on this thread.
    """

    def __init__(
        self,
        client: LRClient,
        *,
        run_id: Callable[[], str],
        current_step: Callable[[], int],
        limit_ahead: Callable[[int, int], int],
        tail_fields: Callable[[int], dict[str, int]] = lambda first: {},
        rank: int = 0,
        report_timeout: httpx.Timeout | None = None,
        clock: Callable[[], float] = time.perf_counter,
        rand: Callable[[], float] = random.random,
        plan: Callable[[int, float], int] | None = None,
        accept: Callable[[Any], Any] | None = None,
    ) -> None:
        self._client = client
        self._run_id = run_id
        self._current_step = current_step
        self._limit_ahead = limit_ahead
        self._tail_fields = tail_fields
        self._rank = rank
        self._report_timeout = report_timeout
        self._clock = clock
        self._rand = rand
        self._plan = plan
        self._accept = accept
        self.pending: deque[tuple[int, dict[str, float]]] = deque()  # reports the server has not had
        self.failures = 0  # failed tries of the fetch in flight
        self.error: BaseException | None = None  # the last of them
        self.seconds = 0.0  # how long a fetch takes (smoothed)
        self._job: _Job | None = None
        self._cancel = threading.Event()
        self._cv = threading.Condition()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether a fetch was submitted and its result not taken yet."""
        return self._job is not None

    def done(self) -> bool:
        """Whether the fetch in flight has a result (or an error) to take."""
        return self._job is not None and self._job.done

    def submit(self, start: int | None, ahead: int) -> None:
        """Fetch the window of ``start .. start + ahead`` (``None``: from the job's current step)."""
        self._start(_Job(self._fetch, (start, ahead, self._cancel), self._notify))

    def hand_off(self, step: int, now: float) -> None:
        """Post the report of ``step`` (the last one in ``pending``) and take its answer in.

        Both run on this thread: the window's ``ahead`` is planned there (``plan(step,
        now)``, ``now`` the clock when the job reported) and the answer taken into the
        scheduler there (``accept``), so the training thread only hands the job over and,
        at ``take()``, finds ``HANDLED``. The threading contract, which the scheduler keeps:
        from this call until ``take()`` returns this job (or ``drop()``), the training
        thread neither reads nor writes the state ``plan`` and ``accept`` use. A ``take()``
        that stops waiting before the answer came revokes the job (under the lock that
        ``accept`` runs under): its answer is then the raw one, taken in by the training
        thread as any other.
        """
        self._start(_Job(self._decide, (step, now, self._cancel), self._notify, self._hand_back))

    def _start(self, job: _Job) -> None:
        self._jobs.put(job)
        if self._thread is None:
            self._thread = threading.Thread(
                target=_work, args=(self._jobs,), name="lrserve-fetch", daemon=True
            )
            self._thread.start()
        self._job = job

    def take(self, *, wait: bool, stop_waiting: Callable[[], bool], timeout: float | None = None) -> Any:
        """The result of the fetch in flight, or ``NOT_READY``.

        Args:
            wait: Wait for it, until it is done or ``stop_waiting()`` is true.
            stop_waiting: Checked whenever a try fails.
            timeout: Wait at most this long (seconds).

        Raises:
            LRServiceError: The fetch failed for good (e.g. the run is gone).
        """
        job = self._job
        if job is None:
            return NOT_READY
        if not job.done:
            if not wait:
                return NOT_READY
            with self._cv:
                self._cv.wait_for(lambda: job.done or stop_waiting(), timeout)
                if not job.done:
                    job.revoked = True  # a hand-off's answer is now the caller's to take in
                    return NOT_READY
        self._job = None
        try:
            return job.result()
        except ClientClosed:
            return NOT_READY

    def handled(self) -> bool:
        """Whether the fetch in flight was a hand-off whose answer this thread took in
        (``take()`` would answer ``HANDLED``); if so it is taken."""
        job = self._job
        if job is not None and job.done and job.value is HANDLED:
            self._job = None
            return True
        return False

    def drop(self) -> None:
        """Abandon the fetch in flight; its thread stops retrying (and takes no answer in)."""
        job = self._job
        if job is not None:
            with self._cv:  # after an accept running now: none runs once this returns
                job.revoked = True
        self._cancel.set()
        self._notify()
        self._cancel = threading.Event()
        self._job = None
        self.failures = 0

    def close(self, timeout: float | None = None) -> None:
        """Drop the fetch in flight and stop the thread (waiting up to ``timeout``)."""
        self.drop()
        self._jobs.put(None)
        _join(self._thread, timeout)

    def take_pending(self) -> list[tuple[int, dict[str, float]]]:
        """The reports the server has not had, taken (the thread delivers none of them after)."""
        with self._cv:
            taken = list(self.pending)
            self.pending.clear()
        return taken

    # -- on the thread ----------------------------------------------------------------------

    def _decide(self, step: int, now: float, cancel: threading.Event) -> Any:
        assert self._plan is not None
        return self._fetch(step, self._plan(step, now), cancel)

    def _hand_back(self, job: _Job) -> None:
        """A hand-off's answer came: take it in, unless the training thread stopped waiting."""
        with self._cv:
            if job.error is None and not job.revoked:
                assert self._accept is not None
                try:
                    job.value = self._accept(job.value)
                except BaseException as exc:  # noqa: BLE001 - raised to the training thread at take()
                    job.error = exc
            job.done = True

    def _fetch(self, start: int | None, ahead: int, cancel: threading.Event) -> Any:
        attempt = 0
        while not cancel.is_set():
            try:
                first = self._first_step(start, attempt)
                if first != start:  # moved on: stay before the next report from there
                    ahead = self._limit_ahead(first, ahead)
                started = self._clock()
                answer = self._deliver_pending(first, ahead)
                if answer is None:
                    answer = self._read_window(first, ahead)
                took = self._clock() - started
                self.seconds = took if not self.seconds else (took + self.seconds) / 2
                self.failures = 0
                return answer
            except LRServiceError as exc:
                if not is_outage(exc):
                    raise
                with self._cv:
                    self.error = exc
                    self.failures += 1
                    self._cv.notify_all()
                cancel.wait(backoff_delay(attempt, cap=DEFAULT_MAX_BACKOFF, rand=self._rand))
                attempt += 1
        raise ClientClosed("the fetch was dropped")

    def _first_step(self, start: int | None, attempt: int) -> int:
        if start is None:
            return self._current_step()
        # after a failure the job may have gone past `start`, holding its last values:
        # catch up with the step it is at rather than fetch steps it no longer needs
        return max(start, self._current_step()) if attempt else start

    def _read_window(self, first: int, ahead: int) -> Any:
        while True:
            try:
                return self._client.read_lr(
                    self._run_id(), first, ahead=ahead, max_retries=0, tail=self._tail_fields(first)
                )
            except ScheduleError:
                if ahead == 0:
                    return EndOfSchedule(first)
                ahead //= 2  # the schedule ends inside the window: ask for less

    def _deliver_pending(self, first: int, ahead: int) -> Any:
        """Post the reports the server has not had, oldest first.

        Returns the answer of the report at step ``first`` (asked with ``ahead``: it is the
        window wanted), or ``None`` when no report is at that step.
        """
        answer = None
        while self.pending:
            sending = self.pending[0]
            step, report = sending
            try:
                reply = self._client.step_run(
                    self._run_id(),
                    step,
                    metrics=report,
                    rank=self._rank,
                    ahead=ahead if step == first else 0,
                    timeout=self._report_timeout,
                    max_retries=0,
                    tail=self._tail_fields(first) if step == first else None,
                )
            except LRServiceError as exc:
                if not is_outage(exc):  # refused for good: raised to the job, not retried
                    self._sent(sending)
                raise
            self._sent(sending)
            answer = reply if step == first else None
        return answer

    def _sent(self, sending: tuple[int, dict[str, float]]) -> None:
        """The report ``sending`` is the server's now: out of ``pending``, unless
        ``take_pending()`` took it meanwhile (under the lock it takes them under)."""
        with self._cv:
            if self.pending and self.pending[0] is sending:
                self.pending.popleft()

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()


class TailFetcher:
    """One daemon thread that fetches the provisional tail (``GET .../lr?provisional=n``).

    A fetch asks for the tail after a final step in chunks of ``TAIL_CHUNK_VALUES`` values,
    each continuing the one before (``provisional_after``), and returns the answers in order.
    A failed try is not retried: the server is away (the window thread finds out and retries)
    or the run cannot go on; the answers that came are returned, and the scheduler asks for
    the rest with a later window.

    Args:
        client: The connection (shared; its senders are thread-safe).
        run_id: Returns the run's id.
    """

    def __init__(self, client: LRClient, *, run_id: Callable[[], str]) -> None:
        self._client = client
        self._run_id = run_id
        self._job: _Job | None = None
        self._tag: Any = None
        self._cancel = threading.Event()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether a fetch was submitted and its result not taken yet."""
        return self._job is not None

    def submit(self, after: int, steps: int, held: tuple[int, int] | None, groups: int, tag: Any) -> None:
        """Fetch ``steps`` steps of tail after the final step ``after`` (continuing ``held``,
        ``(id, last step)``, while the server says it is valid); ``take()`` returns ``tag``
        with the answers."""
        job = _Job(self._fetch, (after, steps, held, tail_chunk(groups), self._cancel), None)
        self._jobs.put(job)
        if self._thread is None:
            self._thread = threading.Thread(
                target=_work, args=(self._jobs,), name="lrserve-tail", daemon=True
            )
            self._thread.start()
        self._job, self._tag = job, tag

    def take(self) -> Any:
        """``(tag, answers)`` of the fetch submitted, once it is done; else ``NOT_READY``."""
        job = self._job
        if job is None or not job.done:
            return NOT_READY
        self._job = None
        return self._tag, job.result()

    def drop(self) -> None:
        """Abandon the fetch in flight (its answers would be of another run or tail)."""
        self._cancel.set()
        self._cancel = threading.Event()
        self._job = None

    def close(self, timeout: float | None = None) -> None:
        """Drop the fetch in flight and stop the thread (waiting up to ``timeout``)."""
        self.drop()
        self._jobs.put(None)
        _join(self._thread, timeout)

    def _fetch(
        self, after: int, steps: int, held: tuple[int, int] | None, chunk: int, cancel: threading.Event
    ) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        while steps > 0 and not cancel.is_set():
            n = min(steps, chunk)
            fields = {"provisional": n}
            if held is not None:
                fields.update(provisional_id=held[0], provisional_after=held[1])
            try:
                answer = self._client.read_lr(self._run_id(), after, max_retries=0, tail=fields)
            except LRServiceError:
                break  # away (the window thread retries), or the run cannot go on: asked again later
            answers.append(answer)
            tail = answer.get("provisional") or {}
            got = len(tail.get("lrs") or ())
            if got < n:
                break  # the server's cap, or the schedule's end
            steps -= got
            held = (int(tail["id"]), int(tail["start"]) + got - 1)
        return answers


def _join(thread: threading.Thread | None, timeout: float | None) -> None:
    """Wait for a worker ``thread`` to end, unless it is this one: the scheduler's finalizer
    (``_release``) runs on whichever thread drops its last reference, which may be the fetch
    thread itself (``_accept_handed`` holds the scheduler while it takes an answer in)."""
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)


def _work(jobs: queue.SimpleQueue[Any]) -> None:
    while True:
        job: _Job | None = jobs.get()
        if job is None:
            return
        try:
            job.value = job.fn(*job.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread through the job
            job.error = exc
        if job.finish is None:
            job.done = True
        else:
            job.finish(job)
        if job.notify is not None:
            job.notify()
        del job  # hold nothing of the job while waiting for the next
