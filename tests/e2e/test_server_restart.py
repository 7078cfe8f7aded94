"""A real uvicorn server killed with SIGKILL: nothing final changes, nothing acknowledged is lost."""

from __future__ import annotations

import httpx
import pytest

from tests.live_server import ServerProcess
from tests.service.engine import reference
from tests.specs import plateau, warmup_then

pytestmark = pytest.mark.slow

PLATEAU_AFTER_WARMUP = warmup_then(plateau(patience=1), steps=4, start_factor=0.25)


def test_kill_9_and_restart_keeps_every_value_and_acknowledgement(tmp_path):
    db = f"sqlite:///{tmp_path}/e2e.db"
    server = ServerProcess(db, tmp_path).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            http.post(
                "/v1/runs",
                json={
                    "run_id": "t",
                    "schedule": {"type": "CosineAnnealingLR", "T_max": 700},
                    "base_lrs": [0.1, 0.05],
                },
            ).raise_for_status()
            http.post(
                "/v1/runs", json={"run_id": "p", "schedule": PLATEAU_AFTER_WARMUP, "base_lrs": [0.1]}
            ).raise_for_status()
            handed = {}
            for start in range(0, 2400, 200):  # crosses several snapshots
                w = http.get("/v1/runs/t/lr", params={"step": start, "ahead": 199}).json()["window"]
                handed.update({start + i: row for i, row in enumerate(w["lrs"])})
            plateau = [
                http.post("/v1/runs/p/step", json={"step": k, "metrics": {"val_loss": 1.0}}).json()["lrs"]
                for k in range(1, 12)
            ]
            action = http.post("/v1/runs/p/control", json={"action": "scale", "factor": 0.1}).json()
            accepted = http.post(
                "/v1/runs/t/metrics",
                json={
                    "records": [{"step": s, "name": "train_loss", "value": 1 / (s + 1)} for s in range(50)]
                },
            )
            assert accepted.status_code == 202
        server.kill()
        server = ServerProcess(db, tmp_path, port=server.port).start()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for start in range(0, 2400, 600):
                w = http.get("/v1/runs/t/lr", params={"step": start, "ahead": 599}).json()["window"]
                assert w["lrs"] == [handed[start + i] for i in range(600)]
            again = [http.get("/v1/runs/p/lr", params={"step": k}).json()["lrs"] for k in range(1, 12)]
            assert again == plateau
            after = http.get("/v1/runs/p/lr", params={"step": action["applied_at"]}).json()["lrs"]
            assert after == [plateau[-1][0] * 0.1]
            history = http.get("/v1/runs/t/history", params={"max_points": 100}).json()
            assert history["metrics"]["train_loss"]["steps"] == list(range(50))
            events = http.get("/v1/runs/p/history").json()["events"]
            assert [e["kind"] for e in events].count("control") == 1
            assert any(e["kind"] == "plateau_reduction" for e in events)
    finally:
        server.stop()
    expected = reference.trajectory({"type": "CosineAnnealingLR", "T_max": 700}, [0.1, 0.05], 2400)
    assert [handed[s] for s in range(2400)] == [lrs for lrs, _ in expected]


SWITCH_TO_MULTISTEP = {"type": "SequentialLR", "milestones": [1500], "schedulers": [
    {"type": "StepLR", "step_size": 400, "gamma": 0.5},
    {"type": "MultiStepLR", "milestones": [100, 300], "gamma": 0.1}]}


def test_a_switch_after_a_restart_to_a_multistep_stage_is_torch_s(tmp_path):
    """The run is loaded from its snapshot at step 1,000 (the default ``snapshot_every``), before
    its SequentialLR switches to a MultiStepLR stage at 1,500. The snapshot held that stage's
    milestones (torch's Counter) as a plain dict: after the restart every window from the
    switch on failed (AttributeError, a 500), where torch goes on."""
    db = f"sqlite:///{tmp_path}/e2e.db"
    server = ServerProcess(db, tmp_path).start()
    handed = {}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            http.post("/v1/runs", json={"run_id": "m", "schedule": SWITCH_TO_MULTISTEP, "base_lrs": [0.1]}
                      ).raise_for_status()
            w = http.get("/v1/runs/m/lr", params={"step": 0, "ahead": 1199}).json()["window"]
            handed.update(enumerate(w["lrs"]))
        server.kill()
        server = ServerProcess(db, tmp_path, port=server.port).start()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            answer = http.get("/v1/runs/m/lr", params={"step": 1200, "ahead": 799})
            assert answer.status_code == 200, answer.text
            handed.update((1200 + i, row) for i, row in enumerate(answer.json()["window"]["lrs"]))
    finally:
        server.stop()
    expected = reference.trajectory(SWITCH_TO_MULTISTEP, [0.1], 2000)
    assert [handed[s] for s in range(2000)] == [lrs for lrs, _ in expected]


def test_refuses_public_bind_without_tokens(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lrserve.service", "serve", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path}/x.db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--insecure" in result.stderr
