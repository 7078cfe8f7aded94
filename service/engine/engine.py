"""The schedule engine: real torch schedulers driven on a shadow optimizer.

lrserve never re-implements a schedule formula. ``Engine`` builds the torch scheduler
tree a spec describes on an SGD over zero-size tensors (one param group per run group)
and steps it, so every value is torch's own. What torch cannot do is a thin layer on
top that touches the same objects the way a person would in a training loop:

- **Plateau stages.** ``ReduceLROnPlateau`` may sit inside ``SequentialLR`` (warm-up
  then plateau). The composite holds a placeholder that keeps the LRs as they are
  (and restarts them at the base LRs when the stage begins, as torch's closed-form
  schedulers do at a milestone); the stage's real ``ReduceLROnPlateau`` lowers them
  when metrics arrive. A metric reported with step *k* is fed to a stage only if the
  stage was active at step *k-1*: it was measured at those values. Patience and
  cooldown therefore count reports, not steps.
- **Spike guard.** A ``SpikeGuard`` at the top multiplies the values the inner schedule
  leaves in the param groups on the way out (``values``), so the inner clock and its
  recursive formulas never see the backoff (see ``spike_guard.py``).
- **Operator actions** write ``param_group["lr"]`` by hand, freeze the clock, or build
  a new schedule from the current LRs.

Example (StepLR(step_size=2, gamma=0.1), base lr 1.0)::

    >>> e = Engine(parse_schedule({"type": "StepLR", "step_size": 2}, n_groups=1), [1.0])
    >>> [e.values()[0][0]] + [(e.advance(), e.values()[0][0])[1] for _ in range(4)]
    [1.0, 1.0, 0.1, 0.1, 0.010000000000000002]
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from lrserve.service.engine.range_test import RangeTest
from lrserve.service.engine.spec import (
    ScheduleSpec,
    SpikeGuardSpec,
    cycles_momentum,
    parse_schedule,
    spec_to_json,
)
from lrserve.service.engine.spike_guard import GuardSettings, Report, Spike, SpikeGuard
from lrserve.service.errors import ScheduleError
from torch.optim import lr_scheduler as torch_schedulers

Values = tuple[tuple[float, ...], "tuple[float, ...] | None"]
"""The LRs of every param group at one step, and their momentums (None: not cycled)."""

# Errors torch (or an lr_lambda expression) raises when a schedule cannot take a step,
# e.g. OneCycleLR stepped past total_steps.
_STEP_ERRORS = (ValueError, ZeroDivisionError, OverflowError, ArithmeticError)

ROUNDING = 1e-12
"""An LR in ``[-ROUNDING * base LR, 0)`` is zero but for float rounding: served as torch gives it
(``Engine.check_values``); one below it is refused as negative."""


@dataclass(frozen=True)
class ScheduleSwitch:
    """A range test ended: the run switched to its ``then`` schedule (or holds the chosen LR)."""

    chosen: float
    lrs: tuple[float, ...]
    then: dict[str, Any] | None


@dataclass(frozen=True)
class PlateauReduction:
    """A plateau stage lowered the LRs while taking a step."""

    stage: str
    monitor: str
    value: float
    before: tuple[float, ...]
    after: tuple[float, ...]


Decision = PlateauReduction | ScheduleSwitch | Spike
"""Something a step decided that an event documents."""


class _PlateauStage:
    """A ReduceLROnPlateau that receives metrics only while its stage is active."""

    def __init__(self, spec: Any, optimizer: torch.optim.Optimizer, path: str, always: bool) -> None:
        self.monitor: str = spec.monitor
        self.path = path
        self.always = always
        self.active = always
        self.seen = False
        self.scheduler = torch_schedulers.ReduceLROnPlateau(optimizer, **spec.torch_kwargs())


class _PlateauClock(torch_schedulers.LRScheduler):
    """Stands in a SequentialLR for a plateau stage: keeps the LRs, restarts them at the stage's start."""

    def __init__(self, optimizer: torch.optim.Optimizer, stage: _PlateauStage) -> None:
        self._stage = stage
        super().__init__(optimizer)

    def get_lr(self) -> list[float | torch.Tensor]:  # torch's annotation; these are floats
        self._stage.seen = True
        if self.last_epoch == 0:
            return [float(lr) for lr in self.base_lrs]
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "_stage"}


class _ShadowSGD(torch.optim.SGD):
    """torch's SGD, which the schedulers drive, minus two calls that import ``torch._dynamo``.

    torch wraps ``Optimizer.add_param_group`` in ``torch._disable_dynamo`` and ``SGD.step``
    in ``_use_grad_for_differentiable``: on its first call each imports ``torch._dynamo``
    (with sympy, ~800 modules: 3 s of a server's 7 s start-up here), only to keep torch.compile
    from tracing into them. Nothing here is compiled, so:

    - ``add_param_group`` is torch's own function, called without that wrapper (its
      ``__wrapped__``; the wrapped one where a torch has none): the same checks and defaults;
    - ``step`` does nothing, which is what SGD's step does to these parameters: none ever has
      a gradient (SGD skips such parameters, and keeps no state for them). The schedulers
      only need to see it called (their ``optimizer.step()`` before ``scheduler.step()`` check).

    The schedulers' values are torch's own either way: they never call either method.
    """

    add_param_group = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__",
                              torch.optim.Optimizer.add_param_group)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is None:
            return None
        with torch.enable_grad():  # as SGD calls one (lrserve passes none)
            return closure()


def _shadow_optimizer(base_lrs: Sequence[float], momentums: Sequence[float] | None) -> torch.optim.SGD:
    groups = [
        {"params": [torch.zeros(0)], "lr": float(lr), "momentum": float(momentums[i]) if momentums else 0.0}
        for i, lr in enumerate(base_lrs)
    ]
    optimizer = _ShadowSGD(groups[:1], lr=float(base_lrs[0]))
    # torch's add_param_group checks a new group's params against every group's so far: O(groups²),
    # 1.6 of the 1.7 s a 1024-group engine took to build (each create, load and restore). Each
    # group here holds a tensor of its own, so each is added where it sees no other group (torch
    # still fills its defaults and checks it), then the list is put back together.
    added = optimizer.param_groups
    for group in groups[1:]:
        optimizer.param_groups = []
        optimizer.add_param_group(group)
        added.extend(optimizer.param_groups)
    optimizer.param_groups = added
    return optimizer


def _without_lambdas(state: Any) -> Any:
    """Drop LambdaLR's lambda state: the expressions are rebuilt from the spec and hold no state.
    A ``Counter`` stays one (MultiStepLR's milestones, which torch's closed form counts with
    ``elements()``)."""
    if isinstance(state, dict):
        kept = {k: ([None] * len(v) if k == "lr_lambdas" else _without_lambdas(v)) for k, v in state.items()}
        return Counter(kept) if isinstance(state, Counter) else kept
    if isinstance(state, list):
        return [_without_lambdas(v) for v in state]
    return state


def _milestones_counted(scheduler: Any) -> None:
    """MultiStepLR's milestones as the ``Counter`` torch made, in ``scheduler`` and the schedulers
    it holds: a snapshot taken before ``_without_lambdas`` kept the type holds a plain dict,
    which a SequentialLR switching to that stage after the restore failed on (``elements``)."""
    if isinstance(scheduler, torch_schedulers.MultiStepLR) and not isinstance(scheduler.milestones, Counter):
        scheduler.milestones = Counter(scheduler.milestones)
    for inner in getattr(scheduler, "_schedulers", ()):
        _milestones_counted(inner)


class Engine:
    """One run's live schedule: the values at ``self.step`` and how to take the next step.

    Args:
        schedule: A validated spec (``parse_schedule``).
        base_lrs: One base LR per param group.
        base_momentums: The groups' momentum (or Adam's ``betas[0]``), if known.
        reports_momentum: Whether values carry momentums; default: the schedule cycles them.
    """

    def __init__(
        self,
        schedule: ScheduleSpec,
        base_lrs: Sequence[float],
        base_momentums: Sequence[float] | None = None,
        *,
        reports_momentum: bool | None = None,
    ) -> None:
        self.n_groups = len(base_lrs)
        self.optimizer = _shadow_optimizer(base_lrs, base_momentums)
        self.reports_momentum = (
            cycles_momentum(schedule, self.n_groups) if reports_momentum is None else reports_momentum
        )
        self.step = 0
        self.held = False
        self.range_test: RangeTest | None = None
        self._range_step = 0
        self.guard: SpikeGuard | None = None
        self.spikes: list[Spike] = []  # every spike that took effect, for windows and events
        self._install(schedule, list(base_lrs))

    def _install(self, schedule: ScheduleSpec, base_lrs: list[float], keep_guard: bool = False) -> None:
        if isinstance(schedule, SpikeGuardSpec):
            self.guard = SpikeGuard(GuardSettings.from_spec(schedule))
            schedule = schedule.inner_spec(self.n_groups)
        elif not keep_guard:
            self.guard = None
        self.schedule = schedule
        self.base_lrs = [float(lr) for lr in base_lrs]
        self._stages: list[_PlateauStage] = []
        if self.range_test is not None:
            self.range_test.done = True  # a new schedule ends a test still running
        if schedule.type == "LRRangeTest":
            self.range_test = RangeTest(
                schedule.min_lr,
                schedule.max_lr,
                schedule.num_steps,
                schedule.mode,
                schedule.beta,
                schedule.early_stop_threshold,
                schedule.monitor,
            )
            self._range_step = 0
            self._root = None
            self.set_lrs(self._range_lrs(0))
            return
        self._root = self._build(schedule, "schedule", top=True)
        for stage in self._stages:
            stage.active = stage.always or stage.seen
        # Tell torch the (shadow) optimizer has stepped, so it does not warn about the call order.
        self.optimizer.step()

    def _build(self, spec: Any, path: str, top: bool = False) -> torch_schedulers.LRScheduler | None:
        if spec.type == "ReduceLROnPlateau":
            self._stages.append(_PlateauStage(spec, self.optimizer, path, always=top))
            return None
        if spec.type == "SequentialLR":
            children = [self._build_stage(c, f"{path}.schedulers.{i}") for i, c in enumerate(spec.schedulers)]
            for stage in self._stages:  # only the stage SequentialLR starts is active at step 0
                stage.seen = False
            return torch_schedulers.SequentialLR(self.optimizer, children, milestones=list(spec.milestones))
        if spec.type == "ChainedScheduler":
            children = [self._build_stage(c, f"{path}.schedulers.{i}") for i, c in enumerate(spec.schedulers)]
            return torch_schedulers.ChainedScheduler(children, optimizer=self.optimizer)
        cls: type[torch_schedulers.LRScheduler] = getattr(torch_schedulers, spec.type)
        return cls(self.optimizer, **spec.torch_kwargs())

    def _build_stage(self, spec: Any, path: str) -> torch_schedulers.LRScheduler:
        if spec.type == "ReduceLROnPlateau":
            stage = _PlateauStage(spec, self.optimizer, path, always=False)
            self._stages.append(stage)
            return _PlateauClock(self.optimizer, stage)
        built = self._build(spec, path)
        assert built is not None
        return built

    # -- reading -------------------------------------------------------------------

    def values(self) -> Values:
        """The LRs (and momentums, if reported) of every group at ``self.step``."""
        groups = self.optimizer.param_groups
        lrs = self._inner_lrs()
        if self.guard is not None and (m := self.guard.multiplier) != 1.0:
            lrs = tuple(lr * m for lr in lrs)
        if not self.reports_momentum:
            return lrs, None
        return lrs, tuple(float(g["momentum"]) for g in groups)

    def _inner_lrs(self) -> tuple[float, ...]:
        return tuple(float(g["lr"]) for g in self.optimizer.param_groups)

    @property
    def watched(self) -> set[str]:
        """Names of the metrics the current schedule decides on: its plateau stages' and a
        running range test's."""
        names = {stage.monitor for stage in self._stages}
        if self.range_test is not None and not self.range_test.done:
            names.add(self.range_test.monitor)
        return names

    # -- stepping ------------------------------------------------------------------

    def advance(
        self,
        metrics: Mapping[str, float] | None = None,
        reports: Sequence[Mapping[str, Any]] = (),
    ) -> list[Decision]:
        """Take step ``self.step + 1``, as torch's ``scheduler.step(metric)`` would.

        Args:
            metrics: Metrics reported with this step; plateau stages active at the
                previous step receive the one they watch.
            reports: Per-rank reports applied at this step (``{"step", "rank", "name",
                "value"}``); a spike guard judges those of its monitor.

        Returns:
            The decisions this step caused: plateau reductions, a range test's switch, spikes.

        Raises:
            ScheduleError: torch cannot take this step (the engine is then unusable).
        """
        reductions: list[Decision] = []
        if not self.held:
            try:
                if self.range_test is not None and not self.range_test.done:
                    reductions = list(self._advance_range_test(metrics or {}))
                else:
                    if metrics:
                        reductions.extend(self._feed(metrics))
                    self._tick()
                if self.guard is not None:
                    reductions.extend(self._guard_step(reports))
            except _STEP_ERRORS as exc:
                raise ScheduleError.at(
                    "step", f"the schedule cannot take step {self.step + 1}: {exc}"
                ) from exc
            self.check_values(self.step + 1, "the schedule's")
        self.step += 1
        return reductions

    def _guard_step(self, reports: Sequence[Mapping[str, Any]]) -> list[Spike]:
        guard = self.guard
        assert guard is not None
        guard.tick()
        monitor = guard.settings.monitor
        mine = [Report.from_payload(r) for r in reports if r.get("name") == monitor]
        spikes = guard.observe(mine, self.step + 1) if mine else []
        self.spikes.extend(spikes)
        return spikes

    def check_values(self, step: int, whose: str) -> None:
        """Refuse LRs that must never be served: negative or not finite.

        "Negative" is below ``-ROUNDING`` times the group's base LR: a value above it is zero up
        to the float rounding of the schedule's own arithmetic, and is served as torch gives it
        (``LinearLR`` decaying to ``end_factor=0`` ends at -5.6e-19 from a base LR of 0.1 in
        about a third of its settings; torch applies it, an LR no training notices).

        Raises:
            ScheduleError: naming ``step`` and the first bad LR.
        """
        lrs = self.values()[0]
        if min(lrs) >= 0 and math.isfinite(sum(lrs)):  # two passes in C (a NaN makes the sum NaN)
            return
        for lr, base in zip(lrs, self.base_lrs, strict=True):  # which one, if any
            if not math.isfinite(lr):
                raise ScheduleError.at("step", f"{whose} LR is not finite at step {step} (got {lr!r})")
            if lr < -ROUNDING * abs(base):
                raise ScheduleError.at("step", f"{whose} LR is negative at step {step} (got {lr!r})")

    def _feed(self, metrics: Mapping[str, float]) -> list[PlateauReduction]:
        reductions = []
        for stage in self._stages:
            if stage.active and stage.monitor in metrics:
                value = float(metrics[stage.monitor])
                before = self._inner_lrs()  # a spike guard's backoff is not the stage's doing
                stage.scheduler.step(value)
                after = self._inner_lrs()
                if after != before:
                    reductions.append(PlateauReduction(stage.path, stage.monitor, value, before, after))
        return reductions

    def _range_lrs(self, step: int) -> list[float]:
        """The test's LR at ``step``, scaled per group as the base LRs are (group 0 is 1:1)."""
        assert self.range_test is not None
        lr = self.range_test.lr_at(step)
        return [lr * ratio for ratio in self._group_ratios()]

    def _group_ratios(self) -> list[float]:
        first = self.base_lrs[0]
        return [lr / first if first > 0 else 1.0 for lr in self.base_lrs]

    def _advance_range_test(self, metrics: Mapping[str, float]) -> list[PlateauReduction | ScheduleSwitch]:
        test = self.range_test
        assert test is not None and self.schedule.type == "LRRangeTest"
        step = self._range_step + 1
        if test.monitor in metrics:
            test.record(test.lr_at(step - 1), float(metrics[test.monitor]))
        self._range_step = step
        if not test.done and step < test.num_steps:
            self.set_lrs(self._range_lrs(step))
            return []
        chosen = test.finish(fallback=self.base_lrs[0])
        bases = [chosen * ratio for ratio in self._group_ratios()]
        then = self.schedule.then
        then_spec = self.schedule.then_spec(self.n_groups)
        if then_spec is None:
            self.set_lrs(bases)
        else:
            for group in self.optimizer.param_groups:
                group.pop("initial_lr", None)
            self.set_lrs(bases)
            self._install(then_spec, bases, keep_guard=True)
        return [ScheduleSwitch(chosen, self.values()[0], then)]

    def _tick(self) -> None:
        for stage in self._stages:
            stage.seen = False
        if self._root is not None:
            self._root.step()
        for stage in self._stages:
            stage.active = stage.always or stage.seen

    # -- operator actions ----------------------------------------------------------

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Write every group's LR by hand; the schedule continues from there as torch would."""
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = float(lr)

    def scale(self, factor: float) -> None:
        """Multiply every group's current LR (the inner schedule's, under a spike guard)."""
        self.set_lrs([lr * factor for lr in self._inner_lrs()])

    def hold(self) -> None:
        """Freeze the clock: later steps keep these values and feed no decisions."""
        self.held = True

    def resume(self) -> None:
        """Let the clock run on from where it was frozen."""
        self.held = False

    def replace_schedule(self, schedule: ScheduleSpec) -> None:
        """Build ``schedule`` now, its base LRs being the current LRs.

        Raises:
            ScheduleError: torch cannot construct it on these LRs.
        """
        current = list(self.values()[0])
        for group in self.optimizer.param_groups:
            group.pop("initial_lr", None)  # torch takes base LRs from here (setdefault)
        try:
            self._install(schedule, current)
        except _STEP_ERRORS as exc:
            raise ScheduleError.at("schedule", f"cannot start this schedule: {exc}") from exc

    # -- snapshots -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (see ``codec`` for the JSON form)."""
        return {
            "step": self.step,
            "held": self.held,
            "reports_momentum": self.reports_momentum,
            "schedule": spec_to_json(self.schedule),
            "base_lrs": list(self.base_lrs),
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
            "root": _without_lambdas(self._root.state_dict()) if self._root is not None else None,
            "stages": [{"active": s.active, "state": s.scheduler.state_dict()} for s in self._stages],
            "range_test": dataclasses.asdict(self.range_test) if self.range_test is not None else None,
            "range_step": self._range_step,
            "guard": self.guard.snapshot() if self.guard is not None else None,
            "spikes": [dataclasses.asdict(s) for s in self.spikes],
        }

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any], schedule: ScheduleSpec | None = None) -> Engine:
        """Rebuild an engine from ``snapshot()``; it continues bit for bit as the original.

        ``schedule``: the spec the caller holds (an engine's ``schedule``), used where it is the
        snapshot's (its JSON compared: a range test that ended in the steps taken has switched
        to another), instead of parsing the snapshot's again: a ``LambdaLR``'s expressions
        are not compiled again (1,024 of them, ~0.1 s with the GIL held, at every big window
        of such a run in the server). The values are the same either way; an expression's
        evaluation error names its field by the path of the spec it was built in (the held
        one's, as the live engine's does, where a parsed one starts at ``schedule``)."""
        n_groups = len(snapshot["base_lrs"])
        if schedule is None or spec_to_json(schedule) != snapshot["schedule"]:
            schedule = parse_schedule(snapshot["schedule"], n_groups=n_groups, validated=True)
        engine = cls(schedule, snapshot["base_lrs"], reports_momentum=snapshot["reports_momentum"])
        for group, saved in zip(engine.optimizer.param_groups, snapshot["groups"], strict=True):
            group.update(saved)
        if engine._root is not None:
            engine._root.load_state_dict(snapshot["root"])
            _milestones_counted(engine._root)
        for stage, saved in zip(engine._stages, snapshot["stages"], strict=True):
            stage.scheduler.load_state_dict(saved["state"])
            stage.active = saved["active"]
        engine.step = snapshot["step"]
        engine.held = snapshot["held"]
        if snapshot.get("range_test") is not None:
            engine.range_test = RangeTest(**snapshot["range_test"])
            engine._range_step = snapshot["range_step"]
        if snapshot.get("guard") is not None:
            engine.guard = SpikeGuard.restore(snapshot["guard"])
        engine.spikes = [Spike(**s) for s in snapshot.get("spikes", [])]
        return engine


@dataclass(frozen=True)
class Stepped:
    """Steps taken with no input from a snapshot (``steps_from``), as they travel back from a
    worker process: their values packed, the decisions they made, the engine after them."""

    lrs: bytes  # float64, step after step, each step's groups in order
    momentums: bytes | None
    decisions: dict[int, list[Decision]]  # by step; steps that decided nothing are left out
    snapshot: dict[str, Any]  # the engine after the last step taken
    cut: bool  # a step after ``need`` failed: the steps end right before it


def steps_from(snapshot: Mapping[str, Any], target: int, need: int) -> Stepped:
    """Restore an engine from ``snapshot`` and take every step up to ``target``, with no
    metric, report or action on the way (big work: ``service.offload`` runs it in a worker
    process). The values are those the engine it was taken from would have given, bit for bit.

    A step up to ``need`` that fails raises its ``ScheduleError``; one after it ends the steps
    before it (``cut``), as ``RunState.advance_to`` does.
    """
    engine = Engine.restore(snapshot)
    lrs = array("d")
    momentums = array("d") if engine.reports_momentum else None
    decisions: dict[int, list[Decision]] = {}
    while engine.step < target:
        step = engine.step + 1
        try:
            made = engine.advance()
        except ScheduleError:
            if step <= need:
                raise
            engine = Engine.restore(snapshot)  # the failed step left it unusable: the good ones again
            while engine.step < step - 1:
                engine.advance()
            return Stepped(lrs.tobytes(), None if momentums is None else momentums.tobytes(), decisions,
                           engine.snapshot(), cut=True)
        if made:
            decisions[step] = made
        values, moms = engine.values()
        lrs.extend(values)
        if momentums is not None and moms is not None:
            momentums.extend(moms)
    return Stepped(lrs.tobytes(), None if momentums is None else momentums.tobytes(), decisions,
                   engine.snapshot(), cut=False)


def warm_up_torch() -> None:
    """Build and step one throwaway engine, so the first run a process loads does not stall.

    torch imports parts of itself lazily on the first optimizer and scheduler built; paid at
    start-up, before the server takes requests, instead of by the first request (and every
    request queued behind it). With ``_ShadowSGD`` that is milliseconds: ``torch._dynamo``
    (seconds) is never imported.
    """
    engine = Engine(parse_schedule({"type": "StepLR", "step_size": 1}, n_groups=1), [0.1], None)
    engine.advance()
