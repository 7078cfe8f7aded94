"""``RemoteScheduler.report()`` in a hand-written loop, against a real server (uvicorn).

Frameworks step the scheduler, then evaluate; ``reports_after_step=True`` keeps a step
that may carry the watched metric open until ``report()`` (or the next
``optimizer.step()``), so the decision lands where ``step(val_loss)`` would have put it.
By default ``report()`` goes with the next ``step()``.
"""

from __future__ import annotations

import math
import subprocess
import sys

import httpx
import pytest
import torch
from lrserve.client import RemoteScheduler

from tests.client.plateau_frameworks import WARMUP_THEN_PLATEAU, record_lrs
from tests.live_server import ServerProcess
from tests.trainer.harness import warmup_plateau_reference

EPOCH = 5
STEPS = 40
# a validation loss that improves twice, then plateaus: the stage cuts the LR from epoch 4
VAL = {EPOCH * e: v for e, v in enumerate([1.0, 0.8, 0.6, 0.61, 0.62, 0.6, 0.63, 0.64], start=1)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-server")
    with ServerProcess(f"sqlite:///{tmp}/report.db", tmp) as proc:
        yield proc


def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.05, momentum=0.9)


def train(opt, each_step):
    """``opt.step()`` then ``each_step(k)`` for k = 1..STEPS; the LRs of steps 0..STEPS."""
    lrs = record_lrs(opt)
    for k in range(1, STEPS + 1):
        opt.zero_grad()
        opt.param_groups[0]["params"][0].sum().backward()
        opt.step()
        each_step(k)
    lrs.append(opt.param_groups[0]["lr"])
    return lrs


def history(server, run_id):
    return httpx.get(f"{server.url}/v1/runs/{run_id}/history", timeout=30).json()


@pytest.mark.parametrize("overlap", [False, True])
def test_report_after_step_decides_the_next_batch_as_step_with_the_metric(server, overlap):
    expected = warmup_plateau_reference(WARMUP_THEN_PLATEAU, 0.05, STEPS, VAL, {})
    assert len(set(expected[EPOCH * 4:])) >= 3

    opt = optimizer()
    run = f"after-overlap-{overlap}"
    with RemoteScheduler(opt, WARMUP_THEN_PLATEAU, run_id=f"with-step-{overlap}", url=server.url) as sched:
        along = train(opt, lambda k: sched.step(VAL.get(k)))
    assert along == expected

    opt = optimizer()
    with RemoteScheduler(opt, WARMUP_THEN_PLATEAU, run_id=run, url=server.url,
                         reports_after_step=True, overlap_decisions=overlap) as sched:

        def step_then_report(k):
            sched.step()
            if k in VAL:
                assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]  # the previous step's
                sched.report(val_loss=VAL[k])

        after = train(opt, step_then_report)
        # with overlap, param_groups show the last decision only when next needed
        assert sched.get_last_lr() == [expected[STEPS]]
    assert after[:STEPS] == expected[:STEPS]
    events = [e["step"] for e in history(server, run)["events"] if e["kind"] == "plateau_reduction"]
    assert events == [k for k in range(1, STEPS + 1) if expected[k] < expected[k - 1] and k in VAL]
    assert history(server, run)["metrics"]["val_loss"]["steps"] == sorted(VAL)


def test_report_before_step_goes_with_that_step(server):
    opt = optimizer()
    with RemoteScheduler(opt, WARMUP_THEN_PLATEAU, run_id="before", url=server.url) as sched:

        def report_then_step(k):
            if k in VAL:
                sched.report(val_loss=VAL[k], train_loss=0.5)  # the unwatched one is history
            sched.step()

        lrs = train(opt, report_then_step)
        sched.flush()
    assert lrs == warmup_plateau_reference(WARMUP_THEN_PLATEAU, 0.05, STEPS, VAL, {})
    metrics = history(server, "before")["metrics"]
    assert metrics["val_loss"]["steps"] == sorted(VAL)
    assert metrics["train_loss"]["steps"] == sorted(VAL)


def test_an_open_step_without_a_report_is_taken_by_the_next_optimizer_step(server):
    """No evaluation at some epoch: the hook takes the step's values, undecided."""
    skipped = {k: v for k, v in VAL.items() if k != EPOCH * 5}
    opt = optimizer()
    with RemoteScheduler(opt, WARMUP_THEN_PLATEAU, run_id="skip", url=server.url,
                         steps_per_epoch=EPOCH, reports_after_step=True) as sched:

        def step_then_report(k):
            sched.step()
            if k in skipped:
                sched.report(val_loss=skipped[k])

        lrs = train(opt, step_then_report)
        state = sched.state_dict()
    assert lrs == warmup_plateau_reference(WARMUP_THEN_PLATEAU, 0.05, STEPS, skipped, {})
    assert state["last_epoch"] == STEPS
    assert history(server, "skip")["metrics"]["val_loss"]["steps"] == sorted(skipped)


def test_report_refuses_what_is_not_a_number_and_stores_nothing(server):
    opt = optimizer()
    with RemoteScheduler(opt, WARMUP_THEN_PLATEAU, run_id="bad", url=server.url,
                         reports_after_step=True) as sched:
        for _ in range(EPOCH):
            opt.step()
            sched.step()
        with pytest.raises(TypeError, match="a metric must be a number, got str: 'low'"):
            sched.report(val_loss="low")
        sched.report(val_loss=math.nan)  # a diverged loss is data: NaN counts as no improvement
        opt.step()
        assert sched.last_epoch == EPOCH
    metrics = history(server, "bad")["metrics"]["val_loss"]
    assert metrics["steps"] == [EPOCH] and metrics["values"] == ["NaN"]


def test_integrations_import_their_framework_only_when_imported():
    code = """
import sys
sys.modules["transformers"] = None  # as if not installed
sys.modules["lightning"] = None
import lrserve.client, lrserve.client.integrations
for name in ("huggingface", "lightning"):
    try:
        __import__("lrserve.client.integrations." + name)
    except ImportError as exc:
        print(name, exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "huggingface client.integrations.huggingface needs transformers" in out
    assert "lightning client.integrations.lightning needs lightning" in out
