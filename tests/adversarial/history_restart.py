"""History of a long run after a restart: time per call and statements per call.

    python -m tests.adversarial.history_restart DB_URL [--steps 200000] [--groups 1] [--points 1000]

Creates the run ``long`` (CosineAnnealingLR) and steps it to ``--steps`` if ``DB_URL`` does not
hold it yet, then opens the store afresh (as a restarted process would: nothing in memory
but the last snapshot) and asks ``RunManager.history`` six times. Prints each call's time and
SQL statements, and the median of calls 2-6 (the first also loads the run).
"""

from __future__ import annotations

import argparse
import statistics
import time

from lrserve.service.errors import RunNotFound
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import open_store
from sqlalchemy import event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db_url")
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--points", type=int, default=1000)
    args = parser.parse_args()
    settings = Settings(db=args.db_url)
    store = open_store(args.db_url)
    try:
        manager = RunManager(store, settings)
        try:
            store.read_run("long")
        except RunNotFound:
            schedule = {"type": "CosineAnnealingLR", "T_max": 7000}
            manager.create_run({"run_id": "long", "schedule": schedule, "base_lrs": [0.1] * args.groups})
            while manager.state("long").horizon < args.steps:
                manager.window("long", manager.state("long").horizon + 1, 10_000)
    finally:
        store.close()
    store = open_store(args.db_url)  # a new process: nothing in memory
    try:
        manager = RunManager(store, settings)
        statements = [0]

        def count(*_: object) -> None:
            statements[0] += 1

        event.listen(store._engine, "before_cursor_execute", count)
        times = []
        for call in range(6):
            statements[0] = 0
            started = time.perf_counter()
            shown = manager.history("long", args.points)["lrs"]["steps"]
            times.append((time.perf_counter() - started) * 1000)
            print(f"call {call + 1}: {times[-1]:.1f} ms, {statements[0]} statements, {len(shown)} points")
        print(f"median of calls 2-6: {statistics.median(times[1:]):.1f} ms")
    finally:
        store.close()


if __name__ == "__main__":
    main()
