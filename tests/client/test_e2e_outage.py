"""A real server killed with SIGKILL mid-training and restarted: the job never notices.

The job trains with ``RemoteScheduler`` against ``python -m service serve``; at some step
the server is killed (``kill -9``) and started again on the same port and database while
the loop goes on. The job must finish, every metric it logged must be in the history
exactly once, and the LR trajectory must be torch's own, step for step.
"""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("service.app", reason="the server is not importable")

from client import RemoteScheduler, ServerAwayWarning  # noqa: E402
from tests.live_server import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 3000
KILL_AT = 1200
SECONDS_PER_STEP = 0.002
SPEC = {"type": "CosineAnnealingLR", "T_max": STEPS, "eta_min": 0.001}


def torch_trajectory(steps):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=0.001)
    out = [sched.get_last_lr()]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr())
    return out


def held_ahead(sched):
    return sched._base + len(sched._lrs) - 1 - sched.last_epoch


class Restarter:
    """Kills the server and starts it again in a thread, while the training loop goes on."""

    def __init__(self, server):
        self.server = server
        self.thread = None
        self.error = None
        self.downtime = None

    def kill_and_restart(self):
        self.server.kill()
        killed_at = time.monotonic()

        def restart():
            try:
                self.server = ServerProcess(
                    self.server.db_url, self.server.log_path.parent, port=self.server.port
                )
                self.server.start()
                self.downtime = time.monotonic() - killed_at
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.error = exc

        self.thread = threading.Thread(target=restart, name="test-restart")
        self.thread.start()

    def join(self):
        if self.thread is not None:
            self.thread.join(120)
        if self.error is not None:
            raise self.error


def test_kill_9_mid_training_changes_nothing(tmp_path):
    server = ServerProcess(f"sqlite:///{tmp_path}/outage.db", tmp_path).start()
    restarter = Restarter(server)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        with RemoteScheduler(opt, SPEC, run_id="outage", url=server.url, time_budget_s=20.0) as sched:
            seen = [sched.get_last_lr()]
            for k in range(1, STEPS + 1):
                time.sleep(SECONDS_PER_STEP)
                opt.step()
                sched.log(train_loss=1.0 / k, lr=sched.get_last_lr()[0])
                sched.step()
                seen.append(sched.get_last_lr())
                if k == KILL_AT:
                    assert held_ahead(sched) >= 1500, "the test needs values held past the outage"
                    restarter.kill_and_restart()
            restarter.join()
        history = _history(restarter.server.url, "outage")
    finally:
        restarter.join()
        restarter.server.stop()
    assert restarter.downtime is not None and restarter.downtime > 0.5  # a real outage
    assert seen == torch_trajectory(STEPS)
    metric = history["metrics"]["train_loss"]
    assert metric["steps"] == list(range(1, STEPS + 1))  # none lost, none doubled
    assert metric["values"] == [1.0 / k for k in range(1, STEPS + 1)]


PLATEAU = {
    "type": "SequentialLR",
    "milestones": [50],
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.1, "total_iters": 50},
        {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0},
    ],
}


def test_kill_9_during_a_plateau_schedule_loses_no_report(tmp_path):
    server = ServerProcess(f"sqlite:///{tmp_path}/plateau.db", tmp_path).start()
    restarter = Restarter(server)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    reports = {}
    back_at = 0
    try:
        with RemoteScheduler(opt, PLATEAU, run_id="p", url=server.url, steps_per_epoch=20) as sched:
            with pytest.warns(ServerAwayWarning):  # a report cannot be committed while it is down
                for k in range(1, 1001):
                    time.sleep(SECONDS_PER_STEP)
                    opt.step()
                    if k % 20 == 0:
                        reports[k] = 1.0 + (k % 60 == 0)
                        sched.step(reports[k])
                    else:
                        sched.step()
                    if k == 400:
                        restarter.kill_and_restart()
                    if k > 400 and restarter.downtime is None:
                        time.sleep(0.01)  # make sure some reports fall inside the outage
                        back_at = k + 1
            restarter.join()
        history = _history(restarter.server.url, "p")
    finally:
        restarter.join()
        restarter.server.stop()
    assert len([k for k in reports if 400 < k <= back_at]) >= 3  # reports made while it was down
    metric = history["metrics"]["val_loss"]
    assert metric["steps"] == sorted(reports)
    assert metric["values"] == [reports[k] for k in sorted(reports)]


def _history(url, run_id):
    import httpx

    with httpx.Client(base_url=url, timeout=30) as http:
        answer = http.get(f"/v1/runs/{run_id}/history", params={"max_points": 100_000})
        answer.raise_for_status()
        return answer.json()
