"""The engine against in-process torch, bit for bit (``==`` on float64)."""

from __future__ import annotations

import collections
import contextlib
import json
import pickle
import typing

import orjson
import pytest
from lrserve.service.engine import codec
from lrserve.service.engine.actions import ARGUMENTS, ActionKind, parse_action
from lrserve.service.engine.engine import ROUNDING, Engine
from lrserve.service.engine.preview import preview
from lrserve.service.engine.run_spec import RunSpec
from lrserve.service.engine.spec import parse_schedule
from lrserve.service.errors import ScheduleError

from tests.service.engine import reference
from tests.specs import plateau, warmup_then

STEPS = 60

EXAMPLES = [
    pytest.param({"type": "StepLR", "step_size": 7, "gamma": 0.5}, id="step"),
    pytest.param({"type": "MultiStepLR", "milestones": [5, 12, 30], "gamma": 0.3}, id="multistep"),
    pytest.param({"type": "ConstantLR", "factor": 0.25, "total_iters": 9}, id="constant"),
    pytest.param({"type": "LinearLR", "start_factor": 0.1, "total_iters": 13}, id="linear"),
    pytest.param({"type": "ExponentialLR", "gamma": 0.93}, id="exponential"),
    pytest.param({"type": "PolynomialLR", "total_iters": 40, "power": 2.0}, id="polynomial"),
    pytest.param({"type": "CosineAnnealingLR", "T_max": 17, "eta_min": 0.001}, id="cosine"),
    pytest.param({"type": "CosineAnnealingWarmRestarts", "T_0": 5, "T_mult": 2}, id="cosine-warm-restarts"),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.2, "step_size_up": 6, "mode": "triangular2"},
        id="cyclic-momentum",
    ),
    pytest.param(
        {
            "type": "CyclicLR",
            "base_lr": [0.01, 0.02],
            "max_lr": 0.3,
            "step_size_up": 4,
            "mode": "exp_range",
            "gamma": 0.97,
            "cycle_momentum": False,
        },
        id="cyclic-exp-range",
    ),
    pytest.param({"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 100}, id="one-cycle"),
    pytest.param(
        {
            "type": "OneCycleLR",
            "max_lr": [0.5, 0.1],
            "epochs": 10,
            "steps_per_epoch": 10,
            "three_phase": True,
            "anneal_strategy": "linear",
        },
        id="one-cycle-three-phase",
    ),
    pytest.param({"type": "LambdaLR", "lr_lambda": "0.95 ** step"}, id="lambda"),
    pytest.param(
        {"type": "LambdaLR", "lr_lambda": ["min(1.0, (step + 1) / 10)", "0.95 ** step"]},
        id="lambda-per-group",
    ),
    pytest.param(
        {"type": "MultiplicativeLR", "lr_lambda": "0.9 if step % 3 == 0 else 1.0"}, id="multiplicative"
    ),
    pytest.param(
        {
            "type": "SequentialLR",
            "milestones": [10],
            "schedulers": [
                {"type": "LinearLR", "start_factor": 0.01, "total_iters": 10},
                {"type": "CosineAnnealingLR", "T_max": 50},
            ],
        },
        id="warmup-cosine",
    ),
    pytest.param(
        {
            "type": "ChainedScheduler",
            "schedulers": [
                {
                    "type": "SequentialLR",
                    "milestones": [5, 20],
                    "schedulers": [
                        {"type": "ConstantLR", "factor": 0.1, "total_iters": 5},
                        {"type": "ExponentialLR", "gamma": 0.9},
                        {"type": "StepLR", "step_size": 3},
                    ],
                },
                {"type": "MultiStepLR", "milestones": [30, 40], "gamma": 0.5},
            ],
        },
        id="sequential-in-chained",
    ),
    pytest.param(
        {
            "type": "ChainedScheduler",
            "schedulers": [
                {"type": "ConstantLR", "factor": 0.1, "total_iters": 2},
                {"type": "ExponentialLR", "gamma": 0.9},
            ],
        },
        id="chained",
    ),
    pytest.param(
        {
            "type": "ChainedScheduler",
            "schedulers": [
                {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 5},
                {"type": "ExponentialLR", "gamma": 0.99},
            ],
        },
        id="chained-cyclic-momentum",
    ),
]


def _per_group(spec) -> bool:
    """Whether the spec carries per-group lists (then it needs exactly two groups here)."""
    if isinstance(spec, dict):
        return any(
            isinstance(v, list) and k not in ("milestones", "schedulers") or _per_group(v)
            for k, v in spec.items()
        )
    if isinstance(spec, list):
        return any(_per_group(v) for v in spec)
    return False


def engine_trajectory(spec, base_lrs, steps, metrics=None):
    engine = Engine(parse_schedule(spec, n_groups=len(base_lrs)), base_lrs, [0.9] * len(base_lrs))
    out = [engine.values()]
    for k in range(1, steps):
        reports = {"val_loss": metrics[k - 1]} if metrics and metrics[k - 1] is not None else None
        engine.advance(reports)
        out.append(engine.values())
    return out


CASES = [
    pytest.param(p.values[0], base, id=f"{p.id}-{len(base)}-group")
    for p in EXAMPLES
    for base in ([0.1], [0.1, 0.025])
    if len(base) == 2 or not _per_group(p.values[0])
]


@pytest.mark.parametrize(("spec", "base_lrs"), CASES)
def test_engine_equals_torch(spec, base_lrs):
    ours = engine_trajectory(spec, base_lrs, STEPS)
    theirs = reference.trajectory(spec, base_lrs, STEPS)
    assert [list(lrs) for lrs, _ in ours] == [lrs for lrs, _ in theirs]
    for (_, our_moms), (_, their_moms) in zip(ours, theirs, strict=False):
        if our_moms is not None:
            assert list(our_moms) == their_moms


def test_the_shadow_optimizer_is_the_one_torch_builds_from_the_same_groups():
    """The engine adds its groups one at a time (torch's duplicate check is quadratic in groups):
    the result is what ``torch.optim.SGD(groups)`` gives, group for group."""
    import torch
    from lrserve.service.engine.engine import _shadow_optimizer

    lrs, moms = [0.1 * (i + 1) for i in range(40)], [0.5 + i / 100 for i in range(40)]
    ours = _shadow_optimizer(lrs, moms)
    theirs = torch.optim.SGD(
        [{"params": [torch.zeros(0)], "lr": lr, "momentum": m} for lr, m in zip(lrs, moms, strict=True)],
        lr=lrs[0],
    )
    strip = [{k: v for k, v in g.items() if k != "params"} for g in theirs.param_groups]
    assert [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups] == strip
    assert len({id(p) for g in ours.param_groups for p in g["params"]}) == 40
    assert ours.defaults == theirs.defaults
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's check still holds
        ours.add_param_group({"params": ours.param_groups[3]["params"]})


def test_the_shadow_optimizers_step_is_torchs_on_parameters_without_gradients():
    """``_ShadowSGD.step`` does nothing (torch's would import ``torch._dynamo``): what torch's
    ``SGD.step`` does to parameters that never have a gradient, with and without momentum."""
    import torch
    from lrserve.service.engine.engine import _shadow_optimizer

    for moms in (None, [0.9, 0.5]):
        ours, theirs = _shadow_optimizer([0.1, 0.2], moms), _shadow_optimizer([0.1, 0.2], moms)
        torch.optim.SGD.step(theirs)  # torch's own step on the same groups
        ours.step()
        def strip(opt):
            return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

        assert strip(ours) == strip(theirs) and ours.state == theirs.state == {}
        params = [p for opt in (ours, theirs) for g in opt.param_groups for p in g["params"]]
        assert [(p.numel(), p.grad) for p in params] == [(0, None)] * 4


def test_building_and_stepping_engines_never_imports_torch_dynamo():
    """The server's start-up (``warm_up_torch``) and every engine after it stay clear of
    ``torch._dynamo`` (~800 modules with sympy: seconds of a cold start), for every kind of
    schedule: built, stepped with metrics, snapshotted, restored."""
    import json
    import subprocess
    import sys

    specs = [p.values[0] for p in EXAMPLES] + [
        PLATEAU, warmup_then(plateau(), steps=3),
        {"type": "SpikeGuard", "monitor": "loss", "schedule": {"type": "StepLR", "step_size": 2}},
        {"type": "LRRangeTest", "min_lr": 1e-5, "max_lr": 1.0, "num_steps": 20},
    ]
    code = f"""
import sys, json
from lrserve.service.engine import codec
from lrserve.service.engine.engine import Engine, warm_up_torch
from lrserve.service.engine.spec import parse_schedule
warm_up_torch()
for spec in json.loads({json.dumps(json.dumps(specs))}):
    engine = Engine(parse_schedule(spec, n_groups=2), [0.1, 0.05], [0.9, 0.9])
    for k in range(12):
        engine.advance({{"val_loss": 1.0 / (k + 1), "loss": 1.0}})
    Engine.restore(codec.loads(codec.dumps(engine.snapshot()))).advance()
print(json.dumps(sorted(m for m in sys.modules if m.startswith("torch._dynamo"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=True)
    assert json.loads(out.stdout) == []


def test_momentums_reported_only_when_cycled():
    cyc = Engine(parse_schedule(EXAMPLES[8].values[0], n_groups=1), [0.1])
    step = Engine(parse_schedule({"type": "StepLR", "step_size": 2}, n_groups=1), [0.1])
    assert cyc.values()[1] is not None
    assert step.values()[1] is None


PLATEAU = plateau(patience=2, threshold=0.01, cooldown=1)
LOSSES = [
    1.0,
    0.9,
    0.95,
    0.93,
    0.94,
    0.96,
    0.7,
    0.71,
    0.72,
    0.73,
    0.74,
    0.75,
    float("nan"),
    0.8,
    0.8,
    0.8,
    0.8,
    0.8,
    0.8,
    0.8,
]


def test_plateau_equals_torch_fed_the_same_metrics():
    ours = engine_trajectory(PLATEAU, [0.1, 0.2], len(LOSSES) + 1, LOSSES)
    theirs = reference.trajectory(PLATEAU, [0.1, 0.2], len(LOSSES) + 1, LOSSES)
    assert [list(v[0]) for v in ours] == [v[0] for v in theirs]
    assert ours[-1][0][0] < 0.1  # it really reduced


def test_plateau_ignores_steps_without_its_metric():
    sparse = [m if i % 3 == 0 else None for i, m in enumerate(LOSSES * 3)]
    dense = [m for m in sparse if m is not None]
    ours = engine_trajectory(PLATEAU, [0.1], len(sparse) + 1, sparse)
    torch_dense = reference.trajectory(PLATEAU, [0.1], len(dense) + 1, dense)
    reported_at = [k for k in range(1, len(sparse) + 1) if sparse[k - 1] is not None]
    assert [list(ours[k][0]) for k in reported_at] == [torch_dense[i + 1][0] for i in range(len(dense))]


def test_warmup_then_plateau_follows_the_documented_rule():
    warm = 5
    spec = warmup_then(PLATEAU, steps=warm, start_factor=0.2)
    ours = engine_trajectory(spec, [0.1], len(LOSSES) + 1, LOSSES)
    # By hand: torch's LinearLR for the warm-up, base LR at the milestone, then a torch
    # ReduceLROnPlateau fed the metrics reported with steps k > warm.
    opt = reference.make_optimizer([0.1])
    linear = reference.build({"type": "LinearLR", "start_factor": 0.2, "total_iters": warm}, opt)
    expected = [float(opt.param_groups[0]["lr"])]
    for _ in range(1, warm):
        opt.step()
        linear.step()
        expected.append(float(opt.param_groups[0]["lr"]))
    opt.param_groups[0]["lr"] = 0.1
    expected.append(0.1)
    plateau = reference.build(PLATEAU, opt)
    for k in range(warm + 1, len(LOSSES) + 1):
        plateau.step(LOSSES[k - 1])
        expected.append(float(opt.param_groups[0]["lr"]))
    assert [v[0][0] for v in ours] == expected
    assert min(expected) < 0.1


@pytest.mark.parametrize("spec", EXAMPLES + [pytest.param(PLATEAU, id="plateau")])
def test_snapshot_round_trip_continues_identically(spec):
    base = [0.1, 0.05]
    original = Engine(parse_schedule(spec, n_groups=2), base, [0.9, 0.9])
    metrics = iter(LOSSES * 10)
    for _ in range(23):
        original.advance({"val_loss": next(metrics)})
    orjson.dumps(codec.to_jsonable(original.snapshot()))  # written by orjson itself: no fallback
    restored = Engine.restore(codec.loads(codec.dumps(original.snapshot())))
    assert restored.values() == original.values()
    for _ in range(30):
        m = {"val_loss": next(metrics)}
        original.advance(m)
        restored.advance(m)
        assert restored.values() == original.values()


class TestActions:
    def make(self, spec=None):
        return Engine(parse_schedule(spec or {"type": "ExponentialLR", "gamma": 0.5}, n_groups=2), [1.0, 0.5])

    def test_set_lr_then_schedule_continues_from_it(self):
        engine = self.make()
        engine.advance()
        apply(engine, {"action": "set_lr", "lrs": [0.3, 0.2]})
        assert engine.values()[0] == (0.3, 0.2)
        engine.advance()
        assert engine.values()[0] == (0.3 * 0.5, 0.2 * 0.5)

    def test_scale(self):
        engine = self.make()
        apply(engine, {"action": "scale", "factor": 0.1})
        assert engine.values()[0] == (1.0 * 0.1, 0.5 * 0.1)

    def test_hold_freezes_and_resume_continues_the_clock(self):
        engine = self.make({"type": "StepLR", "step_size": 2})
        apply(engine, {"action": "hold"})
        for _ in range(5):
            engine.advance()
        assert engine.values()[0] == (1.0, 0.5)
        apply(engine, {"action": "resume"})
        engine.advance()
        assert engine.values()[0] == (1.0, 0.5)  # the schedule's own step 1
        engine.advance()
        assert engine.values()[0] == (1.0 * 0.1, 0.5 * 0.1)

    def test_replace_schedule_starts_from_current_lrs(self):
        engine = self.make()
        engine.advance()
        apply(
            engine,
            {
                "action": "replace_schedule",
                "schedule": {"type": "LinearLR", "start_factor": 0.5, "total_iters": 2},
            },
        )
        assert engine.values()[0] == (0.5 * 0.5, 0.25 * 0.5)
        engine.advance()
        engine.advance()
        assert engine.values()[0] == (0.5, 0.25)


def test_one_cycle_past_its_end_is_a_schedule_error():
    from lrserve.service.errors import ScheduleError

    engine = Engine(
        parse_schedule({"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 5}, n_groups=1), [0.1]
    )
    with pytest.raises(ScheduleError):
        for _ in range(10):
            engine.advance()


@pytest.mark.parametrize(("start_factor", "total_iters"), [(0.1, 4), (0.1, 5), (1 / 3, 4), (0.9, 4)])
def test_a_linear_decay_to_zero_is_served_as_torch_gives_it(start_factor, total_iters):
    """torch's recursive ``LinearLR`` to ``end_factor=0`` ends a hair below zero in about a third of
    its settings (-5.6e-19 from 0.1): zero but for rounding, served bit for bit (before: the run
    stopped there, "the schedule's LR is negative"); a real negative LR is still refused."""
    spec = {"type": "LinearLR", "start_factor": start_factor, "end_factor": 0.0, "total_iters": total_iters}
    ours = engine_trajectory(spec, [0.1, 0.3], total_iters + 3)
    theirs = reference.trajectory(spec, [0.1, 0.3], total_iters + 3)
    assert [list(lrs) for lrs, _ in ours] == [lrs for lrs, _ in theirs]
    assert min(min(lrs) for lrs, _ in theirs) < 0  # the case: torch's value below zero


def test_an_lr_below_zero_by_more_than_rounding_is_refused():
    from lrserve.service.errors import ScheduleError

    spec = parse_schedule({"type": "LambdaLR", "lr_lambda": "1 if step < 3 else -1e-11"}, n_groups=1)
    engine = Engine(spec, [0.1])
    engine.advance()
    engine.advance()
    with pytest.raises(ScheduleError, match="negative at step 3"):
        engine.advance()


def test_preview_matches_engine_trajectory():
    spec = parse_schedule(EXAMPLES[15].values[0], n_groups=2)
    lrs, moms = preview(spec, [0.1, 0.025], None, 40)
    theirs = reference.trajectory(EXAMPLES[15].values[0], [0.1, 0.025], 40)
    assert lrs == [v[0] for v in theirs]
    assert moms is None


# -- properties over random valid specs ------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.service.engine.strategies import SAFE_STEPS, valid_specs  # noqa: E402

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def equals_torch(spec, base: list[float], steps: int) -> None:
    """The engine's LRs at steps 0..steps-1 are torch's; where torch drives an LR negative, the
    engine equals it up to that step and refuses that step (README, "What differs from torch")."""
    theirs = [lrs for lrs, _ in reference.trajectory(spec, base, steps)]
    negative = next((k for k, lrs in enumerate(theirs)
                     if any(lr < -ROUNDING * b for lr, b in zip(lrs, base, strict=True))), None)
    if negative is None:
        assert [list(lrs) for lrs, _ in engine_trajectory(spec, base, steps)] == theirs
        return
    with pytest.raises(ScheduleError, match=f"negative at step {negative} "):
        engine_trajectory(spec, base, negative + 1)
    assert [list(lrs) for lrs, _ in engine_trajectory(spec, base, negative)] == theirs[:negative]


@pytest.mark.parametrize("stored_before_the_fix", [False, True])
def test_a_multistep_stage_restored_before_its_switch_equals_torch(stored_before_the_fix):
    """Found by test_any_spec_survives_a_snapshot (hypothesis): a snapshot held MultiStepLR's
    milestones, torch's ``Counter``, as a plain dict, so a SequentialLR that switched to that
    stage after the restore (a restart, a big window in the worker, a provisional tail) failed
    where torch's closed form counts them (``elements()``). Snapshots stored so are mended as
    they are restored."""
    raw = {"type": "SequentialLR", "milestones": [4], "schedulers": [
        {"type": "StepLR", "step_size": 2}, {"type": "MultiStepLR", "milestones": [3, 6], "gamma": 0.5}]}
    theirs = [lrs for lrs, _ in reference.trajectory(raw, [0.1], 12)]
    original = Engine(parse_schedule(raw, n_groups=1), [0.1])
    for _ in range(2):
        original.advance()
    saved = codec.loads(codec.dumps(original.snapshot()))
    stage = saved["root"]["_schedulers"][1]
    if stored_before_the_fix:
        stage["milestones"] = dict(stage["milestones"])
    else:
        assert isinstance(stage["milestones"], collections.Counter)
    restored = Engine.restore(saved)
    for k in range(3, 12):
        restored.advance()
        assert list(restored.values()[0]) == theirs[k], k


def test_a_chain_torch_drives_negative_equals_torch_until_that_step():
    # Found by the property below: StepLR(step_size=1) takes the chain below eta_min, and the
    # recursive cosine then gives -9.0e-5 at step 7 (and positive values again from step 9).
    spec = {"type": "ChainedScheduler", "schedulers": [
        {"type": "StepLR", "step_size": 1},
        {"type": "CosineAnnealingLR", "T_max": 4, "eta_min": 0.0008410054558201936}]}
    assert reference.trajectory(spec, [0.1], 8)[7][0][0] == pytest.approx(-9.000925121617595e-05)
    equals_torch(spec, [0.1], 20)


@PROPERTY
@given(data=st.data(), n_groups=st.integers(1, 3))
def test_any_torch_spec_equals_torch(data, n_groups):
    spec = data.draw(valid_specs(n_groups, allow_plateau=False))
    equals_torch(spec, [0.1 * (i + 1) for i in range(n_groups)], 80)


@PROPERTY
@given(
    data=st.data(),
    n_groups=st.integers(1, 3),
    cut=st.integers(1, SAFE_STEPS // 2),
    losses=st.lists(st.one_of(st.none(), st.floats(0, 10)), min_size=SAFE_STEPS, max_size=SAFE_STEPS),
)
def test_any_spec_survives_a_snapshot(data, n_groups, cut, losses):
    spec = parse_schedule(data.draw(valid_specs(n_groups)), n_groups=n_groups)
    original = Engine(spec, [0.1] * n_groups, [0.9] * n_groups)
    restored = shared = None  # shared: restored with the original's spec object, as a worker's steps are
    for k in range(1, SAFE_STEPS // 2 + cut):
        if k == cut:
            restored = Engine.restore(codec.loads(codec.dumps(original.snapshot())))
            shared = Engine.restore(codec.loads(codec.dumps(original.snapshot())), original.schedule)
        reports = (
            {m: losses[k] for m in ("val_loss", "val_acc", "train_loss")} if losses[k] is not None else None
        )
        try:
            original.advance(reports)
        except ScheduleError as exc:
            # Some chains torch drives negative (ChainedScheduler(StepLR, CosineAnnealingLR)'s
            # recursive cosine): never served, and the restored engine refuses the same step.
            for again in (restored, shared):
                if again is not None:
                    with pytest.raises(ScheduleError) as refused:
                        again.advance(reports)
                    assert str(refused.value) == str(exc)
            return
        for again in (restored, shared):
            if again is not None:
                again.advance(reports)
                assert again.values() == original.values()


@PROPERTY
@given(
    data=st.data(),
    n_groups=st.integers(1, 3),
    losses=st.lists(st.one_of(st.none(), st.floats(0, 10)), min_size=SAFE_STEPS, max_size=SAFE_STEPS),
)
def test_a_checked_spec_steps_as_its_stored_form_and_its_pickle_do(data, n_groups, losses):
    """A created run's state is built from the RunSpec its create checked (pickled back from a
    worker process for a big one, its expressions' code with it); after a restart, from the
    stored form parsed again. Both give the same values, bit for bit, step by step."""
    base = [0.1 * (i + 1) for i in range(n_groups)]
    schedule = data.draw(valid_specs(n_groups))
    request = {"schedule": schedule, "base_lrs": base, "base_momentums": [0.9] * n_groups}
    checked = RunSpec.from_request(request)
    stored = RunSpec.from_stored(json.loads(json.dumps(checked.to_json())))  # as the database gives it back
    pickled = pickle.loads(pickle.dumps(checked))
    first = checked.new_engine()  # the create's first steps are taken on the spec the run keeps:
    for _ in range(3):  # an engine leaves nothing behind on it
        with contextlib.suppress(ScheduleError):
            first.advance()
    assert stored.to_json() == pickled.to_json() == checked.to_json()
    engines = [spec.new_engine() for spec in (checked, stored, pickled)]
    for k in range(1, SAFE_STEPS):
        metrics = ("val_loss", "val_acc", "train_loss")
        reports = {m: losses[k] for m in metrics} if losses[k] is not None else None
        outcomes = []
        for engine in engines:
            try:
                engine.advance(reports)
                outcomes.append(engine.values())
            except ScheduleError as exc:
                outcomes.append(str(exc))
        assert outcomes[1] == outcomes[0] and outcomes[2] == outcomes[0], k
        if isinstance(outcomes[0], str):
            return


def apply(engine, payload):
    """Apply a stored action (a ``control`` event's payload) as the replay does."""
    parse_action(payload).apply(engine)


def test_every_action_kind_has_one_model_and_the_request_fields_come_from_it():
    # ActionKind (the API's `action` values) and the Action union name the same kinds, in order;
    # the API's ActionSpec checks a request's fields against ARGUMENTS, read off the models.
    assert tuple(ARGUMENTS) == typing.get_args(ActionKind)
    assert ARGUMENTS["scale"] == ("factor",) and ARGUMENTS["replace_schedule"] == ("schedule",)
    assert ARGUMENTS["set_lr"] == ("lr", "lrs") and ARGUMENTS["stop"] == ()
