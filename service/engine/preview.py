"""Previews: a schedule's values over ``steps`` steps, with no run and no storage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lrserve.service.engine.engine import Engine
from lrserve.service.engine.spec import ScheduleSpec, guard_of
from lrserve.service.engine.spike_guard import Spike


@dataclass(frozen=True)
class Simulation:
    """A preview's values, and the spikes a spike guard found in the metric stream."""

    lrs: list[list[float]]
    momentums: list[list[float]] | None
    spikes: list[Spike]


def preview(
    schedule: ScheduleSpec,
    base_lrs: Sequence[float],
    base_momentums: Sequence[float] | None,
    steps: int,
    metrics: Mapping[str, Sequence[float | None]] | None = None,
) -> tuple[list[list[float]], list[list[float]] | None]:
    """Values at steps ``0 .. steps-1``, as a job reporting ``metrics`` would see them.

    Args:
        metrics: ``metrics[name][j-1]`` is passed with the *j*-th ``step()`` call;
            ``None`` (or a list too short) means no report with that call.

    Returns:
        One row of LRs per step, and one row of momentums per step (or None).
    """
    result = simulate(schedule, base_lrs, base_momentums, steps, metrics)
    return result.lrs, result.momentums


def simulate(
    schedule: ScheduleSpec,
    base_lrs: Sequence[float],
    base_momentums: Sequence[float] | None,
    steps: int,
    metrics: Mapping[str, Sequence[float | None]] | None = None,
) -> Simulation:
    """``preview``, and the spikes: a spike guard's monitor in ``metrics`` is judged as
    rank 0's report with each ``step()`` call, exactly as a run given those reports would."""
    engine = Engine(schedule, base_lrs, base_momentums)
    guard = guard_of(schedule, len(base_lrs))
    monitor = guard.monitor if guard is not None else None
    lrs: list[list[float]] = []
    moms: list[list[float]] | None = [] if engine.reports_momentum else None
    for j in range(steps):
        if j > 0:
            reported = _reports_at(metrics or {}, j - 1)
            reports = []
            if monitor in reported:
                reports.append({"step": j, "rank": 0, "name": monitor, "value": reported[monitor]})
            engine.advance(reported, reports)
        step_lrs, step_moms = engine.values()
        lrs.append(list(step_lrs))
        if moms is not None and step_moms is not None:
            moms.append(list(step_moms))
    return Simulation(lrs, moms, list(engine.spikes))


def _reports_at(metrics: Mapping[str, Sequence[float | None]], index: int) -> dict[str, float]:
    return {
        name: value
        for name, values in metrics.items()
        if index < len(values) and (value := values[index]) is not None
    }
