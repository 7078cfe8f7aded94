"""An operator's stop reaches every rank at the same step, however far each has fetched."""

from __future__ import annotations

import torch
from lrserve.client import RemoteScheduler
from lrserve.service import create_app
from lrserve.service.settings import Settings
from starlette.testclient import TestClient


def test_should_stop_is_tied_to_the_stop_step(tmp_path):
    with TestClient(create_app(Settings(db=f"sqlite:///{tmp_path}/s.db"))) as api:
        opts = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1) for _ in range(2)]
        ranks = [RemoteScheduler(o, {"type": "ExponentialLR", "gamma": 0.99}, run_id="s", http_client=api,
                                 rank=r, world_size=2) for r, o in enumerate(opts)]
        for _ in range(5):
            ranks[0].step()  # rank 0 runs ahead (and its windows commit steps beyond it)
        stop = api.post("/v1/runs/s/control", json={"action": "stop"}).json()["applied_at"]
        assert stop > 5
        seen = {0: None, 1: None}
        for _ in range(stop + 3):
            for r, sched in enumerate(ranks):
                if sched.last_epoch < stop + 2:
                    sched.step()
                if sched.should_stop and seen[r] is None:
                    seen[r] = sched.last_epoch
        for sched in ranks:
            sched.close()
    assert seen == {0: stop, 1: stop}
