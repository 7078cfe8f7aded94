"""``MetricBuffer``: batches logged metrics and sends them from one background thread.

Policy (documented in the README):

- Records are keyed ``(name, step, rank)``. Logging the same key again before it is sent
  replaces its value; the server stores each key once, so re-sending a batch after a
  timeout or an outage never doubles a record.
- A record leaves the buffer only once the server acknowledged it. Transport errors and
  retryable answers (5xx, 408, 429) keep the batch and retry with backoff, for as long as
  the buffer lives; a 413 halves the batch size.
- The buffer is bounded (``max_records``). When it is full the **oldest** record is dropped
  to make room, so the training loop never blocks on a server that is away; every drop is
  counted and reported (``MetricsDroppedWarning``), never silent. A batch the server
  refuses for good (a 4xx other than 408/413/429) is dropped and reported the same way.
- An **urgent** record (a spike guard's monitored loss: ``add(..., urgent=True)``) is sent
  as soon as the sender is free, with whatever else waits, instead of after
  ``flush_interval_s``: the guard decides from it, and its backoff lands at the first step
  not yet handed out when it arrives. Records logged while a send is in flight go together
  in the next one, so a fast loop still sends few requests.
- ``flush()`` waits until everything is sent (or a timeout passes); ``close()`` flushes,
  then stops the thread. Buffers still open at interpreter exit are flushed for a few
  seconds, and what could not be sent is reported on stderr.
"""

from __future__ import annotations

import atexit
import math
import random
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from lrserve.client._client import DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF, backoff_delay
from lrserve.client._exceptions import ClientClosed, LimitExceeded, ServerError, TransportError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EXIT_FLUSH_S",
    "DEFAULT_FLUSH_INTERVAL_S",
    "DEFAULT_MAX_BUFFERED",
    "MetricBuffer",
]

#: Most records held while they wait to be sent (oldest dropped beyond, with a warning).
DEFAULT_MAX_BUFFERED = 100_000
#: Most records per ``POST .../metrics``.
DEFAULT_BATCH_SIZE = 1_000
#: Longest a record waits before it is sent, when fewer than a batch are waiting.
DEFAULT_FLUSH_INTERVAL_S = 1.0
#: How long open buffers may keep sending at interpreter exit.
DEFAULT_EXIT_FLUSH_S = 5.0

Key = tuple[str, int, int]
Send = Callable[[list[dict[str, Any]]], Any]

_open_buffers: weakref.WeakSet[MetricBuffer] = weakref.WeakSet()


class MetricBuffer:
    """A bounded, keyed buffer of metric records with one sender thread.

    Args:
        send: Sends one batch (``[{"step", "name", "value", "rank"}]``); raises the client's
            errors on failure.
        max_records: Most records held; the oldest is dropped beyond.
        batch_size: Most records per ``send``.
        flush_interval_s: Longest a record waits while fewer than ``batch_size`` wait.
        backoff: First retry delay after a failed send; doubles up to ``max_backoff``.
        max_backoff: Longest retry delay.
        rand: Random numbers in ``[0, 1)`` for the jitter.
    """

    def __init__(
        self,
        send: Send,
        *,
        max_records: int = DEFAULT_MAX_BUFFERED,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if max_records < 1 or batch_size < 1:
            raise ValueError("max_records and batch_size must be positive")
        self._send = send
        self.max_records = max_records
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._rand = rand
        self._records: OrderedDict[Key, float] = OrderedDict()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._flushing = 0
        self._urgent = False
        self._failures = 0
        self._problems: list[str] = []
        self.sent = 0
        self.dropped = 0
        self.last_error: BaseException | None = None

    # -- the caller's side (the training thread) -----------------------------------------

    def add(self, name: str, step: int, rank: int, value: float, *, urgent: bool = False) -> bool:
        """Buffer one record. Returns ``False`` when an older record was dropped for room.

        ``urgent``: send it as soon as the sender is free (see the module docstring).
        """
        key = (name, step, rank)
        with self._cv:
            if self._closing:
                raise ClientClosed("the metric buffer is closed")
            room = True
            if key not in self._records and len(self._records) >= self.max_records:
                self._records.popitem(last=False)
                self.dropped += 1
                room = False
            self._records[key] = value
            # wake the sender: a full batch goes now; the first record after the buffer was
            # empty starts its flush_interval_s clock (the sender sleeps while nothing waits)
            if urgent:
                self._urgent = True
            if urgent or len(self._records) >= self.batch_size or len(self._records) == 1:
                self._cv.notify_all()
        if self._thread is None:
            self._start()
        return room

    def __len__(self) -> int:
        with self._cv:
            return len(self._records)

    def take_problems(self) -> list[str]:
        """What went wrong in the background since the last call (for the caller to warn)."""
        with self._cv:
            problems, self._problems = self._problems, []
        return problems

    def flush(self, timeout: float | None = None) -> bool:
        """Ask for everything to be sent now; wait until it is, or ``timeout`` passes.

        Returns:
            Whether the buffer is empty.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            if not self._records:
                return True
            self._flushing += 1
            self._cv.notify_all()
            try:
                while self._records and (self._thread is not None and self._thread.is_alive()):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cv.wait(left)
                return not self._records
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = None) -> int:
        """Flush for up to ``timeout`` seconds, then stop the thread.

        Returns:
            How many records could not be sent (they are dropped and counted).
        """
        self.flush(timeout)
        with self._cv:
            self._closing = True
            left = len(self._records)
            self.dropped += left
            self._records.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        _open_buffers.discard(self)
        return left

    # -- the sender thread ----------------------------------------------------------------

    def _start(self) -> None:
        with self._cv:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="lrserve-metrics", daemon=True)
            self._thread.start()
        _open_buffers.add(self)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._deliver(batch)

    def _next_batch(self) -> list[tuple[Key, float]] | None:
        with self._cv:
            while not self._closing:
                urgent = self._flushing or self._urgent or len(self._records) >= self.batch_size
                if self._records and urgent:
                    break
                if self._records:
                    self._cv.wait(self.flush_interval_s)
                    if self._records:
                        break
                else:
                    self._cv.wait()
            if self._closing:
                return None
            self._urgent = False
            return [item for _, item in zip(range(self.batch_size), self._records.items(), strict=False)]

    def _deliver(self, batch: list[tuple[Key, float]]) -> None:
        records = [{"step": k[1], "name": k[0], "value": v, "rank": k[2]} for k, v in batch]
        try:
            self._send(records)
        except LimitExceeded as exc:
            self._on_too_large(batch, exc)
        except (TransportError, ServerError) as exc:
            if isinstance(exc, ServerError) and not exc.retryable:
                self._drop(batch, f"the server refused {len(batch)} metric records: {exc}", exc)
            else:
                self._retry_later(exc)
        except Exception as exc:  # noqa: BLE001 - never let the sender die silently
            self._drop(batch, f"{len(batch)} metric records could not be sent: {exc!r}", exc)
        else:
            self._remove(batch)
        finally:
            with self._cv:
                self._cv.notify_all()  # wake flush() waiters

    def _remove(self, batch: Sequence[tuple[Key, float]]) -> None:
        with self._cv:
            for key, value in batch:
                held = self._records.get(key)
                # re-logged meanwhile: keep the new value (NaN != NaN, so compare bit patterns)
                if held is not None and _same(held, value):
                    del self._records[key]
            self.sent += len(batch)
            self._failures = 0
            self.last_error = None

    def _drop(self, batch: Sequence[tuple[Key, float]], problem: str, exc: BaseException) -> None:
        with self._cv:
            for key, _ in batch:
                if self._records.pop(key, None) is not None:
                    self.dropped += 1
            self._problems.append(problem)
            self.last_error = exc

    def _on_too_large(self, batch: Sequence[tuple[Key, float]], exc: LimitExceeded) -> None:
        if len(batch) == 1:
            self._drop(batch, f"the server refused a metric record as too large: {exc}", exc)
            return
        with self._cv:
            self.batch_size = max(1, len(batch) // 2)

    def _retry_later(self, exc: BaseException) -> None:
        with self._cv:
            self.last_error = exc
            delay = backoff_delay(self._failures, base=self._backoff, cap=self._max_backoff, rand=self._rand)
            self._failures += 1
            deadline = time.monotonic() + delay
            while not self._closing:  # only close() cuts the wait short
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)


@atexit.register
def _flush_open_buffers() -> None:
    for buffer in list(_open_buffers):
        left = buffer.close(DEFAULT_EXIT_FLUSH_S)
        if left:
            print(
                f"lrserve: {left} logged metric records could not be sent before exit "
                f"(last error: {buffer.last_error})",
                file=sys.stderr,
            )


def _same(a: float, b: float) -> bool:
    """Equal as floats, or both NaN (a diverged loss is sent once, like any value)."""
    return a == b or (math.isnan(a) and math.isnan(b))
