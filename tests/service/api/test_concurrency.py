"""Threads hammering one run: zero finality violations."""

from __future__ import annotations

import random
import threading

from tests.service.api.conftest import make_run
from tests.specs import plateau, warmup_then


def test_concurrent_steps_metrics_and_actions_keep_finality(api):
    make_run(api, "hot", warmup_then(plateau(factor=0.9), steps=5), base_lrs=(0.1, 0.2))
    seen: dict[int, list] = {}
    violations = []
    errors = []
    lock = threading.Lock()

    def remember(start, rows):
        with lock:
            for i, row in enumerate(rows):
                previous = seen.setdefault(start + i, row)
                if previous != row:
                    violations.append((start + i, previous, row))

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(60):
            step = rng.randrange(0, 120)
            roll = rng.random()
            if roll < 0.5:
                r = api.get("/v1/runs/hot/lr", params={"step": step, "ahead": rng.randrange(0, 8)})
            elif roll < 0.9:
                r = api.post("/v1/runs/hot/step", json={"step": step, "metrics": {"val_loss": rng.random()}})
            else:
                r = api.post("/v1/runs/hot/control", json={"action": "scale", "factor": 0.99})
            if r.status_code != 200:
                errors.append(r.text)
                continue
            if "window" in r.json():
                remember(r.json()["window"]["start"], r.json()["window"]["lrs"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert violations == []
    horizon = api.get("/v1/runs/hot").json()["horizon"]
    final = api.get("/v1/runs/hot/lr", params={"step": 0, "ahead": horizon}).json()["window"]["lrs"]
    for step, row in seen.items():
        assert final[step] == row
