"""``MetricLog``: a scheduler's logged metrics, filed under (name, step, rank) and sent in the
background by a ``MetricBuffer`` made on first use; its problems come out as warnings."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from lrserve.client._buffer import DEFAULT_FLUSH_INTERVAL_S, DEFAULT_MAX_BUFFERED, MetricBuffer, Send
from lrserve.client._exceptions import MetricsDroppedWarning, warn

__all__ = ["MetricLog", "to_float"]


class MetricLog:
    """Files metrics for history; holds no reference to the scheduler (its finalizer closes it).

    Args:
        send: Sends one batch of records (``LRClient.send_metrics`` for the run).
        rank: Filed with every record.
        urgent: The metric sent as soon as possible (a spike guard's monitor), if any.
        max_records: Most records held unsent (oldest dropped beyond).
        flush_interval_s: Longest a record waits before it is sent.
        rand: Random numbers for the backoff jitter.
    """

    def __init__(
        self,
        send: Send,
        *,
        rank: int,
        urgent: str | None = None,
        max_records: int = DEFAULT_MAX_BUFFERED,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.buffer: MetricBuffer | None = None
        self._send = send
        self._rank = rank
        self._urgent = urgent
        self._max_records = max_records
        self._flush_interval_s = flush_interval_s
        self._rand = rand
        self._full = False  # warned that the buffer is full (again once it drained)

    def add(self, step: int, items: Mapping[str, Any]) -> None:
        """File ``{name: value}`` under ``step``; warn (once while full) when records drop."""
        buffer = self._ensure_buffer()
        for name, value in items.items():
            number = to_float(value)  # NaN and inf travel too: a diverged loss is history
            urgent = name == self._urgent  # the spike guard decides from it: send it now
            if not buffer.add(str(name), step, self._rank, number, urgent=urgent) and not self._full:
                self._full = True
                warn(
                    f"lrserve: the metric buffer is full ({buffer.max_records} records, the "
                    f"server is away or slow); the oldest records are dropped "
                    f"(last error: {buffer.last_error})",
                    MetricsDroppedWarning,
                )
        if self._full and len(buffer) < buffer.max_records // 2:
            self._full = False
        self.warn_problems()

    def flush(self, timeout: float | None) -> bool:
        """Send what is held now; whether all of it went within ``timeout``."""
        if self.buffer is None:
            return True
        done = self.buffer.flush(timeout)
        self.warn_problems()
        return done

    def close(self, timeout: float | None) -> int:
        """Send what is held (for up to ``timeout`` s), stop the sender; the records lost."""
        lost = self.buffer.close(timeout) if self.buffer is not None else 0
        self.warn_problems()
        return lost

    @property
    def last_error(self) -> BaseException | None:
        return self.buffer.last_error if self.buffer is not None else None

    def warn_problems(self) -> None:
        if self.buffer is not None:
            for problem in self.buffer.take_problems():
                warn(f"lrserve: {problem}", MetricsDroppedWarning)

    def _ensure_buffer(self) -> MetricBuffer:
        if self.buffer is None:
            self.buffer = MetricBuffer(
                self._send,
                max_records=self._max_records,
                flush_interval_s=self._flush_interval_s,
                rand=self._rand,
            )
        return self.buffer


def to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a metric must be a number, got {type(value).__name__}: {value!r}") from exc
