"""A real server killed with SIGKILL mid-training and restarted: the job never notices.

The job trains with ``RemoteScheduler`` (default settings) against ``python -m lrserve.service
serve``; at some step the server is killed (``kill -9``) and started again on the same
port and database while the loop goes on, once the job rides the provisional tail (the
final values it holds ran out: a fast cold start on an idle machine may take less time
than they cover).
The job must finish, every metric it logged must be in the history exactly once, and the
LR trajectory must be torch's own, step for step; a plateau report made while the server
is down waits for it, so its decision lands on its own step.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from lrserve.client import ClientState, RemoteScheduler, ServerAwayWarning

from tests.live_server import Restarter, ServerProcess
from tests.specs import plateau

pytestmark = pytest.mark.slow

STEPS = 3000
KILL_AT = 1200
SECONDS_PER_STEP = 0.002
SPEC = {"type": "CosineAnnealingLR", "T_max": STEPS, "eta_min": 0.001}


def torch_trajectory(steps, t_max=STEPS):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=0.001)
    out = [sched.get_last_lr()]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr())
    return out


@contextlib.contextmanager
def restartable_server(tmp_path, name):
    """A real server on its own SQLite file (``name``.db), with the ``Restarter`` that kills and
    restarts it on the same port; whichever is running at the end is stopped."""
    restarter = Restarter(ServerProcess(f"sqlite:///{tmp_path}/{name}.db", tmp_path).start())
    try:
        yield restarter
    finally:
        restarter.stop()


def test_kill_9_mid_training_changes_nothing(tmp_path):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with restartable_server(tmp_path, "outage") as restarter:
        with RemoteScheduler(opt, SPEC, run_id="outage", url=restarter.server.url) as sched:
            seen = [sched.get_last_lr()]
            with pytest.warns(ServerAwayWarning, match="provisional"):  # it rode the tail
                for k in range(1, STEPS + 1):
                    time.sleep(SECONDS_PER_STEP)
                    opt.step()
                    sched.log(train_loss=1.0 / k, lr=sched.get_last_lr()[0])
                    sched.step()
                    seen.append(sched.get_last_lr())
                    if k == KILL_AT:
                        restarter.kill()
                    if restarter.started and not restarter.restarting and sched.state is ClientState.AWAY:
                        restarter.restart()  # once the job rides the tail, however slow the training
            restarter.join()
        history = _history(restarter.server.url, "outage")
    assert restarter.downtime is not None and restarter.downtime > 1.5  # longer than a window covers
    assert seen == torch_trajectory(STEPS)
    metric = history["metrics"]["train_loss"]
    assert metric["steps"] == list(range(1, STEPS + 1))  # none lost, none doubled
    assert metric["values"] == [1.0 / k for k in range(1, STEPS + 1)]
    assert not [e for e in history["events"] if e["kind"] == "provisional_divergence"]


def test_a_step_past_the_tail_waits_for_the_restarted_server_and_every_value_is_torch_s(tmp_path):
    # Default settings. Killed right after it started, the job holds a short tail (its first
    # 1,024 steps at most); a loop with no sleep rides it out long before the restarted server
    # is ready (a cold start: seconds). Past the tail the step waits for the server
    # (report_wait_s, 60 s) instead of keeping its last LR: each rank of a job would keep its
    # own, at the step where its own tail ended (a two-rank job's ranks trained on different
    # LRs so, in CI).
    steps = 12_000
    spec = {"type": "CosineAnnealingLR", "T_max": steps, "eta_min": 0.001}
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with restartable_server(tmp_path, "past-tail") as restarter:
        with RemoteScheduler(opt, spec, run_id="past-tail", url=restarter.server.url) as sched:
            seen = [sched.get_last_lr()]
            restarter.kill_and_restart()
            with pytest.warns(ServerAwayWarning) as record:
                for _ in range(steps):
                    opt.step()
                    sched.step()
                    seen.append(sched.get_last_lr())
            restarter.join()
    messages = [str(w.message) for w in record]
    assert any("past the provisional values held" in m for m in messages), messages  # it waited
    assert not any("keeps the last learning rates" in m for m in messages), messages
    assert seen == torch_trajectory(steps, t_max=steps)


PLATEAU = plateau()
EPOCH = 20


def loss_at(k):
    return 1.0 + (k % 60 == 0)  # worse every third epoch: the LR halves there


def torch_plateau_trajectory(steps):
    """torch's ReduceLROnPlateau stepped with the metric at the end of each epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    out = [[0.1]]
    for k in range(1, steps + 1):
        opt.step()
        if k % EPOCH == 0:
            sched.step(loss_at(k))
        out.append([opt.param_groups[0]["lr"]])
    return out


def test_kill_9_during_a_plateau_schedule_loses_no_report_and_decides_on_its_step(tmp_path):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    reports = {}
    down_at_report = []
    steps = 1000
    with restartable_server(tmp_path, "plateau") as restarter:
        url = restarter.server.url
        with RemoteScheduler(opt, PLATEAU, run_id="p", url=url, steps_per_epoch=EPOCH) as sched:
            seen = [sched.get_last_lr()]
            with pytest.warns(ServerAwayWarning, match="waits"):  # a report waits for the server
                for k in range(1, steps + 1):
                    time.sleep(SECONDS_PER_STEP)
                    opt.step()
                    if k % EPOCH == 0:
                        reports[k] = loss_at(k)
                        if restarter.started and restarter.downtime is None:
                            down_at_report.append(k)
                        sched.step(reports[k])
                    else:
                        sched.step()
                    seen.append(sched.get_last_lr())
                    if k == 410:
                        restarter.kill_and_restart()
            restarter.join()
        history = _history(restarter.server.url, "p")
    assert down_at_report  # a report was made while the server was down
    assert seen == torch_plateau_trajectory(steps)
    metric = history["metrics"]["val_loss"]
    assert metric["steps"] == sorted(reports)
    assert metric["values"] == [reports[k] for k in sorted(reports)]
    assert not [e for e in history["events"] if e["kind"] == "provisional_divergence"]


def _history(url, run_id):
    import httpx

    with httpx.Client(base_url=url, timeout=30) as http:
        answer = http.get(f"/v1/runs/{run_id}/history", params={"max_points": 100_000})
        answer.raise_for_status()
        return answer.json()


def test_an_operator_action_in_normal_running_lands_within_one_window(tmp_path):
    import httpx

    with ServerProcess(f"sqlite:///{tmp_path}/action.db", tmp_path) as server:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with RemoteScheduler(opt, SPEC, run_id="act", url=server.url) as sched:  # defaults
            seen = {0: sched.get_last_lr()}
            placed = window_then = None
            for k in range(1, 2001):
                time.sleep(SECONDS_PER_STEP)
                opt.step()
                sched.step()
                seen[k] = sched.get_last_lr()
                if k == 800:
                    window_then = sched._cache.last_window  # steps of the latest window (~1 s of training)
                    answer = httpx.post(f"{server.url}/v1/runs/act/control",
                                        json={"action": "set_lr", "lr": 0.05}, timeout=30)
                    assert answer.status_code == 200, answer.text
                    placed = answer.json()["applied_at"]
    # the first free step: after the window the job holds, or the next one if it was on its way
    assert placed - 800 <= 2 * window_then + 1
    assert seen[placed] == [0.05]  # and the job took it there, at that very step
    expected = torch_trajectory(placed - 1)  # once: per step, it was ~820 trajectories (minutes when busy)
    assert all(seen[k] == expected[k] for k in range(placed))


def test_a_restart_while_an_operator_acts_through_another_replica_records_a_divergence(
    tmp_path, database_url
):
    import httpx

    db = database_url("postgres")
    a = ServerProcess(db, tmp_path).start()
    b = ServerProcess(db, tmp_path).start()
    restarter = Restarter(a)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    acted = None
    try:
        with RemoteScheduler(opt, SPEC, run_id="div", url=a.url) as sched:  # the job talks to A only
            seen = [sched.get_last_lr()]
            k = 0
            with pytest.warns(ServerAwayWarning, match="provisional"):
                # on until A is back and the job has talked to it (however slow the restart)
                while (k < KILL_AT + 100 or not restarter.back or sched.state is ClientState.AWAY
                       or sched._tail.ridden_from is not None):
                    k += 1
                    time.sleep(SECONDS_PER_STEP)
                    opt.step()
                    sched.step()
                    seen.append(sched.get_last_lr())
                    if k == KILL_AT:
                        restarter.kill()
                    if k == KILL_AT + 50:  # A is down: the operator acts through B
                        answer = httpx.post(f"{b.url}/v1/runs/div/control",
                                            json={"action": "scale", "factor": 0.5}, timeout=30)
                        assert answer.status_code == 200, answer.text
                        acted = answer.json()
                    if acted is not None and not restarter.restarting and k > acted["applied_at"]:
                        # A comes back once the job took the action's step without it: the action
                        # lands on the first free step, which is past the window A committed
                        # last, and that window's answer may have died with A (the job rides
                        # from before it); back sooner, the job diverged on nothing
                        restarter.restart()
                for _ in range(200):  # and on, on final values
                    k += 1
                    opt.step()
                    sched.step()
                    seen.append(sched.get_last_lr())
            restarter.join()
        history = _history(b.url, "div")
    finally:
        restarter.stop()
        b.stop()
    assert acted is not None and restarter.downtime > 1.5
    events = [e for e in history["events"] if e["kind"] == "provisional_divergence"]
    assert len(events) == 1, events
    divergence = events[0]
    assert divergence["rank"] == 0 and divergence["actor"] == "server"
    first, last = divergence["from_step"], divergence["to_step"]
    control = [e for e in history["events"] if e["kind"] == "control"]
    assert [e["step"] for e in control] == divergence["input_steps"]
    assert first <= control[0]["step"] <= last
    expected = torch_trajectory(STEPS)
    assert seen[:first] == expected[:first]  # final values before the outage's tail
    assert seen[first:control[0]["step"]] == expected[first:control[0]["step"]]  # tail = final there
    final = dict(zip(history["lrs"]["steps"], history["lrs"]["values"], strict=True))
    assert any(seen[k] != final[k] for k in range(control[0]["step"], last + 1))  # it did diverge
    # once the answer came (steps taken while it was on its way rode on), final values only
    back = next(k for k in range(last + 1, len(seen)) if seen[k] == final[k])
    wrong = [k for k in range(back, len(seen)) if seen[k] != final[k]]
    assert not wrong, (first, last, back, wrong[:5], [(seen[k], final[k]) for k in wrong[:5]])
    assert len(seen) - back >= 200


def test_two_replicas_behind_a_proxy_one_killed_the_job_fails_over_without_the_tail(
    tmp_path, database_url
):
    import warnings

    from tests.e2e.proxy import FailoverProxy

    db = database_url("postgres")
    a = ServerProcess(db, tmp_path).start()
    b = ServerProcess(db, tmp_path).start()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        with FailoverProxy([a.port, b.port]) as proxy, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with RemoteScheduler(opt, SPEC, run_id="fo", url=proxy.url) as sched:  # defaults
                seen = [sched.get_last_lr()]
                for k in range(1, STEPS + 1):
                    time.sleep(SECONDS_PER_STEP)
                    opt.step()
                    sched.log(train_loss=1.0 / k)
                    sched.step()
                    seen.append(sched.get_last_lr())
                    assert sched._tail.ridden_from is None, f"step {k} rode the tail"
                    if k == KILL_AT:
                        a.kill()  # the replica every connection went to
        history = _history(b.url, "fo")
    finally:
        a.stop()
        b.stop()
    assert not [w for w in caught if issubclass(w.category, ServerAwayWarning)]
    assert seen == torch_trajectory(STEPS)
    assert history["metrics"]["train_loss"]["steps"] == list(range(1, STEPS + 1))
    assert not [e for e in history["events"] if e["kind"] == "provisional_divergence"]
