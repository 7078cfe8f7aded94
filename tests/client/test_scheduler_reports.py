"""Watched metrics: reports land on their own step, windows stop before them, cadence is learned."""

from __future__ import annotations

import math

import pytest
from lrserve.client import CadenceWarning

from tests.client.conftest import PLATEAU, STEP_LR
from tests.client.fake_server import Optimizer, expected_lrs
from tests.specs import plateau_max_acc, warmup_then

WARMUP_PLATEAU = warmup_then(PLATEAU, steps=10)


def losses(n):
    """A loss that improves, stalls, improves: the plateau fires on the stalls."""
    return [1.0 / (1 + k) if k % 3 else 2.0 for k in range(n)]


def train(sched, clock, epochs, steps_per_epoch, seconds_per_step=0.001):
    """Plain steps, and the epoch's last step carries val_loss; returns the reports made."""
    reports = {}
    values = losses(epochs)
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            clock.advance(seconds_per_step)
            if i == steps_per_epoch - 1:
                sched.step(values[epoch])
                reports[sched.last_epoch] = values[epoch]
            else:
                sched.step()
            assert sched.get_last_lr() == expected_lrs(sched.base_lrs, sched.last_epoch, reports)[-1]
    return reports


def windows(fake):
    """(first, last) steps of every window handed out, from the requests that asked for them."""
    out = []
    for method, _, params, body in fake.requests:
        if method == "GET" and "step" in params:
            out.append((int(params["step"]), int(params["step"]) + int(params["ahead"])))
        elif method == "POST" and body and "ahead" in body:
            out.append((body["step"], body["step"] + body["ahead"]))
    return out


def test_reports_land_on_their_step_with_steps_per_epoch(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=WARMUP_PLATEAU, run_id="p", steps_per_epoch=25)
    reports = train(sched, clock, epochs=12, steps_per_epoch=25)
    assert fake.runs["p"].reports == {k: {"val_loss": v} for k, v in reports.items()}
    for first, last in windows(fake):  # no window runs past a report step it does not start at
        assert all(k not in reports for k in range(first + 1, last + 1)), (first, last)


def test_report_is_one_request_and_other_steps_do_none(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=PLATEAU, run_id="p", steps_per_epoch=100, time_budget_s=10.0)
    train(sched, clock, epochs=10, steps_per_epoch=100)
    posts = [body for m, p, _, body in fake.requests if m == "POST" and p.endswith("/step")]
    gets = fake.paths("GET")
    assert [b["step"] for b in posts] == [100 * e for e in range(1, 11)]
    assert all(b["metrics"].keys() == {"val_loss"} and b["rank"] == 0 for b in posts)
    assert len(gets) <= 20  # about one prefetch per epoch


def test_cadence_is_learned_from_the_first_epoch(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=PLATEAU, run_id="p")
    reports = train(sched, clock, epochs=8, steps_per_epoch=20)
    assert fake.runs["p"].reports == {k: {"val_loss": v} for k, v in reports.items()}
    first_epoch = [w for w in windows(fake) if w[0] < 20]
    assert all(first == last for first, last in first_epoch)  # one step at a time until known
    later = [w for w in windows(fake) if w[0] > 20]
    assert len(later) < 8 * 20 / 4  # then windows again


def test_bare_number_goes_to_the_watched_metric(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=plateau_max_acc(), steps_per_epoch=1)
    sched.step(0.5)
    assert fake.requests[-1][3]["metrics"] == {"val_acc": 0.5}


def test_keyword_metrics_as_torch_names_them(make_scheduler, fake):
    sched = make_scheduler(schedule=PLATEAU, steps_per_epoch=1)
    sched.step(metrics=0.7)
    assert fake.requests[-1][3]["metrics"] == {"val_loss": 0.7}


def test_unwatched_metrics_go_to_history(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=PLATEAU, run_id="p", steps_per_epoch=1)
    sched.step(metrics={"val_loss": 0.7, "val_acc": 0.8})
    assert fake.requests[-1][3]["metrics"] == {"val_loss": 0.7}
    assert sched.flush()
    assert fake.runs["p"].metrics[("val_acc", 1, 0)] == 0.8


def test_bare_number_on_a_schedule_built_without_a_metric_is_torchs_epoch_refused(make_scheduler, fake):
    sched = make_scheduler(run_id="t")  # StepLR watches nothing: torch reads step(0.25) as epoch 0.25
    with pytest.raises(TypeError, match=r"step\(0\.25\).*deprecated step\(epoch\)"):
        sched.step(0.25)
    assert sched.last_epoch == 0 and not fake.runs["t"].metrics


def test_bare_number_after_the_schedule_stopped_watching_it_is_history(make_scheduler, fake):
    sched = make_scheduler(schedule=PLATEAU, run_id="t", steps_per_epoch=1)
    fake.runs["t"].body["schedule"] = STEP_LR  # an operator replaced it: the job still passes val_loss
    sched.step()  # the answer says the run watches nothing now
    assert sched.watched == frozenset()
    sched.step(0.25)
    assert not [p for p in fake.paths("POST") if p.endswith("/step")]
    assert sched.flush()
    assert fake.runs["t"].metrics == {("val_loss", 2, 0): 0.25}


def test_bare_number_with_two_watched_metrics_is_refused(make_scheduler):
    schedule = {
        "type": "ChainedScheduler",
        "schedulers": [PLATEAU, {"type": "ReduceLROnPlateau", "monitor": "val_acc"}],
    }
    sched = make_scheduler(schedule=schedule)
    with pytest.raises(TypeError, match="metrics="):
        sched.step(0.5)


def test_non_finite_watched_metric_is_reported_as_torch_would_take_it(make_scheduler, fake):
    sched = make_scheduler(schedule=PLATEAU, steps_per_epoch=1)
    sched.step(float("nan"))  # a diverged loss: torch's plateau counts it as no improvement
    assert math.isnan(fake.requests[-1][3]["metrics"]["val_loss"])


def test_report_for_an_already_fetched_step_warns_and_goes_to_history(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=PLATEAU, run_id="p", steps_per_epoch=50)
    for _ in range(6):
        clock.advance(0.001)
        sched.step()
    sched._collect(wait=True)  # let the prefetch land: steps up to 49 are now final
    with pytest.warns(CadenceWarning, match="steps_per_epoch"):
        sched.step(0.3)  # step 7: not where this job said it reports
    assert 7 not in fake.runs["p"].reports
    assert sched.flush()
    assert fake.runs["p"].metrics[("val_loss", 7, 0)] == 0.3


def test_log_files_metrics_under_the_next_step(make_scheduler, fake, clock):
    sched = make_scheduler(run_id="m")
    for k in range(5):
        sched.log(train_loss=float(k), lr=sched.get_last_lr()[0])
        sched.step()
    sched.log({"val_loss": 0.5}, step=100)
    assert sched.flush()
    stored = fake.runs["m"].metrics
    assert [stored[("train_loss", k, 0)] for k in range(1, 6)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert stored[("val_loss", 100, 0)] == 0.5


def test_log_relogging_a_key_keeps_the_last_value(make_scheduler, fake):
    sched = make_scheduler(run_id="m", flush_interval_s=60.0)
    sched.log(loss=1.0)
    sched.log(loss=2.0)
    assert sched.flush()
    assert fake.runs["m"].metrics == {("loss", 1, 0): 2.0}


def test_log_uses_the_rank(make_scheduler, fake):
    sched = make_scheduler(run_id="m", rank=2)
    sched.log(loss=1.0)
    assert sched.flush()
    assert ("loss", 1, 2) in fake.runs["m"].metrics


def test_log_batches_records(make_scheduler, fake):
    sched = make_scheduler(run_id="m", flush_interval_s=60.0)
    for k in range(2500):
        sched.log(step=k, loss=float(k))
    assert sched.flush()
    assert len(fake.runs["m"].metrics) == 2500
    assert fake.runs["m"].metric_posts <= 4  # batches of up to 1000


def test_non_finite_logged_values_are_kept(make_scheduler, fake):
    sched = make_scheduler(run_id="m")
    sched.log(loss=float("inf"), acc=0.5)
    assert sched.flush()
    assert fake.runs["m"].metrics == {("acc", 1, 0): 0.5, ("loss", 1, 0): float("inf")}


def test_metrics_from_tensors_and_numpy(make_scheduler, fake):
    import torch
    sched = make_scheduler(run_id="m", schedule=PLATEAU, steps_per_epoch=1)
    sched.log(loss=torch.tensor(0.5))
    sched.step(torch.tensor(0.25, dtype=torch.float64))
    assert fake.requests[-1][3]["metrics"] == {"val_loss": 0.25}
    assert sched.flush()
    assert fake.runs["m"].metrics[("loss", 1, 0)] == 0.5


def test_non_number_metric_is_a_type_error(make_scheduler):
    sched = make_scheduler()
    with pytest.raises(TypeError, match="number"):
        sched.log(loss="high")


def test_state_dict_keeps_the_learned_cadence(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=PLATEAU, run_id="p")
    train(sched, clock, epochs=2, steps_per_epoch=10)
    state = sched.state_dict()
    assert state["cadence"]["period"] == 10
    sched.close()
    resumed = make_scheduler(schedule=PLATEAU, run_id="p")
    resumed.load_state_dict(state)
    before = len(fake.requests)
    for _ in range(9):
        clock.advance(0.001)
        resumed.step()
    resumed._collect(wait=True)
    assert len(fake.requests) - before <= 3  # windows at once, no step-by-step relearning


@pytest.mark.parametrize("optimizer_groups", [1, 3])
def test_plateau_parity_across_param_groups(make_scheduler, fake, clock, optimizer_groups):
    opt = Optimizer(*[{"lr": 0.1} for _ in range(optimizer_groups)])
    sched = make_scheduler(opt, schedule=PLATEAU, run_id="p", steps_per_epoch=7)
    train(sched, clock, epochs=3, steps_per_epoch=7)
    assert len(sched.get_last_lr()) == optimizer_groups
