"""The spike guard in the engine: detector, backoff, snapshots, where a guard may sit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lrserve.service.engine.engine import Engine
from lrserve.service.engine.preview import simulate
from lrserve.service.engine.spec import parse_schedule, spec_to_json
from lrserve.service.engine.spike_guard import Detector, GuardSettings, Report, SpikeGuard
from lrserve.service.errors import SpecError

from tests.specs import plateau

INNER = {"type": "CosineAnnealingLR", "T_max": 300, "eta_min": 0.001}


def guarded(inner=INNER, **settings):
    return {"type": "SpikeGuard", "schedule": inner, **settings}


def report(step, value, rank=0, name="loss"):
    return {"step": step, "rank": rank, "name": name, "value": value}


def smooth(k):
    return 2.0 * math.exp(-k / 100) + 0.5 + 0.01 * math.sin(k * 1.7)


def test_defaults_are_the_documented_ones():
    spec = parse_schedule(guarded(), n_groups=1)
    assert GuardSettings.from_spec(spec) == GuardSettings()
    assert spec_to_json(spec)["threshold"] == 3.0 and spec_to_json(spec)["max_spikes"] == 5


def test_no_spike_is_bit_identical_to_the_inner_schedule():
    inner = Engine(parse_schedule(INNER, n_groups=2), [0.1, 0.025])
    guard = Engine(parse_schedule(guarded(), n_groups=2), [0.1, 0.025])
    for k in range(1, 400):
        inner.advance()
        guard.advance(None, [report(k, smooth(k))])
        assert guard.values() == inner.values()


def test_torch_reference_with_the_guard_and_no_spikes():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    spec = guarded({"type": "StepLR", "step_size": 7, "gamma": 0.5})
    engine = Engine(parse_schedule(spec, n_groups=1), [0.1])
    for k in range(1, 50):
        opt.step()
        ref.step()
        engine.advance(None, [report(k, 1.0)])
        assert engine.values()[0] == tuple(ref.get_last_lr())


def run(spec, losses, base=(1.0,)):
    """(values per step, spikes) with ``losses[k-1]`` reported on rank 0 with step k."""
    engine = Engine(parse_schedule(spec, n_groups=len(base)), list(base))
    values = [engine.values()[0]]
    spikes = []
    for k, loss in enumerate(losses, start=1):
        spikes += engine.advance(None, [report(k, loss)] if loss is not None else [])
        values.append(engine.values()[0])
    return values, spikes


def test_backoff_holds_then_ramps_back_while_the_inner_clock_runs():
    spec = guarded({"type": "ConstantLR", "factor": 1.0, "total_iters": 1}, hold=3, ramp=4)
    losses = [1.0 + 0.01 * (k % 3) for k in range(1, 31)] + [10.0] + [1.0] * 12
    values, spikes = run(spec, losses)
    assert [s.applied_at for s in spikes] == [31]
    assert [v[0] for v in values[30:40]] == [1.0, 0.5, 0.5, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0, 1.0]
    cosine = guarded(INNER, hold=3, ramp=4)
    inner_values, _ = run(INNER, [None] * 43)
    values, _ = run(cosine, losses)
    assert values[31][0] == inner_values[31][0] * 0.5  # the inner clock went on underneath
    assert values[40] == inner_values[40]


def test_nan_is_a_spike_even_during_warmup_and_names_the_last_good_step():
    values, spikes = run(guarded(), [1.0, 0.9, float("nan"), 0.8])
    (spike,) = spikes
    assert math.isnan(spike.value) and spike.step == 3 and spike.applied_at == 3
    assert spike.last_good_step == 2 and spike.baseline == 0.95
    inner, _ = run(INNER, [None] * 4)
    assert values[3][0] == inner[3][0] * 0.5 and values[2] == inner[2]


def test_deviations_count_only_after_warmup():
    losses = [1.0] * 19 + [50.0]  # the 20th report: only 19 in the baseline
    assert run(guarded(), losses)[1] == []
    losses = [1.0] * 20 + [50.0]
    assert [s.step for s in run(guarded(), losses)[1]] == [21]


def test_reports_measured_before_the_backoff_are_one_incident():
    losses = [1.0] * 30 + [20.0, float("nan"), 30.0]
    engine = Engine(parse_schedule(guarded(), n_groups=1), [1.0])
    for k, loss in enumerate(losses[:30], start=1):
        engine.advance(None, [report(k, loss)])
    # the spike and the bad reports after it arrive together, two steps later (placed at 33)
    engine.advance()
    engine.advance()
    spikes = engine.advance(None, [report(31, 20.0), report(32, float("nan"), rank=1), report(33, 30.0)])
    assert [(s.step, s.applied_at) for s in spikes] == [(31, 33)]
    assert spikes[0].last_good_step == 30
    later = engine.advance(None, [report(34, float("inf"))])  # measured after the backoff: counts
    assert [(s.step, s.count) for s in later] == [(34, 2)]


def test_a_resent_report_is_judged_once():
    engine = Engine(parse_schedule(guarded(), n_groups=1), [1.0])
    assert len(engine.advance(None, [report(1, float("nan"))])) == 1
    assert engine.advance(None, [report(1, float("nan"))]) == []


def test_max_spikes_exceeded_stops():
    losses = []
    for _ in range(3):
        losses += [1.0] * 25 + [float("nan")]
    values, spikes = run(guarded(max_spikes=2, hold=1, ramp=1), losses)
    assert [(s.count, s.stop) for s in spikes] == [(1, False), (2, False), (3, True)]


def test_snapshot_mid_backoff_continues_bit_for_bit():
    engine = Engine(parse_schedule(guarded(hold=5, ramp=5), n_groups=1), [1.0])
    for k in range(1, 31):
        engine.advance(None, [report(k, float("nan") if k == 25 else 1.0 + 0.001 * k)])
    copy = Engine.restore(engine.snapshot())
    for k in range(31, 60):
        reports = [report(k, 9.0 if k == 45 else 1.0)]
        assert engine.advance(None, reports) == copy.advance(None, reports)
        assert engine.values() == copy.values()
    assert engine.spikes == copy.spikes


def test_guard_around_plateau_and_as_a_range_tests_then():
    engine = Engine(parse_schedule(guarded(plateau()), n_groups=1), [1.0])
    engine.advance({"val_loss": 1.0}, [report(1, 1.0)])
    engine.advance({"val_loss": 2.0}, [report(2, float("nan"))])
    assert engine.values()[0] == (0.25,)  # plateau halved it, the guard halved that
    rt = {"type": "LRRangeTest", "min_lr": 1e-4, "max_lr": 1.0, "num_steps": 20,
          "then": guarded({"type": "StepLR", "step_size": 100})}
    engine = Engine(parse_schedule(rt, n_groups=1), [1.0])
    for k in range(1, 21):
        engine.advance({"loss": 2.0 - k * 0.05}, [report(k, 2.0 - k * 0.05)])
    assert engine.guard is not None
    before = engine.values()[0][0]
    engine.advance(None, [report(21, float("nan"))])
    assert engine.values()[0][0] == before * 0.5


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param({"type": "SequentialLR", "milestones": [5], "schedulers": [
            {"type": "LinearLR", "total_iters": 5}, guarded()]}, "schedule.schedulers.1", id="in-sequential"),
        pytest.param({"type": "ChainedScheduler", "schedulers": [guarded()]}, "schedule.schedulers.0",
                     id="in-chained"),
        pytest.param(guarded(guarded()), "schedule.schedule.type", id="nested"),
        pytest.param(guarded({"type": "StepLR"}), "schedule.schedule.step_size", id="bad-inner"),
        pytest.param(guarded(factor=0.0), "schedule.factor", id="factor-0"),
        pytest.param(guarded(warmup_reports=60), "schedule.warmup_reports", id="warmup-over-window"),
    ],
)
def test_refused_where_it_cannot_act(spec, field):
    with pytest.raises(SpecError) as info:
        parse_schedule(spec, n_groups=1)
    assert field in [e.field for e in info.value.errors], info.value.errors


def test_sequential_refusal_says_why():
    spec = {"type": "SequentialLR", "milestones": [5], "schedulers": [{"type": "LinearLR"}, guarded()]}
    with pytest.raises(SpecError) as info:
        parse_schedule(spec, n_groups=1)
    assert "put the SequentialLR" in info.value.errors[0].message


def test_preview_decides_as_the_engine_does():
    losses = [smooth(k) for k in range(1, 200)]
    losses[120] = float("nan")
    losses[150] *= 4
    spec = parse_schedule(guarded(), n_groups=1)
    first = simulate(spec, [0.1], None, 200, {"loss": losses})
    again = simulate(spec, [0.1], None, 200, {"loss": losses})
    assert first == again
    assert [(s.step, s.applied_at) for s in first.spikes] == [(121, 121), (151, 151)]
    values, spikes = run(guarded(), losses, base=(0.1,))
    assert [list(v) for v in values] == first.lrs
    assert spikes == first.spikes


def test_band_is_robust_to_the_outliers_it_flags():
    detector = Detector(GuardSettings(warmup_reports=5, window=10))
    for k, value in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 0.95], start=1):
        detector.judge(Report(k, 0, value))
    baseline, upper = detector.band(0)
    assert baseline == 1.0 and upper == pytest.approx(1.75)  # the relative floor: 0.25 * 1.0 * 3
    assert detector.judge(Report(7, 0, 1e6)).spike
    assert detector.band(0) == (baseline, upper)  # the spike did not join the baseline


def test_guard_snapshot_round_trips_as_json():
    from lrserve.service.engine import codec

    guard = SpikeGuard(GuardSettings())
    guard.observe([Report(1, 3, 1.0), Report(2, 3, float("nan"))], step=2)
    again = SpikeGuard.restore(codec.loads(codec.dumps(guard.snapshot())))
    assert again.snapshot() == guard.snapshot()


def test_last_good_step_is_good_on_every_rank_heard_from():
    """Rank 1's bad batch at 60 spoils the shared update: rank 0's report of 61 may come first."""
    engine = Engine(parse_schedule(guarded(), n_groups=1), [1.0])
    for k in range(1, 60):
        engine.advance(None, [report(k, 1.0, rank=0), report(k, 1.0, rank=1)])
    engine.advance(None, [report(60, 1.0, rank=0)])  # rank 1's report of 60 is still on its way
    (spike,) = engine.advance(None, [report(61, float("nan"), rank=0), report(60, float("nan"), rank=1)])
    assert (spike.step, spike.rank, spike.last_good_step) == (61, 0, 59)


def _band_sorted(detector: Detector, rank: int) -> tuple[float | None, float | None]:
    """``Detector.band`` as it was written first: each baseline sorted, and its deviations."""
    values = detector.baselines.get(rank, [])
    if not values:
        return None, None
    ordered = sorted(values)
    n, mid = len(ordered), len(ordered) // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    if n < detector.settings.warmup_reports:
        return median, None
    deviations = sorted(abs(v - median) for v in values)
    mad = deviations[mid] if n % 2 else (deviations[mid - 1] + deviations[mid]) / 2
    s = detector.settings
    scale = max(1.4826 * mad, s.rel_scale_floor * abs(median), s.min_delta)
    return median, median + s.threshold * scale


@settings(max_examples=300, deadline=None)
@given(window=st.integers(1, 40), warmup=st.integers(1, 45),
       values=st.lists(st.one_of(st.sampled_from([0.0, 1.0, 1.0, 2.5, -3.0, 1e300, math.nan]),
                                 st.floats(-1e6, 1e6)), min_size=1, max_size=160),
       ranks=st.integers(1, 3))
def test_the_band_kept_in_order_is_the_sorted_one_bit_for_bit(window, warmup, values, ranks):
    """The baseline kept in order (``_deviations_median``'s binary search of the deviations
    below and above the median) gives the very floats that sorting each baseline gave, at every
    report, ties, outliers and spikes (NaN) included; a detector restored from its snapshot too."""
    guard = SpikeGuard(GuardSettings(window=window, warmup_reports=warmup, rel_scale_floor=0.0))
    detector = guard.detector
    for i, value in enumerate(values):
        rank = i % ranks
        assert detector.band(rank) == _band_sorted(detector, rank)
        guard.observe([Report(i + 1, rank, value)], i + 2)
    restored = SpikeGuard.restore(guard.snapshot()).detector
    for rank in range(ranks):
        assert detector.band(rank) == restored.band(rank) == _band_sorted(detector, rank)


def test_a_long_window_judges_a_report_without_sorting_it(monkeypatch):
    """A window of 10,000 values: no report sorts its rank's baseline (each sort of it twice per
    report was ~2 ms here): the baseline is sorted once, when first needed, and kept in order."""
    from lrserve.service.engine import spike_guard

    sorts = []

    def counted(values, **how):
        sorts.append(len(values))
        return sorted(values, **how)

    monkeypatch.setattr(spike_guard, "sorted", counted, raising=False)  # found before the builtin
    detector = Detector(GuardSettings(window=10_000, warmup_reports=20))
    for step in range(1, 12_001):
        detector.judge(Report(step, 0, smooth(step)))
    assert sorts == [0]  # the rank's empty baseline, once
    assert detector.band(0) == _band_sorted(detector, 0)
    restored = SpikeGuard.restore({**SpikeGuard(detector.settings).snapshot(),
                                   "baselines": [[0, detector.baselines[0]]]}).detector
    assert restored.band(0) == detector.band(0) and sorts == [0, 10_000]  # made again from a snapshot
