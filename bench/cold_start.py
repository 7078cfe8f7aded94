"""Target 8 (issue 15) side by side: ``lrserve serve`` to a ready ``/readyz`` against ``import torch``.

``python -m bench.cold_start [OTHER] [--rounds 7] [--json PATH]`` takes turns, in rotated
rounds, between ``python -c "import torch"`` (the yardstick), ``lrserve serve`` of this
checkout ("this") and, when given, of ``OTHER``, the root of another checkout of the
repository ("other", e.g. ``git worktree add /tmp/base main``). Each start gets a new SQLite
file (the database is created, as a first start does) and is timed from spawn to the first
200 of ``GET /readyz`` (polled every 5 ms). Each tree's bytecode is written first
(``servers.compile_tree``, into each checkout's ``__pycache__``), as an install's is.
Prints the median and range of each, and each server's median over the yardstick's. Figure 4
(``python -m bench --only scale``) has the same two rows for this checkout alone, against a
database of many runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from bench.scale import READY_OVER_TORCH_S, _import_torch
from bench.servers import Server, compile_tree, sqlite_url, workdir
from bench.stats import median, rotations


def run(other: Path | None, rounds: int) -> dict[str, Any]:
    trees: dict[str, Path | None] = {"this": None}
    if other is not None:
        trees["other"] = other
    for tree in trees.values():
        compile_tree(tree)  # what an install has; torch's bytecode came with its own
    times: dict[str, list[float]] = {name: [] for name in ["torch", *trees]}
    loads = []
    with workdir("lrserve-cold-") as work:
        for r, order in enumerate(rotations(list(times), rounds)):
            loads.append(os.getloadavg()[0])
            for name in order:
                if name == "torch":
                    times[name].append(_import_torch())
                    continue
                server = Server(sqlite_url(work, f"{name}-{r}"), work, name=f"cold-{name}", tree=trees[name])
                try:
                    server.spawn()
                    times[name].append(server.first_answer("/readyz"))
                finally:
                    server.stop()
    torch_s = median(times["torch"])
    return {
        "rounds": rounds, "load": [min(loads), max(loads)],
        "variants": {name: {"median_s": median(seconds), "min_s": min(seconds), "max_s": max(seconds),
                            "over_torch_s": median(seconds) - torch_s, "seconds": seconds}
                     for name, seconds in times.items()},
    }


def _print(result: dict[str, Any]) -> None:
    low, high = result["load"]
    print(f"{result['rounds']} rotated rounds, load average {low:.1f}-{high:.1f}")
    for name, row in result["variants"].items():
        over = "" if name == "torch" else f"  import torch {row['over_torch_s']:+.2f} s"
        holds = "" if name == "torch" else ("  (holds)" if row["over_torch_s"] <= READY_OVER_TORCH_S else "")
        print(f"{name:>6}: {row['median_s']:.2f} s ({row['min_s']:.2f}-{row['max_s']:.2f}){over}{holds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, nargs="?", help="the root of another checkout of the repository")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.other.resolve() if args.other else None, args.rounds)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
