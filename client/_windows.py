"""How far ahead the client asks: window sizing and the cadence of watched-metric reports.

Two things bound a window of final values that ``RemoteScheduler`` fetches:

- **Time.** One window should cover about ``time_budget_s`` of training, so an operator's
  action lands within about that long. ``WindowSizer`` measures the time per step and sizes
  the next window from it: it starts small, grows at most ``growth``-fold per window and
  never asks for more than ``MAX_AHEAD`` steps.
- **Decisions.** A plateau decision lands on the step that carries its metric, so a window
  must end before the next step at which this job will report a watched metric.
  ``Cadence`` predicts those steps: every ``steps_per_epoch`` steps when given, else
  learned from the first report. Until it is known, the client fetches no step beyond the
  one it is taking.

``PrefetchPolicy`` puts the two together with when to ask: the step at which the next
window is fetched (half a window, or two fetches' time, before the values held run out)
and how far it reaches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrserve.client._cache import WindowCache

__all__ = [
    "DEFAULT_FIRST_AHEAD",
    "DEFAULT_GROWTH",
    "DEFAULT_MONITOR",
    "DEFAULT_TIME_BUDGET_S",
    "MAX_AHEAD",
    "NEVER",
    "Cadence",
    "PrefetchPolicy",
    "WindowSizer",
    "guard_monitor",
]

#: Seconds of training one window should cover (bounds how late an operator action lands).
DEFAULT_TIME_BUDGET_S = 1.0
#: Steps beyond the first one asked for before the time per step is known.
DEFAULT_FIRST_AHEAD = 16
#: Most a window may grow from one fetch to the next.
DEFAULT_GROWTH = 4
#: Most steps asked beyond the first one (the server's default cap).
MAX_AHEAD = 10_000
#: The name a bare number passed to ``step()`` is logged under when the run watches no metric.
DEFAULT_MONITOR = "val_loss"
_SMOOTHING = 0.5  # weight of the newest measurement of the time per step
#: A step no job reaches: no fetch due.
NEVER = float("inf")


def guard_monitor(spec: Mapping[str, Any]) -> str | None:
    """The metric a ``SpikeGuard`` (the whole schedule, or a range test's ``then``) judges.

    Example:
        >>> guard_monitor({"type": "SpikeGuard", "schedule": {"type": "StepLR", "step_size": 9}})
        'loss'
    """
    for node in (spec, spec.get("then")):
        if isinstance(node, Mapping) and node.get("type") == "SpikeGuard":
            return str(node.get("monitor") or "loss")
    return None


class Cadence:
    """Predicts the steps at which this job reports a watched metric.

    With ``steps_per_epoch`` (scheduler steps per epoch, the reporting one included) the
    reports are predicted at its multiples. Without it, the period is learned from the first
    report: the steps from ``start`` to it. A report off the predicted grid re-anchors the
    grid there (and, when learned, re-learns the period from the two last reports).

    Args:
        steps_per_epoch: The fixed period, or ``None`` to learn it.
        start: The step the job started (or resumed) at.
    """

    def __init__(self, steps_per_epoch: int | None = None, start: int = 0) -> None:
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        self.fixed = steps_per_epoch is not None
        self.period: int | None = steps_per_epoch
        self.anchor = 0 if self.fixed else start

    @property
    def known(self) -> bool:
        """Whether the next report step can be predicted."""
        return self.period is not None

    def may_report_at(self, step: int) -> bool:
        """Whether the job may report a watched metric with ``step`` (always, while unknown)."""
        if self.period is None:
            return True
        return (step - self.anchor) % self.period == 0

    def next_report_after(self, step: int) -> int:
        """The first step above ``step`` that may carry a report (``step + 1`` while unknown)."""
        if self.period is None:
            return step + 1
        passed = (step - self.anchor) // self.period
        return self.anchor + (passed + 1) * self.period

    def observe_report(self, step: int) -> None:
        """Learn from a report of a watched metric with ``step``."""
        if self.fixed:
            return  # the job said its period; the grid stays on its multiples
        if step > self.anchor and (self.period is None or (step - self.anchor) % self.period):
            self.period = step - self.anchor
        self.anchor = step

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps."""
        return {"fixed": self.fixed, "period": self.period, "anchor": self.anchor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.fixed = bool(state.get("fixed", False))
        period = state.get("period")
        self.period = None if period is None else int(period)
        self.anchor = int(state.get("anchor", 0))


class WindowSizer:
    """Sizes windows to a time budget from the measured time per step.

    Args:
        time_budget_s: Seconds of training one window should cover.
        first: ``ahead`` asked before any measurement.
        growth: Most a window grows from one fetch to the next.
        cap: Most ``ahead`` ever asked.
    """

    def __init__(
        self,
        time_budget_s: float = DEFAULT_TIME_BUDGET_S,
        *,
        first: int = DEFAULT_FIRST_AHEAD,
        growth: int = DEFAULT_GROWTH,
        cap: int = MAX_AHEAD,
    ) -> None:
        if not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive, got {time_budget_s!r}")
        self.time_budget_s = float(time_budget_s)
        self.growth = max(1, int(growth))
        self.cap = int(cap)
        self.seconds_per_step: float | None = None
        self._last_ahead = max(0, min(int(first), self.cap))
        self._mark: tuple[int, float] | None = None

    def observe(self, step: int, now: float) -> None:
        """Note that the job was at ``step`` at time ``now``; measures since the last note."""
        if self._mark is not None:
            steps, seconds = step - self._mark[0], now - self._mark[1]
            if steps > 0 and seconds >= 0:
                rate = seconds / steps
                old = self.seconds_per_step
                self.seconds_per_step = rate if old is None else _SMOOTHING * rate + (1 - _SMOOTHING) * old
        self._mark = (step, now)

    def next_ahead(self) -> int:
        """The ``ahead`` to ask for next: the budget's worth of steps, grown gradually, capped."""
        if self.seconds_per_step is None:
            return self._last_ahead
        if self.seconds_per_step <= 0:
            target = self.cap
        else:
            target = round(self.time_budget_s / self.seconds_per_step) - 1  # the window's steps
        grown = max(1, self._last_ahead) * self.growth
        self._last_ahead = max(0, min(target, grown, self.cap))
        return self._last_ahead


class PrefetchPolicy:
    """When the next window is fetched and how far it reaches: the time budget, the metrics
    the run decides on, and the cadence of the steps that report them.

    Read by the training thread and the fetch thread (``limit_ahead``); it holds no values.

    Args:
        time_budget_s: Seconds of training one window should cover.
        steps_per_epoch: Scheduler steps per epoch (``Cadence``), or ``None`` to learn it.

    Attributes:
        sizer: Measures the time per step, sizes windows.
        cadence: Predicts the steps that report a watched metric.
        watched: The metrics the run decides on, as the server last said.
    """

    def __init__(
        self, time_budget_s: float = DEFAULT_TIME_BUDGET_S, steps_per_epoch: int | None = None
    ) -> None:
        self.sizer = WindowSizer(time_budget_s)
        self.cadence = Cadence(steps_per_epoch)
        self.watched: frozenset[str] = frozenset()

    def fetch_at(self, cache: WindowCache, fetch_seconds: float) -> float:
        """The step at which to fetch the window after the values held (``NEVER``: none due:
        the schedule ends there, or the next step may report, and its report fetches)."""
        nxt = cache.next_step
        if nxt >= cache.end_at or (self.watched and self.cadence.may_report_at(nxt)):
            return NEVER
        return nxt - 1 - self.margin(cache.last_window, fetch_seconds)

    def margin(self, last_window: int, fetch_seconds: float) -> int:
        """Steps before the end of the values held at which to ask for more.

        Half a window, or twice the steps a fetch takes if that is more (a fast loop, a
        slow answer), so the next window arrives before this one runs out.
        """
        margin = max(1, last_window // 2)
        per_step = self.sizer.seconds_per_step
        if per_step and fetch_seconds:
            margin = max(margin, math.ceil(2 * fetch_seconds / per_step))
        return margin

    def ahead_from(self, start: int, end_at: float) -> int:
        """The ``ahead`` of a window from ``start``: the budget's, before the next report and
        the schedule's end."""
        ahead = self.limit_ahead(start, self.sizer.next_ahead())
        if end_at != NEVER:
            ahead = min(ahead, int(end_at) - 1 - start)
        return max(0, ahead)

    def limit_ahead(self, first: int, ahead: int) -> int:
        """``ahead`` from ``first``, ending before the next report (read by the fetch thread)."""
        if self.watched:
            ahead = min(ahead, self.cadence.next_report_after(first) - 1 - first)
        return max(0, ahead)
