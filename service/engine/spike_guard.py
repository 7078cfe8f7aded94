"""The spike guard (``SpikeGuard``): a loss spike on any rank backs the LR off on every rank.

**Detector** (deterministic: a pure function of the reports in the order they are applied,
so replay, every replica and a preview decide alike). Each rank has its own baseline: the
last ``window`` values of the monitored metric it reported that were not spikes. A report
is a spike when its value

- is not finite (NaN, +/-inf), at any time, or
- once the rank has ``warmup_reports`` values in its baseline, exceeds
  ``median + threshold * scale``, where ``scale = max(1.4826 * MAD, rel_scale_floor *
  |median|, min_delta)`` over the baseline (MAD: median absolute deviation; 1.4826 makes
  it the standard deviation for Gaussian noise).

Median and MAD ignore the outliers they are meant to catch (an EMA and standard deviation
are dragged up by the very spike that should be flagged, and by the last one); the
relative floor keeps a very smooth loss (MAD near 0) from turning ordinary wiggles into
spikes. Only values *above* the band count: a falling loss is what training is for.

**Incidents.** A report measured before the last backoff took effect (its ``step`` at or
below that backoff's ``applied_at``) belongs to the incident that backoff answers: a spike
there is not counted again (no event, no new backoff) and never enters the baseline. So a
spike that corrupts every rank's weights until the job rolls back is one spike, not N.

**Last good step.** The highest step every rank heard from so far reported without a
spike, and below the spike's own step: a checkpoint taken at or before it holds weights
no spoiled batch of any rank went into (data parallelism averages every rank's gradient).

**Backoff.** A spike found while taking step *a* multiplies the inner schedule's LRs by
``factor`` at steps ``a .. a+hold-1``, then by ``factor + (1 - factor) * min(1, (t+1) /
ramp)`` at step ``a+hold+t``: back to the inner schedule after ``ramp`` steps. The inner
schedule's clock keeps running underneath (its own values never see the factor). A new
spike restarts the backoff. The spike after ``max_spikes`` spikes stops the run.

Example (factor 0.5, hold 2, ramp 2; a spike found at step 10)::

    steps:       10    11    12     13    14
    multiplier:  0.5   0.5   0.75   1.0   1.0
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

MAD_TO_SIGMA = 1.4826
"""Scales a MAD to the standard deviation of Gaussian noise."""


@dataclass(frozen=True)
class GuardSettings:
    """A ``SpikeGuard`` spec's numbers (see the module docstring for what each does)."""

    monitor: str = "loss"
    threshold: float = 3.0
    warmup_reports: int = 20
    factor: float = 0.5
    hold: int = 100
    ramp: int = 200
    max_spikes: int = 5
    window: int = 50
    rel_scale_floor: float = 0.25
    min_delta: float = 0.0

    @classmethod
    def from_spec(cls, spec: Any) -> GuardSettings:
        return cls(**{name: getattr(spec, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Report:
    """One rank's value of the monitored metric, sent with its ``step``-th ``step()`` call."""

    step: int
    rank: int
    value: float

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Report:
        """From a stored METRIC event's ``reports`` item (values may be spelled "NaN")."""
        return cls(int(payload["step"]), int(payload["rank"]), float(payload["value"]))

    def payload(self, monitor: str) -> dict[str, Any]:
        return {"step": self.step, "rank": self.rank, "name": monitor, "value": self.value}


@dataclass(frozen=True)
class Verdict:
    """What the detector made of one report: its band, and whether it is a (new) spike."""

    report: Report
    baseline: float | None
    upper: float | None
    spike: bool
    absorbed: bool = False


@dataclass(frozen=True)
class Spike:
    """A spike that took effect: the ``loss_spike`` event's fields."""

    step: int
    rank: int
    value: float
    baseline: float | None
    applied_at: int
    last_good_step: int
    count: int
    stop: bool

    def payload(self) -> dict[str, Any]:
        """The event's payload (``kind`` and ``at`` come from the log)."""
        return {
            "step": self.step,
            "rank": self.rank,
            "value": self.value,
            "baseline": self.baseline,
            "applied_at": self.applied_at,
            "last_good_step": self.last_good_step,
            "count": self.count,
        }


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    if n % 2:
        return sorted_values[mid]
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2


def _deviations_median(ordered: list[float], median: float) -> float:
    """``_median(sorted(abs(v - median) for v in ordered))``, the same float, without sorting:
    the deviations of the values below ``median`` and of the rest are each sorted already (read
    outwards from it), so their middle one is found by a binary search of the two (O(log n)
    comparisons, where sorting them was O(n log n): a guard's ``window`` may be 10,000 values,
    judged at every report; keeping the baseline in order costs an insertion and a removal in
    a list, each a memory move)."""
    n, split = len(ordered), bisect_left(ordered, median)

    def below(i: int) -> float:  # the i-th smallest deviation of the values below the median
        return abs(ordered[split - 1 - i] - median)

    def above(j: int) -> float:
        return abs(ordered[split + j] - median)

    def kth(k: int) -> float:  # the k-th smallest (from 0) of both: i taken from below, k + 1 - i above
        lo, hi = max(0, k + 1 - (n - split)), min(k + 1, split)
        while lo < hi:
            i = (lo + hi) // 2
            if above(k - i) > below(i):  # the last taken above is past the next below: take more below
                lo = i + 1
            else:
                hi = i
        i = lo
        last_below = below(i - 1) if i else -math.inf
        last_above = above(k - i) if k + 1 - i else -math.inf
        return max(last_below, last_above)

    mid = n // 2
    if n % 2:
        return kth(mid)
    return (kth(mid - 1) + kth(mid)) / 2


@dataclass
class Detector:
    """Per-rank baselines and the incident rule; plain data, so it snapshots as JSON."""

    settings: GuardSettings
    baselines: dict[int, list[float]] = field(default_factory=dict)
    last_good: dict[int, int] = field(default_factory=dict)
    last_step: dict[int, int] = field(default_factory=dict)  # per rank: the last step judged
    count: int = 0
    incident_until: int = -1  # reports with step <= this belong to the last backoff
    # each rank's baseline in order, kept beside it (not a snapshot's: made again from it)
    _ordered: dict[int, list[float]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _in_order(self, rank: int) -> list[float]:
        ordered = self._ordered.get(rank)
        if ordered is None:
            ordered = self._ordered[rank] = sorted(self.baselines.get(rank, []))
        return ordered

    def band(self, rank: int) -> tuple[float | None, float | None]:
        """The rank's baseline (median) and the value above which a report is a spike."""
        ordered = self._in_order(rank)
        if not ordered:
            return None, None
        median = _median(ordered)
        if len(ordered) < self.settings.warmup_reports:
            return median, None
        mad = _deviations_median(ordered, median)
        s = self.settings
        scale = max(MAD_TO_SIGMA * mad, s.rel_scale_floor * abs(median), s.min_delta)
        return median, median + s.threshold * scale

    def judge(self, report: Report) -> Verdict | None:
        """Classify ``report`` and learn from it (a good value joins its rank's baseline).

        Returns ``None`` for a report of a step at or below the last one judged for its
        rank: a resend (the client retries batches) or a job replaying steps after a
        restore is judged once.
        """
        if report.step <= self.last_step.get(report.rank, -1):
            return None
        self.last_step[report.rank] = report.step
        baseline, upper = self.band(report.rank)
        value = report.value
        spike = not math.isfinite(value) or (upper is not None and value > upper)
        if spike:
            absorbed = report.step <= self.incident_until
            return Verdict(report, baseline, upper, spike=not absorbed, absorbed=absorbed)
        if report.step > self.incident_until:  # measured after the last backoff: trust it
            values, ordered = self.baselines.setdefault(report.rank, []), self._in_order(report.rank)
            values.append(value)
            insort(ordered, value)
            if len(values) > self.settings.window:
                del ordered[bisect_left(ordered, values[0])]
                del values[0]
            self.last_good[report.rank] = max(report.step, self.last_good.get(report.rank, 0))
        return Verdict(report, baseline, upper, spike=False)

    def spike_at(self, verdict: Verdict, applied_at: int) -> Spike:
        """Count a spike that takes effect at step ``applied_at``."""
        report = verdict.report
        self.count += 1
        self.incident_until = applied_at
        # In data-parallel training every rank's batch goes into every update: the weights
        # after step s are good only if every rank's report of s was. Ranks not heard from
        # yet at all do not count; a rank that lags makes the rollback go further back.
        good = min([report.step - 1, *self.last_good.values()])
        return Spike(
            report.step, report.rank, report.value, verdict.baseline, applied_at,
            max(good, 0), self.count, stop=self.count > self.settings.max_spikes,
        )


@dataclass
class SpikeGuard:
    """The detector plus the backoff it drives.

    Args:
        settings: The spec's numbers.
    """

    settings: GuardSettings
    detector: Detector = field(init=False)
    since: int | None = None  # steps since the last backoff took effect (None: no backoff)

    def __post_init__(self) -> None:
        self.detector = Detector(self.settings)

    @property
    def multiplier(self) -> float:
        """What the inner schedule's LRs are multiplied by at the current step."""
        if self.since is None:
            return 1.0
        s = self.settings
        if self.since < s.hold:
            return s.factor
        ramped = self.since - s.hold + 1
        if s.ramp == 0 or ramped >= s.ramp:
            return 1.0
        return s.factor + (1.0 - s.factor) * ramped / s.ramp

    def tick(self) -> None:
        """The clock moved one step on."""
        if self.since is not None:
            self.since += 1
            if self.multiplier == 1.0:
                self.since = None

    def observe(self, reports: Iterable[Report], step: int) -> list[Spike]:
        """Judge the reports applied at ``step``; a spike backs off from ``step`` on."""
        spikes = []
        for report in reports:
            verdict = self.detector.judge(report)
            if verdict is not None and verdict.spike:
                spikes.append(self.detector.spike_at(verdict, step))
                self.since = 0
        return spikes

    def snapshot(self) -> dict[str, Any]:
        d = self.detector
        return {
            "settings": asdict(self.settings),
            "since": self.since,
            "baselines": [[rank, list(values)] for rank, values in d.baselines.items()],
            "last_good": [[rank, step] for rank, step in d.last_good.items()],
            "last_step": [[rank, step] for rank, step in d.last_step.items()],
            "count": d.count,
            "incident_until": d.incident_until,
        }

    @classmethod
    def restore(cls, saved: Mapping[str, Any]) -> SpikeGuard:
        guard = cls(GuardSettings(**saved["settings"]))
        guard.since = saved["since"]
        d = guard.detector
        d.baselines = {int(rank): list(values) for rank, values in saved["baselines"]}
        d._ordered.clear()  # made again from the baselines
        d.last_good = {int(rank): int(step) for rank, step in saved["last_good"]}
        d.last_step = {int(rank): int(step) for rank, step in saved["last_step"]}
        d.count = saved["count"]
        d.incident_until = saved["incident_until"]
        return guard


@dataclass(frozen=True)
class Band:
    """One rank's reports as the detector met them: each value with the baseline (median)
    and the spike line it was judged against (None during warm-up)."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    baseline: list[float | None] = field(default_factory=list)
    upper: list[float | None] = field(default_factory=list)

    def picked(self, indices: Iterable[int]) -> Band:
        """The band at these positions only (downsampling)."""
        keep = list(indices)

        def pick(series: list[T]) -> list[T]:
            return [series[i] for i in keep]

        return Band(pick(self.steps), pick(self.values), pick(self.baseline), pick(self.upper))

    def drop_last(self) -> None:
        """The last point goes."""
        for series in (self.steps, self.values, self.baseline, self.upper):
            del series[-1]


class BandReplay:
    """A detector run over a run's reports in the engine's order (by the step each applies
    at, then as placed), with the guard's settings now, and each rank's band as it met them;
    fed a report at a time, so a view of the bands goes on from where it stopped
    (``read_models.RunBands``). The view's replay, not the engine's own: that one also skips
    the reports of held steps and starts a new detector with a new schedule.

    **Thinned, bounded.** Each rank's band keeps the points of its ``stride``-th reports (its
    first, ``stride``-th, 2 x ``stride``-th, ...) and its latest; past ``most`` points in all,
    the stride doubles and every other one goes. So a run's bands take at most about ``most``
    points however long it is, still spread evenly over each rank's reports (a view downsamples
    them further), and the same whichever pieces the reports came in: thinning follows the
    reports, one at a time."""

    def __init__(self, settings: GuardSettings, most: int = 100_000) -> None:
        self.settings = settings
        self.detector = Detector(settings)
        self.bands: dict[int, Band] = {}
        self.most = most
        self.stride = 1
        self.points = 0  # points in the bands
        self._judged: dict[int, int] = {}  # per rank: its reports in the bands so far (points or not)

    def judge(self, at: int, report: Report) -> None:
        """Judge ``report``, applied at step ``at``."""
        verdict = self.detector.judge(report)
        if verdict is None:
            return
        rank = report.rank
        index = self._judged.get(rank, 0)
        self._judged[rank] = index + 1
        band = self.bands.setdefault(rank, Band())
        if band.steps and (index - 1) % self.stride:  # the last point was kept as the latest only
            band.drop_last()
            self.points -= 1
        band.steps.append(report.step)
        band.values.append(report.value)
        band.baseline.append(verdict.baseline)
        band.upper.append(verdict.upper)
        self.points += 1
        if self.points > self.most and self.points > 3 * len(self.bands):  # a thinning halves them
            self._thin()
        if verdict.spike:
            self.detector.spike_at(verdict, at)

    def _thin(self) -> None:
        """Double the stride: each rank keeps the points of its reports at multiples of it, and
        its latest."""
        old, self.stride = self.stride, 2 * self.stride
        self.points = 0
        for rank, band in self.bands.items():
            on_stride = (self._judged[rank] - 1) // old + 1  # points at reports 0, old, 2 x old, ...
            keep = list(range(0, on_stride, 2))
            if keep[-1] != len(band.steps) - 1:
                keep.append(len(band.steps) - 1)  # the latest
            self.bands[rank] = band = band.picked(keep)
            self.points += len(band.steps)
