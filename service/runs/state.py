"""``RunState``: one run's engine, its final values, and the inputs still ahead of it."""

from __future__ import annotations

import copy
import threading
from array import array
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import chain
from typing import Any

from lrserve.service.engine import cost
from lrserve.service.engine.actions import Action, ReplaceSchedule
from lrserve.service.engine.engine import Decision, Engine, ScheduleSwitch, Values, steps_from
from lrserve.service.engine.run_spec import RunSpec
from lrserve.service.engine.spike_guard import Spike
from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import ScheduleError
from lrserve.service.offload import BigWork, is_big
from lrserve.service.runs.value_log import ValueLog
from lrserve.service.store.events import SERVER


@dataclass(frozen=True)
class Control:
    """An operator action as placed in the log: the action, who asked and why."""

    action: Action
    actor: str = SERVER
    reason: str | None = None


@dataclass
class Inputs:
    """Decisions placed at steps: metrics fed with step k, actions applied right after step k.

    ``reports`` are the per-rank reports a spike guard judges at step k, in log order.
    """

    metrics: dict[int, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    actions: dict[int, list[Control]] = field(default_factory=lambda: defaultdict(list))
    reports: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    stops: set[int] = field(default_factory=set)
    """The steps of ``actions`` where one stops the run (``RunState.stops_at``)."""


@dataclass(frozen=True)
class StepOutcome:
    """What taking one step did, besides changing the values."""

    step: int
    reductions: list[Decision]
    actions: list[Control]
    """The operator actions applied right after this step."""
    statuses: list[Control] = field(default_factory=list)
    """Those of ``actions`` that set the run's status (``hold``, ``resume``, ``stop``), unless it
    was stopped already: a stopped run's status and ``stopped_at`` stay its first stop's."""


@dataclass(frozen=True)
class Replayed:
    """Final values of steps ``first .. first + len(values) - 1``, below a state's
    ``first_step``: replayed once and kept (``RunCache.values_between``)."""

    first: int
    values: ValueLog


@dataclass(frozen=True)
class Marks:
    """The run's status (and the steps it changed at) as of some step."""

    status: RunStatus = RunStatus.ACTIVE
    stopped_at: int | None = None
    switched_at: int | None = None


class RunState:
    """A loaded run. All mutation happens under ``lock`` (and the store's run lock).

    ``values[i]`` holds the final values of step ``first_step + i`` up to ``horizon``;
    steps before ``first_step`` (a run loaded from a snapshot) are replayed when first asked
    for, and those replayed up to ``first_step - 1`` are kept in ``replayed``. Only durable steps
    are visible: ``advance_to`` computes the next steps (the engine then sits ahead of
    ``horizon``), and ``publish`` shows them once the store holds them, so that no
    answer, from any thread, depends on a commit that may still fail (API.md, finality).
    ``status``, ``stopped_at`` and ``switched_at`` describe the run at ``horizon``.
    """

    def __init__(self, run_id: str, spec: RunSpec, engine: Engine, last_seq: int) -> None:
        self.run_id = run_id
        self.spec = spec
        self.n_groups = spec.n_groups
        self.world_size = spec.world_size
        self.watched = spec.watched  # and every metric a new schedule brought (``note_action``)
        self.guard_monitors = spec.guard_monitors
        self.engine = engine
        self.inputs = Inputs()
        self.first_step = engine.step
        self.values = ValueLog(self.n_groups, momentum=engine.reports_momentum)  # packed: all runs hold it
        self.values.append(engine.values())
        self.last_seq = last_seq
        self.status = RunStatus.ACTIVE
        self.stopped_at: int | None = None
        self.switched_at: int | None = None
        self.lock = threading.Lock()
        self.created_at: datetime | None = None  # the stored run's; tells a re-created run apart
        self.evicted = False  # dropped by its manager after a failed commit: reload, never reuse
        self.prices = cost.PricePlan(engine.schedule, self.n_groups)  # what its steps cost: see ``_reprice``
        self.budget_steps: tuple[cost.PricePlan, int] | None = None  # (prices, steps per request)
        self.broken = False  # the engine failed past the last step computed (``advance_to``)
        self.checkpointed_to = engine.step - 1  # the LRs of steps up to here are stored (value_chunks)
        self.replayed: Replayed | None = None  # steps before first_step, once replayed; replaced whole
        self.replaying = threading.Lock()  # held while replaying them (``RunCache.values_between``)
        self._pending = self.values.empty()  # computed, not yet durable; packed as ``values``
        self.marks = Marks()  # the status at the engine's step (ahead of ``status`` in a commit)
        self.watching: tuple[str, ...] = tuple(sorted(engine.watched))  # decided on at ``horizon``

    @property
    def horizon(self) -> int:
        """The highest step whose values are final, durable and visible here."""
        return self.first_step + len(self.values) - 1

    def stops_at(self) -> int | None:
        """The first step above the horizon after which a placed action stops the run (None:
        no stop is placed): the run takes no action at or after it."""
        return min(self.inputs.stops, default=None)

    def restore_marks(self, marks: Marks) -> None:
        """Set the status at the engine's step (a snapshot's), before anything was published."""
        self.marks = marks
        self.status, self.stopped_at, self.switched_at = marks.status, marks.stopped_at, marks.switched_at

    def publish(self) -> None:
        """Show every step computed so far: call once the store holds them durably."""
        self.values.extend_log(self._pending)  # one copy of doubles
        self._pending = self.values.empty()
        self._reprice()  # after the horizon moved: a reader never prices the old one by the new plan
        marks = self.marks
        self.status, self.stopped_at, self.switched_at = marks.status, marks.stopped_at, marks.switched_at
        self.watching = tuple(sorted(self.engine.watched))

    def take_computed(self) -> list[Values]:
        """The values ``advance_to`` computed since, never to be published (a shadow's, see
        ``service.runs.provisional``)."""
        computed, self._pending = self._pending, self.values.empty()
        return computed[:]

    def place_action(self, step: int, control: Control) -> None:
        """An operator action placed at ``step``, above the horizon: taken right after it
        (``_take_step``), and a new schedule priced from there on (``prices``)."""
        self.inputs.actions[step].append(control)
        if control.action.sets_status is RunStatus.STOPPED:
            self.inputs.stops.add(step)
        if isinstance(control.action, ReplaceSchedule):
            self.prices = self.prices.placed(step, control.action.spec(self.n_groups))

    def _reprice(self) -> None:
        """Keep ``prices`` the engine's as of the published horizon (``publish``): its schedule
        now (a new one, or a range test's ``then``), without the switches it took. Until then,
        the plan before still holds the switch being taken, so it prices from the old horizon
        right."""
        prices, engine = self.prices, self.engine
        took = prices.switches and prices.switches[0][0] <= engine.step
        if took or prices.schedule is not engine.schedule:
            self.prices = prices.from_step(engine.step, engine.schedule)

    def note_action(self, action: Action) -> None:
        """An action placed at any step may bring metrics to watch from then on (a new schedule)."""
        watched, monitors = action.watched(self.n_groups), action.guard_monitors(self.n_groups)
        if watched:
            self.watched = self.watched | watched
        if monitors:
            self.guard_monitors = self.guard_monitors | monitors

    def held_packed(self, start: int, end: int) -> ValueLog | None:
        """``held_between``'s values as a packed copy (``ValueLog.copy_range``: its own arrays,
        so ``table()`` may view them) when they are all published here (not ``replayed``), else
        None; never blocks."""
        first = self.first_step
        if start < first or end > self.horizon or start > end:
            return None
        return self.values.copy_range(start - first, end - first + 1)

    def held_between(self, start: int, end: int) -> list[Values] | None:
        """Final values of steps ``start .. end`` if this state holds them all (published, or
        ``replayed``), else None; never blocks (event loop safe)."""
        first = self.first_step  # never changes; ``values`` only grows and ``replayed`` is replaced whole
        if end > self.horizon or start > end:
            return None
        if start >= first:
            return self.values[start - first : end - first + 1]
        replayed = self.replayed
        if replayed is None or start < replayed.first:
            return None
        older = replayed.values[start - replayed.first : min(end, first - 1) - replayed.first + 1]
        return older if end < first else older + self.values[: end - first + 1]

    def advance_to(
        self, target: int, *, need: int | None = None, big_work: BigWork | None = None
    ) -> list[StepOutcome]:
        """Step the engine up to ``target``, applying the inputs placed on the way.

        The new steps stay invisible (``cached`` does not see them) until ``publish``.

        Args:
            need: The last step that must be reached; a step after it that the schedule
                cannot take ends the advance before it (a window crossing a failing step
                is the steps before it). ``broken`` is then set: the engine sits past its
                last good step, so the state must be dropped once those are published.
                ``None``: every step up to ``target`` must be reached.
            big_work: Where the steps after the last input go when they are big work (a
                wide window, a step jump): taken from a snapshot in a worker process, so
                that this process's interpreter (its GIL, which every other request needs)
                only restores the engine after them. ``None``: every step here.

        Raises:
            ScheduleError: a step up to ``need`` would serve an LR that is negative or not
                finite, or torch cannot take it.
            WorkerLost: the worker process taking the steps died twice.
        """
        outcomes: list[StepOutcome] = []
        here = target
        if big_work is not None and big_work.workers:
            inputs = self.inputs
            here = max((s for s in chain(inputs.metrics, inputs.actions, inputs.reports) if s <= target),
                       default=self.engine.step)
            if not is_big(n_groups=self.n_groups, steps=target - here, schedule=None):
                here = target
        while self.engine.step < here:
            step = self.engine.step + 1
            try:
                reductions, actions = self._take_step(step)
            except ScheduleError:
                if need is None or step <= need:
                    raise
                self.broken = True
                return outcomes
            self._took(step, reductions, actions, outcomes)
            self._pending.append(self.engine.values())
        if self.engine.step < target and big_work is not None:
            outcomes.extend(self._advance_elsewhere(target, need, big_work))
        return outcomes

    def _advance_elsewhere(self, target: int, need: int | None, big_work: BigWork) -> list[StepOutcome]:
        """The steps up to ``target``, none with an input, taken in a worker process."""
        first = self.engine.step + 1
        stepped = big_work.run(steps_from, self.engine.snapshot(), target, target if need is None else need)
        lrs = array("d", stepped.lrs)
        # packed as they came: no float object made (485 steps of 1,024 groups were half a million,
        # each made and read back into the log's doubles with this process's GIL held); checked
        # (their shape) before the engine moves
        self._pending.extend_packed(lrs, None if stepped.momentums is None else array("d", stepped.momentums))
        self.engine = Engine.restore(stepped.snapshot, self.engine.schedule)  # its expressions kept
        outcomes: list[StepOutcome] = []
        for step in range(first, first + len(lrs) // self.n_groups):
            self._took(step, stepped.decisions.get(step, []), [], outcomes)
        self.broken = self.broken or stepped.cut
        return outcomes

    def _took(
        self, step: int, reductions: list[Decision], actions: list[Control], outcomes: list[StepOutcome],
    ) -> None:
        """Keep what taking ``step`` did: its status marks, its outcome (its values: the caller,
        into ``_pending``)."""
        if any(isinstance(r, ScheduleSwitch) for r in reductions):
            self.marks = replace(self.marks, switched_at=step)
        stops = any(isinstance(r, Spike) and r.stop for r in reductions)
        if stops and self.marks.status is not RunStatus.STOPPED:
            self.marks = replace(self.marks, status=RunStatus.STOPPED, stopped_at=step)
        statuses = [control for control in actions if self._track_status(control.action, step)]
        outcomes.append(StepOutcome(step, reductions, actions, statuses))

    def spikes_between(self, start: int, end: int) -> list[Spike]:
        """Spikes that took effect at steps ``start .. end`` (final ones only: call with end <= horizon)."""
        return [s for s in list(self.engine.spikes) if start <= s.applied_at <= end]

    def _take_step(self, step: int) -> tuple[list[Decision], list[Control]]:
        """Advance the engine to ``step`` and apply the operator actions placed there.

        A step that fails but carries actions is taken on the last good values (the clock
        moves, the LRs stay), and the actions apply to those: an operator can always move
        a run past a failing step. The values after the actions are checked as torch's are.
        """
        metrics = self.inputs.metrics.pop(step, None)
        reports = self.inputs.reports.pop(step, ())
        actions = self.inputs.actions.pop(step, [])
        self.inputs.stops.discard(step)
        before = copy.deepcopy(self.engine) if actions else None  # rare: steps with actions
        try:
            reductions = self.engine.advance(metrics, reports)
        except ScheduleError:
            if before is None:
                raise
            self.engine = before
            self.engine.step = step
            reductions = []
        for control in actions:
            control.action.apply(self.engine)
        if actions:
            kinds = ", ".join(c.action.kind for c in actions)
            self.engine.check_values(step, f"after the operator's actions ({kinds}), the")
        return reductions, actions

    def _track_status(self, action: Action, step: int) -> bool:
        """Take the status ``action`` sets at ``step``; whether it set one (a stopped run stays
        stopped from its first stop's step)."""
        status, marks = action.sets_status, self.marks
        if status is None or marks.status is RunStatus.STOPPED:
            return False
        stopped_at = step if status is RunStatus.STOPPED else marks.stopped_at
        self.marks = replace(marks, status=status, stopped_at=stopped_at)
        return True
