"""Runs that look like real training jobs, made through the public API only.

The dashboard tests (and their screenshots) need a server with a few runs in different
states: warm-up then plateau with reductions, two param groups, a held run, a stopped
one, metrics reported with steps and in batches, and an LR range test that switched to
its main schedule.
"""

from __future__ import annotations

import math

import httpx

PLATEAU = {
    "type": "SequentialLR",
    "milestones": [5],
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.1, "total_iters": 5},
        {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 3, "monitor": "val_loss"},
    ],
}
COSINE = {"type": "CosineAnnealingLR", "T_max": 200, "eta_min": 1e-5}
ONECYCLE = {"type": "OneCycleLR", "max_lr": 0.01, "total_steps": 300}
STEP = {"type": "StepLR", "step_size": 20, "gamma": 0.5}
RANGE_TEST = {
    "type": "LRRangeTest",
    "min_lr": 1e-6,
    "max_lr": 10.0,
    "num_steps": 100,
    "then": {"type": "CosineAnnealingLR", "T_max": 60, "eta_min": 1e-5},
}
RANGE_TEST_RUN = "resnet18-lr-find"

RUNS = {
    "resnet50-a1": {
        "schedule": PLATEAU,
        "base_lrs": [0.1],
        "labels": {"team": "vision", "sweep": "7"},
    },
    "bert-base-ft": {"schedule": COSINE, "base_lrs": [3e-4, 3e-5], "labels": {"team": "nlp"}},
    "gpt-small-3": {
        "schedule": ONECYCLE,
        "base_lrs": [0.01],
        "base_momentums": [0.95],
        "labels": {"team": "nlp", "sweep": "7"},
    },
    "vit-tiny-sweep7-t3": {
        "schedule": STEP,
        "base_lrs": [0.05],
        "labels": {"team": "vision", "sweep": "7"},
    },
    RANGE_TEST_RUN: {"schedule": RANGE_TEST, "base_lrs": [0.1], "labels": {"team": "research"}},
}


def val_loss(step: int) -> float:
    """Improves for 30 steps, then wanders on a plateau (so ReduceLROnPlateau acts)."""
    return (
        2.0 * math.exp(-step / 12) + 0.4 + 0.01 * math.sin(step)
        if step < 30
        else 0.52 + 0.01 * math.sin(step)
    )


def train_loss_records(last: int, scale: float = 1.0) -> list[dict]:
    return [
        {
            "step": s,
            "name": "train_loss",
            "value": scale * (2.5 * math.exp(-s / 40) + 0.3 + 0.05 * math.cos(s / 3)),
        }
        for s in range(0, last + 1)
    ]


def range_test_loss(lr: float, step: int) -> float:
    """Flat at tiny LRs, falls around 3e-3, blows up past 0.3: the shape a range test looks for."""
    fall = 1.6 * (1 + math.tanh(1.3 * math.log10(lr / 3e-3))) / 2
    return 2.3 - fall + (8 * (lr - 0.3) if lr > 0.3 else 0.0) + 0.03 * math.sin(1.7 * step)


def seed_range_test(http: httpx.Client, run_id: str, after: int = 20) -> int:
    """Report the loss with every step until the test switches, then train ``after`` steps on.

    Returns the step of the switch. Each loss is measured at the LR the previous answer
    handed out, as a job's would be.
    """
    lr = http.get(f"/v1/runs/{run_id}").json()["lrs"][0]
    step = 0
    switched_at = None
    while switched_at is None:
        step += 1
        metrics = {"loss": range_test_loss(lr, step)}
        answer = http.post(f"/v1/runs/{run_id}/step", json={"step": step, "metrics": metrics})
        answer.raise_for_status()
        lr, switched_at = answer.json()["lrs"][0], answer.json()["switched_at"]
    for k in range(step + 1, step + after + 1):
        loss = 0.6 + 0.5 * math.exp(-(k - step) / 8) + 0.02 * math.sin(k)
        http.post(
            f"/v1/runs/{run_id}/step", json={"step": k, "metrics": {"loss": loss}}
        ).raise_for_status()
    return switched_at


def seed(http: httpx.Client) -> None:
    """Create every run in RUNS and move it along; raises on any refused request."""
    for run_id, body in RUNS.items():
        http.post("/v1/runs", json={"run_id": run_id, **body}).raise_for_status()
    for k in range(1, 81):  # the job's torch pattern: scheduler.step(val_loss) every epoch
        http.post(
            "/v1/runs/resnet50-a1/step", json={"step": k, "metrics": {"val_loss": val_loss(k)}}
        ).raise_for_status()
    http.post(
        "/v1/runs/resnet50-a1/metrics", json={"records": train_loss_records(80)}
    ).raise_for_status()
    http.get("/v1/runs/bert-base-ft/lr", params={"step": 0, "ahead": 150}).raise_for_status()
    http.post(
        "/v1/runs/bert-base-ft/metrics", json={"records": train_loss_records(150, 0.8)}
    ).raise_for_status()
    http.get("/v1/runs/gpt-small-3/lr", params={"step": 0, "ahead": 120}).raise_for_status()
    http.post("/v1/runs/gpt-small-3/control", json={"action": "hold"}).raise_for_status()
    http.get("/v1/runs/gpt-small-3/lr", params={"step": 121, "ahead": 9}).raise_for_status()
    http.get("/v1/runs/vit-tiny-sweep7-t3/lr", params={"step": 0, "ahead": 60}).raise_for_status()
    http.post("/v1/runs/vit-tiny-sweep7-t3/control", json={"action": "stop"}).raise_for_status()
    http.get("/v1/runs/vit-tiny-sweep7-t3/lr", params={"step": 61}).raise_for_status()
    seed_range_test(http, RANGE_TEST_RUN)
