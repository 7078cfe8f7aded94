"""Big previews and creates run in a worker process (``service/offload.py``) with the default
settings: values bit for bit torch's in this process, and a killed worker is replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from lrserve.service.engine.preview import simulate
from lrserve.service.engine.spec import parse_schedule
from lrserve.service.offload import OFFLOAD_NICE, OFFLOAD_SLICE_MS
from lrserve.service.scheduling import long_slices_hold_back_none, time_slice_ms
from lrserve.service.settings import Settings

from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow

GROUPS = 1024
COSINE = {"type": "CosineAnnealingWarmRestarts", "T_0": 37, "T_mult": 2, "eta_min": 1e-7}


def workers(server) -> list[int]:
    """The server process's big-work processes (``Server.spawned_pids``: with one uvicorn worker,
    its multiprocessing children but their resource tracker; one gone since it was listed is
    none of them: a killed worker, reaped in that gap, made this test fail beside a busy suite)."""
    return server.spawned_pids()


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
    assert len(workers(server)) == 1


def nice_values(pid: int) -> set[int]:
    """The nice value of each thread of process ``pid`` (``/proc/PID/task/TID/stat``, field 19)."""
    return {int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
            for task in Path(f"/proc/{pid}/task").iterdir()}


def time_slices(pid: int) -> set[float | None]:
    """The time slice of each thread of process ``pid``, in ms (``scheduling.time_slice_ms``); a
    thread gone between the listing and the read is none of them (the server's thread pool lets
    idle threads go)."""
    slices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        slices[task] = time_slice_ms(int(task.name))
    return {ms for task, ms in slices.items() if ms is not None or task.exists()}


def worker_slice() -> float | None:
    """The slice a worker asks for with the defaults here: ``OFFLOAD_SLICE_MS`` where this kernel
    keeps slices per task and long ones hold back no other task (Linux 6.17+), else this
    process's own, inherited through the server."""
    kernel = time_slice_ms()  # this process asks for none: the kernel's default, or 0.0 without slices
    return OFFLOAD_SLICE_MS if kernel and long_slices_hold_back_none() else kernel


def test_with_the_defaults_the_worker_process_runs_at_the_servers_own_nice_value_in_long_slices(server, http):
    """Default settings: every thread of the worker (torch's included) at ``OFFLOAD_NICE`` (0: the
    server's own priority, inherited) and in time slices of ``OFFLOAD_SLICE_MS`` where the kernel
    keeps one per task and a long one holds back no other task (Linux 6.17 and later); the
    server's threads in the kernel's own."""
    answer, _ = big_preview(http, steps=60)
    assert answer.status_code == 200, answer.text
    [worker] = workers(server)
    mine = os.getpriority(os.PRIO_PROCESS, 0)  # the server's, inherited from this process
    assert Settings.model_fields["offload_nice"].default == OFFLOAD_NICE == 0
    assert nice_values(worker) == {mine}
    assert Settings.model_fields["offload_slice_ms"].default == OFFLOAD_SLICE_MS == 50
    assert time_slices(worker) == {worker_slice()}
    assert time_slices(server.proc.pid) == {time_slice_ms()}


def test_lrserve_offload_nice_and_slice_set_every_thread_of_the_worker_not_the_server(tmp_path):
    """``LRSERVE_OFFLOAD_NICE=12``, ``LRSERVE_OFFLOAD_SLICE_MS=7.5``: set in the worker before torch
    starts its threads, so all of them have them; the event loop's thread keeps the server's."""
    mine, kernel = os.getpriority(os.PRIO_PROCESS, 0), time_slice_ms()
    with ServerProcess(f"sqlite:///{tmp_path / 'nice.db'}", tmp_path,
                       env={"LRSERVE_OFFLOAD_NICE": "12", "LRSERVE_OFFLOAD_SLICE_MS": "7.5"}) as proc, \
            httpx.Client(base_url=proc.url, timeout=30) as client:
        answer, _ = big_preview(client, steps=60)
        assert answer.status_code == 200, answer.text
        [worker] = workers(proc)
        assert nice_values(worker) == {max(mine, 12)}
        assert time_slices(worker) == ({7.5} if worker_slice() == OFFLOAD_SLICE_MS else {kernel})
        assert len(list(Path(f"/proc/{worker}/task").iterdir())) > 1  # torch's threads among them
        assert os.getpriority(os.PRIO_PROCESS, proc.proc.pid) == mine
        assert time_slices(proc.proc.pid) == {kernel}


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
    [worker] = workers(server)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while worker in workers(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    answer, _ = big_preview(http, steps=60)  # the pool is found broken and started again
    assert answer.status_code == 200, answer.text
    assert workers(server) not in ([], [worker])
