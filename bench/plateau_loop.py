"""Issue 15's target 5: what one plateau report costs the training thread, in both modes.

``python -m bench.plateau_loop [OTHER] [--rounds 5] [--reports 40] [--epoch 10]`` starts one
SQLite server (this checkout) and one training process per tree (``bench/_plateau_worker.py``;
with ``OTHER``, the root of another checkout, e.g. ``git worktree add --detach /tmp/base main``,
a second process imports that tree's client). Variants (tree x client mode x training step of
0.1 ms and 5 ms) take turns in rotated rounds; each segment runs ``--reports`` epochs of
``--epoch`` steps with ``step(metric)`` at each epoch's end (torch's call pattern).

Per report the training thread pays: wall time inside ``step(metric)`` plus inside the
optimizer's pre-step hooks over the next epoch (where ``overlap_decisions=True`` takes its
decision), and of that, its own CPU (``time.thread_time``: the rest is waiting, for the
decision or for the GIL). The yardstick is a bare ``http.client`` ``POST .../step`` with the
metric, from the same process in the middle of each epoch, after a pause like the report's:
one round trip. The hooks' figures include the timing pair's own cost (a few us per step);
``floor`` is that cost alone, measured in the same process (an optimizer with the pair and no
scheduler), and ``net`` the cost less it. Medians over all reports of a variant, and means
(what a job pays over time, slow reports included). Figure 1 (``python -m bench --only
client_step``) spreads the cost over the epoch's steps (time per step, against torch's),
with an injected ``httpx.Client`` (to count requests) instead of the default transport;
this is the cost per report the target is written in, with the client a user gets
(``RemoteScheduler(url=...)``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.servers import Server, sqlite_url, workdir
from bench.stats import median, rotations

MODES = ("waits", "overlap")
WORKS = (0.0001, 0.005)
WORKER = Path(__file__).with_name("_plateau_worker.py")


class _Worker:
    """One training process: the client of one tree."""

    def __init__(self, url: str, tree: Path | None) -> None:
        root = tree if tree is not None else WORKER.parent.parent
        env = dict(os.environ)  # that tree's lrserve first on the path (the script imports no bench)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-P", str(WORKER), url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=root)

    def segment(self, mode: str, work: float, reports: int, epoch: int) -> dict[str, list[float]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"seg {mode} {work} {reports} {epoch}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited ({self.proc.wait()})")
        answer: dict[str, list[float]] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(other: Path | None, rounds: int, reports: int, epoch: int) -> list[dict[str, Any]]:
    trees: dict[str, Path | None] = {"this": None}
    if other is not None:
        trees["other"] = other
    variants = [(t, m, w) for t in trees for w in WORKS for m in MODES]
    got: dict[tuple[str, str, float], dict[str, list[float]]] = {v: {} for v in variants}
    with workdir("lrserve-plateau-") as work, Server(sqlite_url(work), work) as server:
        workers = {t: _Worker(server.url, tree) for t, tree in trees.items()}
        try:
            for v in variants:  # warm-up: the runs are made, windows sized
                workers[v[0]].segment(v[1], v[2], 5, epoch)
            for order in rotations(variants, rounds):
                for tree, mode, w in order:
                    seg = workers[tree].segment(mode, w, reports, epoch)
                    for key, values in seg.items():
                        got[(tree, mode, w)].setdefault(key, []).extend(values)
        finally:
            for worker in workers.values():
                worker.close()
    rows = []
    for (tree, mode, w), values in got.items():
        rows.append({"tree": tree, "step_ms": w * 1e3, "client": mode,
                     **{key: median(vals) for key, vals in values.items()},
                     "net_cpu": median([c - f for c, f in zip(values["cpu"], values["floor_cpu"],
                                                              strict=True)]),
                     "wall_mean": sum(values["wall"]) / len(values["wall"]),
                     "cpu_mean": sum(values["cpu"]) / len(values["cpu"]),
                     "rtt_mean": sum(values["rtt"]) / len(values["rtt"]),
                     "reports": len(values["wall"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", nargs="?", type=Path, help="root of another checkout to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reports", type=int, default=40, help="reports per segment")
    parser.add_argument("--epoch", type=int, default=10, help="training steps per report")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load = os.getloadavg()
    rows = run(args.other, args.rounds, args.reports, args.epoch)
    print(f"load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {args.rounds} rounds x {args.reports} reports, "
          f"{args.epoch} steps per report; medians per report, us")
    head = ("tree", "step ms", "client", "cost", "cost CPU", "step(m)", "step(m) CPU", "hooks", "hooks CPU",
            "floor CPU", "net CPU", "round trip", "RT CPU", "cost - RT", "mean: cost", "cost CPU", "RT")
    print(" | ".join(head))
    for r in rows:
        cells = (r["tree"], f"{r['step_ms']:g}", r["client"], *(f"{r[k]:.0f}" for k in (
            "wall", "cpu", "tick_wall", "tick_cpu", "hook_wall", "hook_cpu", "floor_cpu", "net_cpu", "rtt",
            "rtt_cpu")),
            f"{r['wall'] - r['rtt']:.0f}", *(f"{r[k]:.0f}" for k in ("wall_mean", "cpu_mean", "rtt_mean")))
        print(" | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps({"load": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
