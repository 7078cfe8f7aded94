"""Big previews and creates run in a worker process (``service/offload.py``) with the default
settings: values bit for bit torch's in this process, and a killed worker is replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from lrserve.service.engine.preview import simulate
from lrserve.service.engine.spec import parse_schedule

pytestmark = pytest.mark.slow

GROUPS = 1024
COSINE = {"type": "CosineAnnealingWarmRestarts", "T_0": 37, "T_mult": 2, "eta_min": 1e-7}


def workers(pid: int) -> list[int]:
    """The server process's big-work processes (its spawned children, not their resource tracker)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()  # any of its threads may spawn
                for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def big_preview(http, steps: int = 300):
    """A preview of 1024 groups; the first waits for the worker's start (it imports torch: seconds,
    a minute on this shared machine at load 25), so its client waits longer than the fixture's."""
    base_lrs = [0.1 / (1 + i) for i in range(GROUPS)]
    body = {"schedule": COSINE, "base_lrs": base_lrs, "steps": steps}
    answer = http.post("/v1/schedules/preview", json=body, timeout=180)
    return answer, base_lrs


def test_a_big_preview_is_computed_in_a_worker_process_bit_for_bit(server, http):
    answer, base_lrs = big_preview(http)
    assert answer.status_code == 200, answer.text
    expected = simulate(parse_schedule(COSINE, n_groups=GROUPS), base_lrs, None, 300).lrs
    assert answer.json()["lrs"] == expected  # float == float: every bit
    assert len(workers(server.proc.pid)) == 1


def test_a_big_create_is_checked_in_a_worker_and_its_errors_are_422s(server, http):
    lambdas = [f"{i + 1}/({i + 1}+step)" for i in range(GROUPS)]
    created = http.post("/v1/runs", json={"run_id": "wide-lambda", "base_lrs": [0.1] * GROUPS,
                                          "schedule": {"type": "LambdaLR", "lr_lambda": lambdas}})
    assert created.status_code == 201, created.text
    window = http.get("/v1/runs/wide-lambda/lr", params={"step": 5}).json()
    assert window["lrs"][:3] == [0.1 * (i / (i + 5)) for i in (1, 2, 3)]  # base LR × its lambda
    bad = http.post("/v1/runs", json={"run_id": "wide-bad", "base_lrs": [0.1] * GROUPS,
                                      "schedule": {"type": "ExponentialLR", "gamma": 1e308}})
    assert bad.status_code == 422 and bad.json()["code"] == "schedule_error", bad.text
    assert http.get("/v1/runs/wide-bad").status_code == 404


def test_a_killed_worker_is_replaced(server, http):
    big_preview(http, steps=60)
    [worker] = workers(server.proc.pid)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while worker in workers(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    answer, _ = big_preview(http, steps=60)  # the pool is found broken and started again
    assert answer.status_code == 200, answer.text
    assert workers(server.proc.pid) not in ([], [worker])
