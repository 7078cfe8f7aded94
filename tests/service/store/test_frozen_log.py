"""A log written by lrserve v1 must keep replaying to the same learning rates, forever."""

from __future__ import annotations

import json
from pathlib import Path

from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import EventKind, NewEvent, open_store

ASSET = Path(__file__).parent / "assets" / "events_v1.jsonl"


def test_frozen_log_replays_to_the_same_lrs(tmp_path):
    header, *events = [json.loads(line) for line in ASSET.read_text().splitlines()]
    as_new = [NewEvent(EventKind(e["kind"]), e["step"], e["payload"]) for e in events]
    store = open_store(f"sqlite:///{tmp_path}/replay.db")
    try:
        store.create_run("frozen", header["spec"], {}, as_new[0])
        with store.lock_run("frozen") as tx:
            tx.append_events(as_new[1:])
            tx.update_run(horizon=header["horizon"])
        manager = RunManager(store, Settings(db=f"sqlite:///{tmp_path}/replay.db"))
        replayed = manager.values_between("frozen", 0, header["horizon"])
        assert [list(lrs) for lrs, _ in replayed] == header["lrs"]
        kinds = {e["kind"] for e in events}
        assert {"created", "metric", "control", "plateau_reduction", "status"} <= kinds
    finally:
        store.close()
