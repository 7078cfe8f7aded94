"""Fleet control on two real replicas sharing PostgreSQL, while the jobs step.

51 runs labelled ``sweep=7`` (one of them stopped) and 3 others; every live run has two
ranks stepping through alternating replicas. Mid-run, an operator (a named admin token)
asks through ``lrserve control --selector sweep=7 scale 0.5 --reason ...``: a dry run
first (nothing changes), then the action. Each run takes it at its own first free step
(above every step handed out before the request, at most one past the last step asked for
by the time it answered), the stopped run refuses and is reported, the other sweep is
untouched, every rank of a run gets identical values at every step, and each run's values hold the
old LR up to the step before the action and half of it from that step on, on both
replicas. Every event names its actor; no token's secret appears in any answer or log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest
from lrserve.client._cli import main as lrserve

from tests.e2e.load import Cluster, Ledger, Load
from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow

ALICE, JOBS = "al1ce-s3cret-tok", "j0bs-s3cret-tok"
ENV = {"LRSERVE_TOKENS": f"ops-alice:admin:{ALICE},jobs:write:{JOBS}"}
AS_JOBS = {"Authorization": f"Bearer {JOBS}"}
SWEEP = [f"s7-{i:02d}" for i in range(50)]
STEPS = 60
LR = 0.1


def _create(url: str, run_id: str, sweep: str) -> None:
    body = {"run_id": run_id, "schedule": {"type": "StepLR", "step_size": 10_000}, "base_lrs": [LR],
            "labels": {"sweep": sweep}}
    answer = httpx.post(f"{url}/v1/runs", json=body, headers=AS_JOBS, timeout=30)
    assert answer.status_code in (200, 201), answer.text


def stepper(load: Load, acted: list, sent: dict[str, int]) -> Callable[[Cluster, str], None]:
    """A job: both ranks of one run, step by step, each through its own replica; from 2/3 of
    the steps on, only once the action was taken (so it lands while the runs are live).
    ``sent``: per run, the last step asked for (its answer may still be on its way)."""

    def job(cluster: Cluster, run_id: str) -> None:
        for k in range(1, STEPS + 1):
            if k == 2 * STEPS // 3:
                load.wait_for(lambda: bool(acted))
            for rank in (0, 1):
                if load.over():
                    return
                sent[run_id] = k
                answer = cluster.call((k + rank) % 2, "POST", f"/v1/runs/{run_id}/step",
                                      json={"step": k, "rank": rank})
                if not load.ledger.stepped(run_id, rank, k, answer):
                    return

    return job


def test_a_selector_action_over_50_live_runs_on_two_replicas(database_url, tmp_path, capsys):
    db = database_url("postgres")
    a = ServerProcess(db, tmp_path, env=ENV).start()
    b = ServerProcess(db, tmp_path, env=ENV).start()
    try:
        for i, run_id in enumerate([*SWEEP, "s7-stopped"]):
            _create((a.url, b.url)[i % 2], run_id, "7")
        for i in range(3):
            _create(b.url, f"s8-{i}", "8")
        stop = httpx.post(f"{a.url}/v1/runs/s7-stopped/control", json={"action": "stop"},
                          headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
        assert stop.status_code == 200, stop.text
        httpx.get(f"{a.url}/v1/runs/s7-stopped/lr", params={"step": 1}, headers=AS_JOBS).raise_for_status()

        ledger = Ledger()
        acted: list = []
        load = Load([a.url, b.url], ledger, deadline=time.monotonic() + 240, headers=AS_JOBS)
        sent: dict[str, int] = {}
        job = stepper(load, acted, sent)
        jobs = [load.spawn(job, run_id) for run_id in SWEEP]
        load.wait_for(lambda: min(ledger.progress(r, rank) for r in SWEEP for rank in (0, 1)) >= STEPS // 3)

        cli = ["--url", a.url, "--token", ALICE]
        assert lrserve(["control", "--selector", "sweep=7", "scale", "0.5", "--dry-run", "--json", *cli]) == 0
        dry = json.loads(capsys.readouterr().out)
        assert dry["dry_run"] is True and dry["matched"] == 51

        before = {run_id: ledger.horizon(run_id) for run_id in SWEEP}
        code = lrserve(["control", "--selector", "sweep=7", "scale", "0.5", "--reason", "lr too high",
                        "--json", *cli])
        # A step asked for before the answer came may be final before the action was placed
        # (committed, its answer still on its way): the bound is the last step asked for.
        after = {run_id: max(ledger.horizon(run_id), sent[run_id]) for run_id in SWEEP}
        acted.append(True)
        out, err = capsys.readouterr()
        answer = json.loads(out)
        assert code == 1 and "1 of 51 runs refused scale" in err  # the stopped run
        load.finish(jobs)

        assert ledger.errors == [], ledger.errors[:5]
        assert ledger.violations == [], ledger.violations[:5]
        assert answer["matched"] == 51 and len(answer["results"]) == 51
        results = {r["run_id"]: r for r in answer["results"]}
        assert results["s7-stopped"]["error"]["code"] == "run_conflict"
        for run_id in SWEEP:
            applied = results[run_id]["applied_at"]
            assert before[run_id] < applied <= after[run_id] + 1, (run_id, before[run_id], applied)
            ranks = [ledger.by_rank[(run_id, r)] for r in (0, 1)]
            assert len(ranks[0]) == len(ranks[1]) == STEPS and ranks[0] == ranks[1], run_id  # parity
            for url in (a.url, b.url):
                window = httpx.get(f"{url}/v1/runs/{run_id}/lr", params={"step": 0, "ahead": STEPS},
                                   headers=AS_JOBS, timeout=30).json()["window"]["lrs"]
                assert window == [[LR]] * applied + [[LR * 0.5]] * (STEPS + 1 - applied), run_id
                ledger.answer(run_id, {"window": {"start": 0, "lrs": window, "momentums": None}})
        assert ledger.violations == []

        for run_id in (SWEEP[0], SWEEP[-1], "s7-stopped", "s8-0"):
            history = httpx.get(f"{b.url}/v1/runs/{run_id}/history", headers=AS_JOBS, timeout=30)
            events = history.json()["events"]
            assert events[0]["kind"] == "created" and events[0]["actor"] == "jobs"
            controls = [(e["action"], e["actor"], e["reason"]) for e in events if e["kind"] == "control"]
            expected = {"s7-stopped": [("stop", "ops-alice", None)], "s8-0": []}
            assert controls == expected.get(run_id, [("scale", "ops-alice", "lr too high")])
            assert ALICE not in history.text and JOBS not in history.text
    finally:
        a.stop()
        b.stop()
    logs = a.log_path.read_text() + b.log_path.read_text()
    assert ALICE not in logs and JOBS not in logs


KINDS = [
    (["set-lr", "0.05"], "set_lr"),
    (["scale", "0.5"], "scale"),
    (["hold"], "hold"),
    (["resume"], "resume"),
    (["replace", '{"type": "ConstantLR", "factor": 0.5, "total_iters": 2}'], "replace_schedule"),
    (["stop"], "stop"),
]


def test_every_action_kind_records_its_actor_through_the_cli(database_url, tmp_path, capsys):
    """A real server with named tokens; each action kind through ``lrserve control RUN ...
    --reason``, the job stepping between them; history and ``lrserve history`` name who did
    what and why, and what the server decided itself."""
    server = ServerProcess(database_url("sqlite"), tmp_path, env=ENV).start()
    try:
        body = {"run_id": "r", "schedule": {"type": "StepLR", "step_size": 3}, "base_lrs": [0.1]}
        assert httpx.post(f"{server.url}/v1/runs", json=body, headers=AS_JOBS, timeout=30).status_code == 201
        cli = ["--url", server.url, "--token", ALICE]
        for n, (words, _) in enumerate(KINDS, start=1):
            assert lrserve(["control", "r", *words, "--reason", f"why {n}", *cli]) == 0, capsys.readouterr()
            httpx.get(f"{server.url}/v1/runs/r/lr", params={"step": n}, headers=AS_JOBS,
                      timeout=30).raise_for_status()
        capsys.readouterr()
        assert lrserve(["history", "r", *cli]) == 0
        rows = [line.split(",") for line in capsys.readouterr().out.splitlines()]
    finally:
        server.stop()
    assert rows[0] == ["series", "step", "value", "actor", "reason"]
    events = [(r[0], r[3], r[4]) for r in rows if r[0].startswith("event:")]
    assert events[0] == ("event:created", "jobs", "")
    controls = [e for e in events if e[0] == "event:control"]
    assert controls == [("event:control", "ops-alice", f"why {n}") for n in range(1, 7)]
    statuses = [e for e in events if e[0] == "event:status"]
    assert statuses == [("event:status", "ops-alice", "why 3"), ("event:status", "ops-alice", "why 4"),
                        ("event:status", "ops-alice", "why 6")]
    log = server.log_path.read_text()
    assert ALICE not in log and JOBS not in log
