"""``LRSERVE_MODE=disabled``: ``RemoteScheduler`` is torch's own scheduler of the same spec, no server."""

from __future__ import annotations

import pytest
import torch
from lrserve.client import RemoteScheduler
from lrserve.client._disabled import LocalScheduler

from tests.specs import plateau

NOWHERE = "http://127.0.0.1:9"  # nothing listens: any request would fail


def _sgd(lrs=(0.1, 0.01)):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)]
    return torch.optim.SGD(groups, momentum=0.9)


@pytest.mark.parametrize("spec", [
    {"type": "StepLR", "step_size": 3, "gamma": 0.5},
    {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 20},
    {"type": "SequentialLR", "milestones": [5], "schedulers": [
        {"type": "LinearLR", "start_factor": 0.1, "total_iters": 5},
        {"type": "CosineAnnealingLR", "T_max": 15}]},
], ids=lambda s: s["type"])
def test_values_are_torchs_and_no_server_is_asked(monkeypatch, spec):
    monkeypatch.setenv("LRSERVE_MODE", "disabled")
    monkeypatch.setenv("LRSERVE_RUN_ID", "unit-test")
    ours_opt, torch_opt = _sgd(), _sgd()
    ours = RemoteScheduler(ours_opt, spec, url=NOWHERE)
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if spec["type"] == "SequentialLR":
        kwargs["schedulers"] = [getattr(torch.optim.lr_scheduler, c["type"])(
            torch_opt, **{k: v for k, v in c.items() if k != "type"}) for c in spec["schedulers"]]
    theirs = getattr(torch.optim.lr_scheduler, spec["type"])(torch_opt, **kwargs)
    assert isinstance(ours, LocalScheduler) and ours.run_id == "unit-test"
    for _ in range(19):
        assert ours.get_last_lr() == theirs.get_last_lr()
        for key in ("lr", "momentum"):
            assert [g[key] for g in ours_opt.param_groups] == [g[key] for g in torch_opt.param_groups]
        ours_opt.step(), torch_opt.step()
        ours.step(), theirs.step()
    assert ours.should_stop is False and ours.status == "active" and ours.last_epoch == 19


def test_plateau_takes_its_metric_by_number_by_name_and_by_report(monkeypatch):
    monkeypatch.setenv("LRSERVE_MODE", "disabled")
    opt = _sgd((0.1,))
    with RemoteScheduler(opt, plateau(monitor="loss"),
                         url=NOWHERE) as sched:
        assert sched.watched == frozenset({"loss"})
        sched.step(1.0)
        sched.step({"loss": 2.0})  # worse: halved
        assert sched.get_last_lr() == [0.05]
        sched.step()  # no report: a plateau counts reports, not steps
        sched.report(loss=3.0)
        sched.step()
        assert sched.get_last_lr() == [0.025]
        state = sched.state_dict()
    again = RemoteScheduler(_sgd((0.1,)), {"type": "ReduceLROnPlateau", "monitor": "loss"}, url=NOWHERE)
    again.load_state_dict(state)
    assert again.last_epoch == 4


@pytest.mark.parametrize(("spec", "words"), [
    ({"type": "LRRangeTest", "min_lr": 1e-5, "max_lr": 1.0}, "needs a server"),
    ({"type": "SpikeGuard", "schedule": {"type": "StepLR", "step_size": 2}}, "decides on a server"),
    ({"type": "LambdaLR", "lr_lambda": "0.9 ** step"}, "lrserve expression"),
    ({"type": "SequentialLR", "milestones": [2], "schedulers": [
        {"type": "LinearLR", "total_iters": 2}, {"type": "ReduceLROnPlateau"}]}, "inside a composite"),
    ({"type": "NoSuchLR"}, "unknown schedule type"),
], ids=lambda x: x["type"] if isinstance(x, dict) else "")
def test_what_needs_a_server_is_refused_saying_so(monkeypatch, spec, words):
    monkeypatch.setenv("LRSERVE_MODE", "disabled")
    with pytest.raises(ValueError, match=words):
        RemoteScheduler(_sgd((0.1,)), spec, url=NOWHERE)


def test_an_unknown_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("LRSERVE_MODE", "offline")
    with pytest.raises(ValueError, match="LRSERVE_MODE must be one of remote, disabled"):
        RemoteScheduler(_sgd((0.1,)), {"type": "StepLR", "step_size": 2}, url=NOWHERE)


def test_it_is_a_torch_scheduler_and_the_framework_callbacks_find_it(monkeypatch):
    from lrserve.client.integrations._common import remote_scheduler

    monkeypatch.setenv("LRSERVE_MODE", "disabled")
    opt = _sgd((0.1,))
    sched = RemoteScheduler(opt, plateau(), url=NOWHERE)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert remote_scheduler(sched) is sched

    class Wrapped:  # as accelerate wraps a scheduler
        scheduler = sched

    assert remote_scheduler(Wrapped()) is sched
    sched.reports_after_step = True  # what the callbacks set: the report decides at once
    sched.step()
    sched.report(val_loss=1.0)
    sched.step()
    sched.report(val_loss=2.0)
    assert sched.get_last_lr() == [0.05] and [g["lr"] for g in opt.param_groups] == [0.05]
