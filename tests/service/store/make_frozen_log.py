"""Writes ``assets/events_v1.jsonl``: a run's log and the LRs it produced, frozen.

Run once (``python -m tests.service.store.make_frozen_log``) when the log format is
introduced; never regenerate it to make a failing replay test pass: a change that breaks
the replay of an old log breaks every stored run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fastapi.testclient import TestClient
from lrserve.service.app import create_app
from lrserve.service.settings import Settings

ASSET = Path(__file__).parent / "assets" / "events_v1.jsonl"
SCHEDULE = {
    "type": "SequentialLR",
    "milestones": [5],
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.1, "total_iters": 5},
        {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 1, "threshold": 0.01},
    ],
}


def main() -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        TestClient(create_app(Settings(db=f"sqlite:///{tmp}/f.db"))) as api,
    ):
        api.post("/v1/runs", json={"run_id": "frozen", "schedule": SCHEDULE, "base_lrs": [0.1, 0.02]})
        losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.8, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86, 0.87]
        for k, loss in enumerate(losses, start=1):
            api.post("/v1/runs/frozen/step", json={"step": k, "metrics": {"val_loss": loss}})
            if k == 7:
                api.post("/v1/runs/frozen/control", json={"action": "scale", "factor": 0.5})
            if k == 10:
                api.post("/v1/runs/frozen/control", json={"action": "hold", "at_step": 12})
        horizon = 20
        lrs = api.get("/v1/runs/frozen/lr", params={"step": 0, "ahead": horizon}).json()["window"]["lrs"]
        store = api.app.state.manager.store
        record = store.read_run("frozen")
        lines = [{"spec": record.spec, "horizon": horizon, "lrs": lrs}]
        lines += [
            {"seq": e.seq, "kind": e.kind.value, "step": e.step, "payload": e.payload}
            for e in store.read_events("frozen")
        ]
    ASSET.write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
