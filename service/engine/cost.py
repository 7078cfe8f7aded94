"""The work a request causes, in budget units, known before any of it is done.

One unit is about one torch scheduler step of one param group (0.5-1 µs on a small
machine). A request that computes or serialises values costs::

    steps × (param groups + 6) × per-step cost of the spec

``+ 6`` is the per-step overhead paid whatever the group count (the scheduler call, the
step's bookkeeping, its JSON framing). The per-step cost of a spec is ``PER_STEP[type]``;
a ``LambdaLR`` / ``MultiplicativeLR`` adds its expressions' size (``1 + nodes / 20`` for
its largest expression: evaluating a 200-term expression costs about ten scheduler
steps); a ``ChainedScheduler`` steps all its children (their sum), a ``SequentialLR``
one at a time (the dearest), a range test its ``then`` schedule once it switches, a
``SpikeGuard`` its inner schedule.

Requests whose cost is over ``Settings.work_budget`` are refused with
``WorkBudgetExceeded`` (422, naming the budget and the cost), or, for windows of values
asked ahead, cut to fit (``steps_within``).

Example:
    >>> spec = parse_schedule({"type": "StepLR", "step_size": 10}, n_groups=2)
    >>> cost(spec, n_groups=2, steps=1000)
    8000
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

from lrserve.service.engine.expr import CHECKED_STEPS
from lrserve.service.engine.spec import (
    ChainedSchedulerSpec,
    LambdaLRSpec,
    LRRangeTestSpec,
    MultiplicativeLRSpec,
    ScheduleSpec,
    SequentialLRSpec,
    SpikeGuardSpec,
)
from lrserve.service.errors import InvalidInput

GROUP_OVERHEAD = 6
"""Per-step units paid whatever the number of param groups."""

PER_STEP: dict[str, float] = {
    "LambdaLR": 1.0,
    "MultiplicativeLR": 1.0,
    "StepLR": 1.0,
    "MultiStepLR": 1.0,
    "ConstantLR": 1.0,
    "LinearLR": 1.0,
    "ExponentialLR": 1.0,
    "CosineAnnealingLR": 1.0,
    "CosineAnnealingWarmRestarts": 1.0,
    "PolynomialLR": 1.0,
    "CyclicLR": 1.0,
    "OneCycleLR": 1.0,
    "ReduceLROnPlateau": 1.0,
    "LRRangeTest": 1.0,
    "SequentialLR": 1.0,
    "ChainedScheduler": 1.0,
    "SpikeGuard": 1.0,
}
"""Units per step and param group of each schedule type, before its children/expressions."""

NODES_PER_UNIT = 20
"""Expression terms evaluated in the time of one scheduler step."""

CREATE_STEPS = 2 * (CHECKED_STEPS + 2)
"""Steps a create (or a new schedule) costs: each expression is checked at steps 0..100 and
the engine takes steps 1 and 2 to see that the schedule can start; then the run is built
again to serve it (expressions compiled, the engine loaded): measured, about as much again."""


class WorkBudgetExceeded(InvalidInput):
    """A request would cost more work than ``Settings.work_budget`` allows."""

    code = "work_budget_exceeded"


def per_step(spec: ScheduleSpec, n_groups: int) -> float:
    """Units one step of ``spec`` costs per param group (see the module docstring)."""
    own = PER_STEP.get(spec.type, 1.0)
    if isinstance(spec, (LambdaLRSpec, MultiplicativeLRSpec)):
        return own + spec.max_nodes() / NODES_PER_UNIT
    if isinstance(spec, ChainedSchedulerSpec):
        return own + sum(per_step(child, n_groups) for child in spec.schedulers)
    if isinstance(spec, SequentialLRSpec):
        return own + max(per_step(child, n_groups) for child in spec.schedulers)
    if isinstance(spec, LRRangeTestSpec):
        then = spec.then_spec(n_groups)
        return own if then is None else own + per_step(then, n_groups)
    if isinstance(spec, SpikeGuardSpec):  # its inner schedule, and judging the reports (per report)
        return own + per_step(spec.inner_spec(n_groups), n_groups)
    return own


def cost(spec: ScheduleSpec, *, n_groups: int, steps: int) -> int:
    """Units of ``steps`` steps of ``spec`` on ``n_groups`` param groups."""
    return math.ceil(steps * (n_groups + GROUP_OVERHEAD) * per_step(spec, n_groups))


def at_least(*, n_groups: int, steps: int) -> int:
    """A lower bound of ``cost`` for any schedule, known without parsing it: every type costs
    at least one unit per step and param group (``PER_STEP``)."""
    return steps * (n_groups + GROUP_OVERHEAD)


METRIC_ROW = 1
"""Units of a metric row a history reads in order (a range of the primary key) and writes:
0.7 µs on SQLite, 1.2 µs on PostgreSQL here."""
METRIC_SEEK = 16
"""Units of a metric name or row a history finds by an index seek (``BaseStore.metric_names``,
``metric_rows_at``): 4-8 µs on SQLite, 9-27 µs on PostgreSQL here."""


EVENT = 16
"""Units of an event a history shows, read (decoded from its JSON) and written: 11 µs on
SQLite, 10 µs on PostgreSQL here (2.5 µs of it written), where a unit of a history's LRs
is 0.6 µs on SQLite."""


EVENT_BYTES = 128
"""Bytes of an event's payload (its JSON as stored) a history reads and writes for one unit
more than ``EVENT``: a run's spec (``created``, ``replace_schedule``), up to a request
body's 1 MiB, took 1.5-7.6 µs per KB to decode and write again here."""


BAND_EVENT = 16
"""Units of a metric event a spike-guard view reads and decodes (``read_models.RunBands``)."""

BAND_BYTES = 4
"""Bytes of a metric event's payload a spike-guard view reads and judges for one unit more than
``BAND_EVENT``: its reports (about 70 bytes each), each judged against its rank's baseline
(its median and MAD found, a few µs whatever the guard's ``window``)."""

BAND_POINT = 4
"""Units of a band point a spike-guard view shows: a step, a value, a baseline and a spike
line written."""


def bands_cost(*, events: int = 0, event_bytes: int = 0, points: int = 0) -> int:
    """Units of a spike-guard view: ``events`` metric events of ``event_bytes`` bytes of payload
    read and their reports judged, and ``points`` band points shown."""
    return events * BAND_EVENT + event_bytes // BAND_BYTES + points * BAND_POINT


def history_cost(
    *, n_groups: int, points: int, series: int = 0, read: int = 0, sought: int = 0, events: int = 0,
    event_bytes: int = 0,
) -> int:
    """Units of a history: ``points`` stored LRs of ``n_groups`` groups read and serialised (no
    schedule stepped), ``series`` metric names found, ``read`` metric rows read in order,
    ``sought`` index seeks for rows and ``events`` events shown, of ``event_bytes`` bytes of
    payload in all (see ``ReadModels.history``)."""
    return (points * (n_groups + GROUP_OVERHEAD) + (series + sought) * METRIC_SEEK + read * METRIC_ROW
            + events * EVENT + event_bytes // EVENT_BYTES)


def history_points(*, n_groups: int, series: int, budget: int) -> int:
    """The most points of a history of ``n_groups`` groups and ``series`` metric series of at
    most that many rows each (read in order: their first rows and their last step's), and no
    event (each priced as ``EVENT`` units more), within ``budget``: the worst history a budget
    allows."""
    per_point = n_groups + GROUP_OVERHEAD + 2 * series * METRIC_ROW
    return (budget - series * (METRIC_SEEK + 2 * METRIC_ROW)) // per_point


def steps_within(spec: ScheduleSpec, *, n_groups: int, budget: int) -> int:
    """The most steps of ``spec`` that fit in ``budget`` units (at least 1: one step is always served)."""
    return max(1, fit(spec, n_groups=n_groups, budget=budget))


def fit(spec: ScheduleSpec, *, n_groups: int, budget: int) -> int:
    """The most steps of ``spec`` that fit in ``budget`` units (0 when not even one does)."""
    return int(max(0, budget) // ((n_groups + GROUP_OVERHEAD) * per_step(spec, n_groups)))


@dataclass(frozen=True, slots=True, eq=False)
class PricePlan:
    """What a run's steps cost from its engine's step on: ``schedule``'s price, then, from the
    step after each switch (a ``replace_schedule`` placed ahead: its step and its schedule, in
    step order, the last placed last), the new schedule's. So no budget prices a dear
    schedule's steps at the cheap one's that precedes it.

    One immutable value (``RunState.prices``): a commit swaps in the next plan under the run's
    lock, and a reader on any thread takes the whole plan in one attribute read, never half of
    a change, nor a walk over the actions placed ahead. Compared by identity (``eq=False``):
    ``RunManager.budget_steps`` caches its count per plan.
    """

    schedule: ScheduleSpec
    n_groups: int
    switches: tuple[tuple[int, ScheduleSpec], ...] = ()

    def work(self, start: int, end: int) -> int:
        """The units of taking the engine from step ``start`` to ``end``, each step priced by
        the schedule that takes it."""
        n, schedule, units = self.n_groups, self.schedule, 0
        for step, replacement in self.switches:
            if step >= end:
                break
            if step > start:
                units += cost(schedule, n_groups=n, steps=step - start)
                start = step
            schedule = replacement
        return units + cost(schedule, n_groups=n, steps=max(0, end - start))

    def steps_within(self, start: int, budget: int) -> int:
        """The most steps from ``start`` that ``budget`` units pay for, priced as ``work``
        prices them (at least 1: one step is always served)."""
        n, schedule, taken = self.n_groups, self.schedule, 0
        for step, replacement in self.switches:
            if step > start:
                fits = fit(schedule, n_groups=n, budget=budget)
                if fits < step - start:
                    return max(1, taken + fits)
                taken += step - start
                budget -= cost(schedule, n_groups=n, steps=step - start)
                start = step
            schedule = replacement
        return max(1, taken + fit(schedule, n_groups=n, budget=budget))

    def placed(self, step: int, schedule: ScheduleSpec) -> PricePlan:
        """This plan with a switch to ``schedule`` after ``step``. One placed at that step
        before is replaced: the last placed applies last, so it alone prices the steps after
        (and the plan stays as long as the distinct steps switched at, however many pile up)."""
        switches = list(self.switches)
        at = bisect_right(switches, step, key=lambda switch: switch[0])
        if at and switches[at - 1][0] == step:
            switches[at - 1] = (step, schedule)
        else:
            switches.insert(at, (step, schedule))
        return PricePlan(self.schedule, self.n_groups, tuple(switches))

    def from_step(self, step: int, schedule: ScheduleSpec) -> PricePlan:
        """The plan once the engine is at ``step`` with ``schedule``: the switches it took dropped."""
        return PricePlan(schedule, self.n_groups, tuple(s for s in self.switches if s[0] > step))


def check(what: str, field: str, units: int, budget: int) -> None:
    """Refuse a request whose cost ``units`` is over ``budget``.

    Args:
        what: The work in words, e.g. ``"a preview of 4000 steps on 1024 param groups"``.
        field: The request field to change.

    Raises:
        WorkBudgetExceeded: naming the budget and the cost.
    """
    if units > budget:
        raise WorkBudgetExceeded.at(
            field,
            f"{what} costs {units} work units, over the work budget of {budget} "
            f"(LRSERVE_WORK_BUDGET; cost = steps × (param groups + {GROUP_OVERHEAD}) × "
            "per-step cost of the schedule)",
        )
