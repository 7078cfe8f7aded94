"""``overlap_decisions=True``: ``step(metric)`` returns at once, the optimizer still gets the decision.

The report's round trip overlaps the next batch; a hook applies the decided values just
before the next ``optimizer.step()``. What must hold: the optimizer applies exactly the
values it would have (bit-identical weights against torch in process), the decision is
really made after ``step(metric)`` returned (a metric barrier proves it: the other rank has
not reported yet), every reader that promises current values waits for it, and an outage
while a decision is on its way ends as any outage does.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import warnings
import weakref

import pytest
import torch
from lrserve.client import ClientState, MetricsDroppedWarning, RemoteScheduler, ServerAwayWarning

from tests.client.conftest import PLATEAU
from tests.client.fake_server import Optimizer, expected_lrs
from tests.client.test_e2e_inprocess import (
    PLATEAU_SPEC,
    STEPS_PER_EPOCH,
    make_model,
    torch_plateau_spec_by_hand,
    train_with_plateau,
    weights,
)
from tests.live_server import ServerProcess
from tests.specs import plateau, warmup_then

BARRIER_PLATEAU = plateau()


def sgd(lr=0.1):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def record_used_lrs(opt):
    """The LRs each ``optimizer.step()`` ran with (read in a post-step hook)."""
    used = []
    opt.register_step_post_hook(lambda o, args, kwargs: used.append([g["lr"] for g in o.param_groups]))
    return used


def test_overlapped_decisions_give_bit_identical_weights(tmp_path):
    from lrserve.service import create_app
    from lrserve.service.settings import Settings
    from starlette.testclient import TestClient

    model, opt = make_model("sgd")
    local_used = record_used_lrs(opt)
    train_with_plateau(model, opt, torch_plateau_spec_by_hand(opt))
    local_weights = weights(model)
    assert len({tuple(lrs) for lrs in local_used[26:]}) > 2  # the plateau did lower the LRs

    model, opt = make_model("sgd")
    served_used = record_used_lrs(opt)
    with TestClient(create_app(Settings(db=f"sqlite:///{tmp_path}/t.db"))) as api, RemoteScheduler(
        opt, PLATEAU_SPEC, run_id="overlap", steps_per_epoch=STEPS_PER_EPOCH, http_client=api,
        overlap_decisions=True,
    ) as remote:
        train_with_plateau(model, opt, lambda k, metric: remote.step(metric))
    assert served_used == local_used
    assert all(torch.equal(a, b) for a, b in zip(weights(model), local_weights, strict=True))


@pytest.fixture
def server(tmp_path):
    proc = ServerProcess(f"sqlite:///{tmp_path}/barrier.db", tmp_path,
                         env={"LRSERVE_BARRIER_TIMEOUT_S": "20"}).start()
    yield proc
    proc.stop()


def test_step_with_metric_returns_before_the_other_ranks_reported(server):
    """Rank 0 overlaps; rank 1 waits (the default). Rank 0's step(metric) cannot have waited
    for the decision: it is made only when rank 1 reports, after rank 0's call returned."""
    opt0, opt1 = sgd(), sgd()
    common = {"run_id": "barrier", "url": server.url, "world_size": 2, "steps_per_epoch": 1}
    with RemoteScheduler(opt0, BARRIER_PLATEAU, rank=0, overlap_decisions=True, **common) as r0, \
            RemoteScheduler(opt1, BARRIER_PLATEAU, rank=1, **common) as r1:
        # epoch 1 sets the best (mean 1.0); epoch 2: rank 0 alone (2.0) would not improve
        # on it, the mean with rank 1 (0.5) does, so the LR stays only if rank 1 was counted
        previous = 0.1
        for metrics, lr in (((1.0, 1.0), 0.1), ((2.0, -1.0), 0.1), ((3.0, 3.0), 0.05)):
            r0.step(metrics[0])
            assert opt0.param_groups[0]["lr"] == previous  # not decided yet: written later
            r1.step(metrics[1])  # waits at the barrier until both reported
            assert opt1.param_groups[0]["lr"] == lr
            opt0.step()  # the hook takes the decision first
            assert opt0.param_groups[0]["lr"] == lr
            assert r0.get_last_lr() == r1.get_last_lr() == [lr]
            opt1.step()
            previous = lr


def test_readers_wait_for_the_decision(make_scheduler, fake):
    """get_last_lr(), state_dict(), optimizer.state_dict() and the next step() see it."""
    opt = sgd()
    sched = make_scheduler(opt, PLATEAU, run_id="p", steps_per_epoch=1, overlap_decisions=True)
    sched.step(1.0)
    sched.step(2.0)  # not a new best: divided by 10 at step 2
    assert sched.get_last_lr() == expected_lrs([0.1], 2, {1: 1.0, 2: 2.0})[2]
    sched.step(3.0)
    assert sched.state_dict()["_last_lr"] == expected_lrs([0.1], 3, {1: 1.0, 2: 2.0, 3: 3.0})[3]
    sched.step(4.0)
    reports = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert opt.state_dict()["param_groups"][0]["lr"] == expected_lrs([0.1], 4, reports)[4][0]
    sched.step(5.0)
    sched.step(6.0)  # the step before was decided on the way in
    reports.update({5: 5.0, 6: 6.0})
    assert 5 in fake.runs["p"].reports  # step 6 may still be on its way
    opt.step()
    assert opt.param_groups[0]["lr"] == expected_lrs([0.1], 6, reports)[6][0]


def test_no_overlap_without_a_torch_optimizer_or_when_strict(make_scheduler):
    """Where no hook can apply the decision later, step(metric) writes it before returning."""
    plain = Optimizer({"lr": 0.1})
    sched = make_scheduler(plain, PLATEAU, steps_per_epoch=1, overlap_decisions=True)
    sched.step(1.0)
    sched.step(2.0)
    assert plain.param_groups[0]["lr"] == expected_lrs([0.1], 2, {1: 1.0, 2: 2.0})[2][0]
    opt = sgd()
    strict = make_scheduler(opt, PLATEAU, steps_per_epoch=1, overlap_decisions=True, strict=True)
    strict.step(1.0)
    strict.step(2.0)
    assert opt.param_groups[0]["lr"] == expected_lrs([0.1], 2, {1: 1.0, 2: 2.0})[2][0]


def _to_step_15_with_the_server_down(make_scheduler, fake, **kwargs):
    opt = sgd()
    sched = make_scheduler(opt, PLATEAU, run_id="p", steps_per_epoch=5, overlap_decisions=True,
                           max_retries=1, **kwargs)
    reports = {}
    for k in range(1, 11):
        sched.step(1.0 / k if k % 5 == 0 else None)
        if k % 5 == 0:
            reports[k] = 1.0 / k
        opt.step()
    for _ in range(4):
        sched.step()
        opt.step()
    fake.down = True
    sched.step(0.5)  # step 15: returns; the worker tries to post it
    reports[15] = 0.5
    # the worker's tries past max_retries: the scheduler counts the server away from then on
    # (were it back before, the hand-off would just succeed: no outage for the hook to meet)
    deadline = time.monotonic() + 10.0
    while sched._fetcher.failures <= 1:
        assert time.monotonic() < deadline, sched._fetcher.failures
        time.sleep(0.01)
    return opt, sched, reports


def test_outage_with_a_decision_on_its_way_waits_for_it_as_without_overlap(make_scheduler, fake):
    # report_wait_s at its default (60 s): the decision lands on its own step, as when the
    # report waited in step() (it held the last values instead, without waiting)
    opt, sched, reports = _to_step_15_with_the_server_down(make_scheduler, fake)
    threading.Timer(0.5, lambda: setattr(fake, "down", False)).start()
    with pytest.warns(ServerAwayWarning, match=r"step 15 carries \['val_loss'\].* waits") as record:
        opt.step()  # the pre-step hook waits for the decision
    assert len(record) == 1
    assert fake.runs["p"].reports[15] == {"val_loss": 0.5}
    assert [opt.param_groups[0]["lr"]] == expected_lrs([0.1], 15, reports)[15]
    assert sched.state is ClientState.ACTIVE


def test_outage_past_report_wait_s_holds_then_delivers_the_decision(make_scheduler, fake):
    opt, sched, reports = _to_step_15_with_the_server_down(make_scheduler, fake, report_wait_s=0.2)
    held = opt.param_groups[0]["lr"]
    with pytest.warns(ServerAwayWarning):
        opt.step()  # the decision cannot come within report_wait_s: the last values are held
    assert opt.param_groups[0]["lr"] == held
    fake.down = False
    deadline = time.monotonic() + 10.0
    while 15 not in fake.runs["p"].reports and time.monotonic() < deadline:
        sched.step()
        opt.step()
        time.sleep(0.01)
    assert fake.runs["p"].reports[15] == {"val_loss": 0.5}
    assert fake.runs["p"].values[15] == expected_lrs([0.1], 15, reports)[15]


def test_a_wrapped_optimizer_gets_the_decision_through_the_one_it_wraps(make_scheduler):
    """accelerate's optimizer wraps torch's and shares its param_groups: the hook goes inside."""
    import accelerate
    opt = accelerate.Accelerator(cpu=True).prepare(sgd())
    used = record_used_lrs(opt.optimizer)
    sched = make_scheduler(opt, PLATEAU, steps_per_epoch=1, overlap_decisions=True)
    assert sched._overlap  # hooked, not falling back to waiting in step(metric)
    for metric in (1.0, 2.0, 3.0):
        sched.step(metric)
        opt.step()
    assert used == [expected_lrs([0.1], 3, {1: 1.0, 2: 2.0, 3: 3.0})[k] for k in (1, 2, 3)]


def _until(condition, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.001)


def test_the_fetch_thread_takes_the_answer_in_and_the_hook_writes_it(server):
    """The decision's answer is taken into the scheduler's state on the fetch thread, while the
    job trains (the training thread is not in the scheduler): the values of the reported step
    are held before the optimizer steps, and written into ``param_groups`` only by its hook."""
    opt = sgd()
    with RemoteScheduler(opt, plateau(), run_id="handed", url=server.url, steps_per_epoch=1,
                         overlap_decisions=True) as sched:
        previous = 0.1
        for k, metric in enumerate((1.0, 2.0, 3.0, 0.5), start=1):
            sched.step(metric)
            _until(lambda k=k: sched._cache.holds(k), f"the fetch thread took step {k}'s answer in")
            assert opt.param_groups[0]["lr"] == previous  # not written: that is the hook's
            opt.step()
            previous = opt.param_groups[0]["lr"]
            assert sched.get_last_lr() == [previous]
        assert previous == 0.025  # 2.0 and 3.0 did not improve on 1.0: halved twice


def test_many_handed_off_decisions_leave_what_waiting_leaves(server):
    """Many reports handed to the fetch thread, its answers coming while the training thread
    waits for them in the hook and while it is elsewhere, with windows fetched between the
    reports: every value the optimizer applies, what the readers say and the checkpoint are
    a waiting scheduler's on the same metrics."""
    spec = warmup_then(plateau(patience=1), steps=6)
    per_epoch, epochs = 4, 40
    metrics = {per_epoch * e: 1.0 / (1 + e % 7) for e in range(1, epochs + 1)}
    seen = {}
    for mode, overlap in (("waits", False), ("overlap", True)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        used = record_used_lrs(opt)
        readers = []
        with RemoteScheduler(opt, spec, run_id=f"many-{mode}", url=server.url, steps_per_epoch=per_epoch,
                             overlap_decisions=overlap) as sched:
            assert sched._overlap is overlap
            for k in range(1, per_epoch * epochs + 1):
                sched.step(metrics.get(k))
                if overlap and k in metrics and k % 8 == 0:  # the answer comes while it trains
                    _until(sched._fetcher.done, f"step {k}'s answer")
                opt.step()
                readers.append((sched.get_last_lr(), sched.status, sched.watched, sched.should_stop))
            state = {key: value for key, value in sched.state_dict().items() if key not in ("run_id", "url")}
        seen[mode] = used, readers, state
    assert len({tuple(lrs) for lrs in seen["waits"][0]}) > 3  # warm-up, then the plateau halved it
    assert seen["overlap"] == seen["waits"]


def test_a_scheduler_dropped_while_the_fetch_thread_takes_its_answer_in_is_released(server, monkeypatch):
    """The job drops its last reference while the fetch thread takes a handed-off answer in:
    the finalizer then runs on the fetch thread, and must still release everything (the metrics
    flushed, the client closed, no error reported) without joining the thread it runs on."""
    taking_in, dropped = threading.Event(), threading.Event()
    accept = RemoteScheduler._accept_handed

    def gated(self, answer):
        taking_in.set()
        dropped.wait()
        return accept(self, answer)

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    gc.disable()  # the scheduler goes with its last reference, on the thread that drops it
    try:
        opt = sgd()
        sched = RemoteScheduler(opt, plateau(), run_id="dropped-handed", url=server.url, steps_per_epoch=1,
                                overlap_decisions=True)
        sched.log(train_loss=1.0)
        gone = weakref.ref(sched)
        fetcher, metrics, client = sched._fetcher, sched._metrics, sched._client
        monkeypatch.setattr(RemoteScheduler, "_accept_handed", gated)
        sched.step(1.0)  # handed off: the fetch thread posts it and takes the answer in
        assert taking_in.wait(30)
        del sched, opt
        assert gone() is not None  # the fetch thread holds it
        dropped.set()
        fetcher._thread.join(30)
        assert not fetcher._thread.is_alive()
        assert gone() is None  # collected on the fetch thread, when it let go of it
    finally:
        gc.enable()
    for thread in threading.enumerate():
        if thread.name == "lrserve-release":
            thread.join(30)
    assert [u.exc_value for u in unraisable] == []
    assert len(metrics.buffer) == 0 and not metrics.buffer._thread.is_alive()  # flushed, stopped
    assert client.is_closed


def test_close_timing_out_while_a_report_is_posted_keeps_it(server, monkeypatch):
    """close() whose wait for the fetch thread times out while a handed-off report's POST is
    held (a metric barrier): the thread takes the report out of ``pending`` when the answer
    comes, while close() is recording the undelivered reports; close() must not fail."""
    opt0, opt1 = sgd(), sgd()
    common = {"run_id": "close-in-flight", "url": server.url, "world_size": 2, "steps_per_epoch": 1}
    r0 = RemoteScheduler(opt0, BARRIER_PLATEAU, rank=0, overlap_decisions=True, **common)
    with RemoteScheduler(opt1, BARRIER_PLATEAU, rank=1, **common) as r1:
        r0.step(1.0)  # handed off: its POST waits at the barrier for rank 1
        fetcher = r0._fetcher
        add, recorded = r0._metrics.add, []

        def answered_meanwhile(step, report):
            r1.step(1.0)  # the barrier opens: rank 0's POST is answered ...
            fetcher._thread.join(30)  # ... and its thread has taken the report out of pending
            recorded.append((step, report))
            add(step, report)

        monkeypatch.setattr(r0._metrics, "add", answered_meanwhile)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricsDroppedWarning)  # close(0) gives metrics no time
            r0.close(timeout=0)
    assert not fetcher._thread.is_alive()
    assert recorded == [(1, {"val_loss": 1.0})]  # undelivered when close() looked: kept for history
    assert r0._client.is_closed
