"""Figure 7: work budgets: what the worst request each budget allows does to everyone else.

One server process, default settings, on SQLite and then on PostgreSQL. A *victim* job steps its own run
(``POST .../step``, one new step per request, a commit each) and a probe asks ``GET /healthz``,
each one request at a time, while an *attacker* (a process of its own) repeats the worst
request a budget allows, one at a time, with a read/write token's rights:

- ``none``: no attacker (the baseline);
- ``window``: ``GET .../lr?step=<first free>&ahead=10000`` on a 1024-group run (cut to the budget);
- ``step jump``: ``POST .../step`` as far beyond the horizon as the budget allows, same run;
- ``preview``: ``POST /v1/schedules/preview``, 1024 groups, the most steps the budget allows;
- ``history``: ``GET .../history`` of that run, the most points the budget allows, each one
  built anew: before each, one metric record at a step the run has no record at yet is posted
  to it (as a training job would), which moves its history's mark, so no answer kept from
  before is given (a record already stored is kept as it was and moves nothing: the
  attacker checks that each one was new);
- ``create``: a 1024-group LambdaLR run with distinct expressions as long as the budget allows;
- ``kept history`` (side by side only, not in figure 7): the same history request with no new
  record before it, so the answer is a kept one: what sending 10 MB costs, without building it.

The attacker reads every byte of its big answers (``_Discarding``: a socket read into one
reused buffer, not parsed): a client on another machine costs the server nothing more, and
httpx's pure-Python reading of a 10 MB answer took ~15 ms of CPU per answer on the server's
two cores (a socket read: ~5 ms), which the figure charged to the server.

Each scenario runs in rotated rounds (three at the default size), the baseline in every round.
Rows: the victim's and the probe's p50/p99 (medians over rounds), their ratio to the baseline's
(of the same backend; the median of each round's ratio to that round's baseline), the longest
wait of any round, and the attacker request's own time (its server time plus one loopback round
trip): the "worst allowed request per route" figure the README quotes. The baseline's row says
how far its own p99 moved between rounds (``baseline_spread``, max / min).

``python -m bench.budgets OTHER [--attacks none,history] [--rounds 6] [--seconds 4] [--backend
sqlite]`` compares two versions side by side: one server from this checkout ("this") and one
from ``OTHER`` (the root of another checkout), the scenarios of both in rotated rounds; per
tree and scenario the median over rounds of each round's p99, and the median of each round's
ratio to that tree's baseline of the same round; and the server's CPU in cores over the
scenario (the server process's own, whose interpreter the event loop runs in; ``+workers``:
with its big-work processes), from ``/proc``, medians of rounds; each scenario's max too (the
longest a step or a probe waited: the loop's longest stall they saw). ``--workers N`` runs both
servers with N processes; ``--hogs N`` starts N busy-looping processes at nice 0 in each
server's session, its scheduling group (``bench/hogs.py``: what its other workers, or a job
started from its shell, are to the kernel); ``--this-env NAME=VALUE`` and ``--other-env`` set
a server's environment, so that ``OTHER`` may be this tree under another setting (``python -m
bench.budgets . --hogs 2 --this-env LRSERVE_BACKGROUND_NICE=5 --other-env
LRSERVE_BACKGROUND_NICE=0``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from lrserve.service.engine import cost
from lrserve.service.engine.spec import parse_schedule
from lrserve.service.settings import Settings

from bench import report
from bench.servers import Pool, Server, pg_problem, pg_schema, process_cpu_seconds, sqlite_url, workdir
from bench.sizes import Size
from bench.stats import p99, percentile, rotations

NAME = "budgets"
TITLE = "Figure 7: another run's step and /healthz while the worst request each budget allows runs"
GROUPS = 1024
TARGET_RATIO = 2.0
TARGET_MS = 100.0
STEP_LR = {"type": "StepLR", "step_size": 7}


def _seconds(size: Size) -> float:
    """Each scenario's time per round."""
    return {"tiny": 1.0, "quick": 3.0}.get(size.name, 4.0)


class _Discarding:
    """An HTTP/1.1 client for big answers that reads every byte of each into one reused buffer
    and keeps none: the server sends all of it, the client spends only the socket reads."""

    CHUNK = 1 << 20

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.sock: socket.socket | None = None
        self.buffer = bytearray(self.CHUNK)

    def request(self, method: str, path: str, params: dict[str, Any] | None = None,
                json: Any = None) -> int:
        """Send one request, read its whole answer; its size. Raises on a status that is not 200.
        A kept connection the server closed meanwhile (idle keep-alive) is opened again once."""
        target = f"{path}?{urlencode(params)}" if params else path
        body = b"" if json is None else httpx.Request(method, "http://x", json=json).read()
        head = (f"{method} {target} HTTP/1.1\r\nhost: {self.address[0]}\r\ncontent-length: {len(body)}\r\n"
                + ("content-type: application/json\r\n" if json is not None else "") + "\r\n")
        for fresh in (self.sock is None, True):
            if self.sock is None:
                self.sock = socket.create_connection(self.address)
            try:
                self.sock.sendall(head.encode() + body)
                got = self._head()
                break
            except ConnectionError:
                self.close()
                if fresh:
                    raise
        header, _, rest = got.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        if "content-length" not in fields:
            raise RuntimeError(f"{method} {path}: no content-length ({fields})")
        left = int(fields["content-length"]) - len(rest)
        view = memoryview(self.buffer)
        assert self.sock is not None
        while left > 0:
            n = self.sock.recv_into(view, min(left, self.CHUNK))
            if not n:
                raise ConnectionError("the server closed the connection mid-answer")
            left -= n
        if fields.get("connection") == "close":
            self.close()
        if status != 200:
            raise RuntimeError(f"{method} {path}: {status}")
        return int(fields["content-length"])

    def _head(self) -> bytes:
        """The answer's head and whatever of its body came with it."""
        assert self.sock is not None
        got = b""
        while b"\r\n\r\n" not in got:
            piece = self.sock.recv(65536)
            if not piece:
                raise ConnectionError("the server closed the connection")
            got += piece
        return got

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Attacker:
    """One kind of worst request, repeated one at a time (``next_request`` builds each)."""

    def __init__(self, url: str, name: str, wide: str, budget: int) -> None:
        self.url, self.name, self.wide, self.budget = url, name, wide, budget
        self.spec = parse_schedule(STEP_LR, n_groups=GROUPS)
        self.fits = cost.steps_within(self.spec, n_groups=GROUPS, budget=budget)
        self.times_ms: list[float] = []
        self.units = 0
        self.count = 0
        self.big = _Discarding(url)
        self.first_metric_step = 0  # history: the first step the run has no `attack` record at

    def start(self, http: httpx.Client) -> None:
        if self.name in ("history", "kept history"):
            shown = http.get(f"/v1/runs/{self.wide}/history", params={"max_points": 1}).json()
            self.first_metric_step = shown["metrics"].get("attack", {"steps": [-1]})["steps"][-1] + 1

    def one(self, http: httpx.Client) -> None:
        t0 = time.perf_counter()
        if self.name == "window":
            horizon = http.get(f"/v1/runs/{self.wide}").json()["horizon"]
            started = time.perf_counter()
            params = {"step": horizon + 1, "ahead": 10_000}
            self.big.request("GET", f"/v1/runs/{self.wide}/lr", params=params)
            self.units = cost.cost(self.spec, n_groups=GROUPS, steps=self.fits)
            t0 = started
        elif self.name == "step jump":
            horizon = http.get(f"/v1/runs/{self.wide}").json()["horizon"]
            started = time.perf_counter()
            http.post(f"/v1/runs/{self.wide}/step", json={"step": horizon + self.fits}).raise_for_status()
            self.units = cost.cost(self.spec, n_groups=GROUPS, steps=self.fits)
            t0 = started
        elif self.name == "preview":
            body = {"schedule": STEP_LR, "base_lrs": [0.1] * GROUPS, "steps": self.fits}
            self.big.request("POST", "/v1/schedules/preview", json=body)
            self.units = cost.cost(self.spec, n_groups=GROUPS, steps=self.fits)
        elif self.name == "history":
            points = cost.history_points(n_groups=GROUPS, series=1, budget=self.budget)
            record = {"step": self.first_metric_step + self.count, "name": "attack", "value": 1.0, "rank": 0}
            posted = http.post(f"/v1/runs/{self.wide}/metrics", json={"records": [record]})
            posted.raise_for_status()
            if posted.json()["new"] != 1:
                raise RuntimeError(f"metric record {record} was not new: the history would be a kept one")
            t0 = time.perf_counter()
            self.big.request("GET", f"/v1/runs/{self.wide}/history", params={"max_points": points})
            self.units = cost.history_cost(n_groups=GROUPS, points=points, series=1, read=2 * (points + 1))
        elif self.name == "kept history":
            points = cost.history_points(n_groups=GROUPS, series=1, budget=self.budget)
            t0 = time.perf_counter()
            self.big.request("GET", f"/v1/runs/{self.wide}/history", params={"max_points": points})
            self.units = cost.history_cost(n_groups=GROUPS, points=points, series=1, read=2 * (points + 1))
        elif self.name == "create":
            lambdas = [f"{i + 1}/({i + 1}+step)" + "+0*step" * 5 for i in range(GROUPS)]
            schedule = {"type": "LambdaLR", "lr_lambda": lambdas}
            body = {"run_id": f"attack-create-{self.count}", "schedule": schedule, "base_lrs": [0.1] * GROUPS}
            http.post("/v1/runs", json=body).raise_for_status()
            self.units = cost.cost(parse_schedule(schedule, n_groups=GROUPS), n_groups=GROUPS,
                                   steps=cost.CREATE_STEPS)
        self.times_ms.append((time.perf_counter() - t0) * 1000)
        self.count += 1


def _loop(url: str, stop: threading.Event, work: Any, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            work(http)
            out.append((time.perf_counter() - t0) * 1000)


def _attack(url: str, name: str, wide: str, budget: int, ready: Any, stop: Any, out: Any) -> None:
    """The attacker's loop, in a process of its own: reading its answers (megabytes of JSON)
    in the victim's process would slow the victim by that process's GIL, not the server's."""
    attacker = _Attacker(url, name, wide, budget)
    with httpx.Client(base_url=url, timeout=120) as http:
        attacker.start(http)
        ready.set()
        while not stop.is_set():
            attacker.one(http)
    attacker.big.close()
    out.put({"times_ms": attacker.times_ms, "units": attacker.units})


def _scenario(url: str, attack: str | None, budget: int, seconds: float, victim: str) -> dict[str, Any]:
    stop = threading.Event()
    steps: list[float] = []
    health: list[float] = []
    counter = {"step": victim_horizon(url, victim)}

    def step(http: httpx.Client) -> None:
        counter["step"] += 1
        http.post(f"/v1/runs/{victim}/step", json={"step": counter["step"]}).raise_for_status()

    def healthz(http: httpx.Client) -> None:
        http.get("/healthz").raise_for_status()
        time.sleep(0.002)  # a probe, not a load

    threads = [threading.Thread(target=_loop, args=(url, stop, step, steps)),
               threading.Thread(target=_loop, args=(url, stop, healthz, health))]
    attacker = None
    if attack is not None:
        spawn = multiprocessing.get_context("spawn")
        ready, attack_stop, out = spawn.Event(), spawn.Event(), spawn.Queue()
        attacker = spawn.Process(target=_attack, args=(url, attack, "wide", budget, ready, attack_stop, out))
        attacker.start()
        if not ready.wait(120):
            raise RuntimeError("the attacker process did not start")
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    row: dict[str, Any] = {
        "attacker": attack or "none",
        "step_p50_ms": percentile(steps, 50), "step_p99_ms": p99(steps),
        "healthz_p50_ms": percentile(health, 50), "healthz_p99_ms": p99(health),
        "step_max_ms": max(steps, default=math.nan), "healthz_max_ms": max(health, default=math.nan),
        "steps": len(steps), "step_over_ms": sum(1 for t in steps if t > TARGET_MS),
    }
    if attacker is not None:
        attack_stop.set()
        done = out.get(timeout=300)
        attacker.join(60)
        if done["times_ms"]:
            row["worst_ms"] = statistics.median(done["times_ms"])
            row["worst_units"] = done["units"]
            row["worst_count"] = len(done["times_ms"])
    return row


def victim_horizon(url: str, run_id: str) -> int:
    return httpx.get(f"{url}/v1/runs/{run_id}", timeout=60).json()["horizon"]


COLUMNS = [("backend", "backend"), ("attacker", "worst request running"), ("step_p50_ms", "step p50 ms"),
           ("step_p50_vs_none", "step p50 vs none"), ("step_p99_ms", "step p99 ms"),
           ("step_vs_none", "step p99 vs none"), ("step_max_ms", "step max ms"),
           ("healthz_p50_ms", "healthz p50 ms"), ("healthz_p99_ms", "healthz p99 ms"),
           ("healthz_vs_none", "healthz p99 vs none"), ("healthz_p50_vs_none", "healthz p50 vs none"),
           ("healthz_max_ms", "healthz max ms"),
           ("worst_ms", "worst request ms"),
           ("worst_units", "its work units"), ("worst_count", "worst requests"), ("steps", "victim steps"),
           ("rounds", "rounds"), ("baseline_spread", "baseline p99 max / min")]


def _prepare(url: str) -> None:
    """The victim's run and the 1024-group run the attackers use, with points for history."""
    with httpx.Client(base_url=url, timeout=120) as http:
        http.post("/v1/runs", json={"run_id": "victim", "schedule": STEP_LR, "base_lrs": [0.1]})
        http.post("/v1/runs", json={"run_id": "wide", "schedule": STEP_LR, "base_lrs": [0.1] * GROUPS})
        while http.get("/v1/runs/wide").json()["horizon"] < 2_000:  # history has points to show
            horizon = http.get("/v1/runs/wide").json()["horizon"]
            http.get("/v1/runs/wide/lr", params={"step": horizon + 1, "ahead": 10_000}).raise_for_status()


ATTACKS = ("window", "step jump", "preview", "history", "create")


def _scenarios(url: str, budget: int, seconds: float, rounds: int) -> list[dict[str, Any]]:
    """Every scenario against one server in ``rounds`` rotated rounds, the baseline (no
    attacker) in each: a row per scenario, its p50s and p99s the medians over rounds, its
    ratios the median of each round's ratio to that round's baseline (the machine drifts
    within a run: a baseline taken once, before and after, moved 1.4-2x here), its maxes the
    worst of all rounds; the baseline's row also says how far its own p99 moved."""
    _prepare(url)
    names = ["none", *ATTACKS]
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for turn in rotations(names, rounds):
        for name in turn:
            got[name].append(_scenario(url, None if name == "none" else name, budget, seconds, "victim"))
    base = got["none"]
    rows = []
    for name in names:
        runs = got[name]
        row: dict[str, Any] = {"attacker": name, "rounds": len(runs), "steps": sum(r["steps"] for r in runs)}
        for what in ("step", "healthz"):
            for stat in ("p50", "p99"):
                row[f"{what}_{stat}_ms"] = statistics.median(r[f"{what}_{stat}_ms"] for r in runs)
            row[f"{what}_max_ms"] = max(r[f"{what}_max_ms"] for r in runs)
            for stat, key in (("p99", f"{what}_vs_none"), ("p50", f"{what}_p50_vs_none")):
                ratios = [r[f"{what}_{stat}_ms"] / b[f"{what}_{stat}_ms"]
                          for r, b in zip(runs, base, strict=True) if b[f"{what}_{stat}_ms"]]
                row[key] = statistics.median(ratios) if ratios else None
        if name == "none":
            lowest = min(r["step_p99_ms"] for r in runs)
            row["baseline_spread"] = max(r["step_p99_ms"] for r in runs) / lowest if lowest else None
        if runs and "worst_ms" in runs[0]:
            row["worst_ms"] = statistics.median(r["worst_ms"] for r in runs)
            row["worst_units"] = runs[0]["worst_units"]
            row["worst_count"] = sum(r["worst_count"] for r in runs)
        rows.append(row)
    return rows


def _rounds(size: Size) -> int:
    return {"tiny": 1, "quick": 1}.get(size.name, 3)


def run(size: Size, work: Path, pool: Pool) -> dict[str, Any]:
    budget = Settings().work_budget
    seconds, rounds = _seconds(size), _rounds(size)
    rows = []
    with pool.sqlite("budgets") as server:
        url = f"http://127.0.0.1:{server.port}"
        rows += [{"backend": "sqlite", **r} for r in _scenarios(url, budget, seconds, rounds)]
    notes = []
    problem = pg_problem()
    if problem is None:
        with pool.postgres() as servers:
            url = f"http://127.0.0.1:{servers[1].port}"
            rows += [{"backend": "postgres", **r} for r in _scenarios(url, budget, seconds, rounds)]
    else:
        notes.append(f"PostgreSQL rows skipped: {problem}")
    attacked = [r for r in rows if "worst_ms" in r]
    holds = all(  # a ratio without a baseline (its p99 0) does not hold
        (r["step_vs_none"] or math.inf) <= TARGET_RATIO and (r["healthz_vs_none"] or math.inf) <= TARGET_RATIO
        and r["step_p99_ms"] <= TARGET_MS and r["healthz_p99_ms"] <= TARGET_MS
        for r in attacked
    )
    return report.figure(
        NAME, TITLE,
        ran=f"lrserve under uvicorn, 1 process, SQLite then PostgreSQL, default settings (work budget "
            f"{budget}); each scenario {seconds:g} s in each of {rounds} rotated rounds, the baseline "
            f"(none) in each: a victim run stepped one commit at a time, /healthz probed, and one client "
            f"repeating the worst request of one budget on a {GROUPS}-group run",
        target=f"step and /healthz p99 <= {TARGET_RATIO:g} x the baseline's and <= {TARGET_MS:g} ms",
        holds=holds, columns=COLUMNS, rows=rows,
        notes=[
            "worst request ms: the attacker's own requests (median), server time plus one loopback "
            "round trip: the README's 'worst allowed request per route'",
            "the victim and the probe are threads of this process, the attacker a process of its own "
            "(its answers, megabytes of JSON, read beside the victim would slow it by this process's GIL); "
            "all share the 2 cores with the server",
            "the attacker reads every byte of its big answers into one reused buffer, unparsed (httpx's "
            "reading of a 10 MB answer: ~15 ms of CPU on the server's cores; a socket read: ~5 ms); each "
            "history is built anew (its metric record checked new)",
            *notes,
        ],
    )


def side_by_side(other: Path, attacks: list[str], rounds: int, seconds: float, backend: str, *,
                 workers: int = 1, hogs: int = 0, this_env: dict[str, str] | None = None,
                 other_env: dict[str, str] | None = None) -> None:
    """This tree and ``other``, each scenario of ``attacks`` ("none" the baseline) in rotated rounds;
    each server of ``workers`` processes with ``hogs`` busy-looping processes in its session
    (``bench/hogs.py``); ``this_env``, ``other_env``: more environment for each tree's server
    (``other`` may be this tree: the same code under other settings)."""
    budget = Settings().work_budget
    trees = ("this", "other")
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with workdir() as work, contextlib.ExitStack() as stack:
        servers = {}
        for tree in trees:
            db = sqlite_url(work, tree) if backend == "sqlite" else stack.enter_context(pg_schema())
            code = other if tree == "other" else None
            env = other_env if tree == "other" else this_env
            servers[tree] = Server(db, work, name=tree, tree=code, workers=workers, hogs=hogs, env=env)
            stack.callback(servers[tree].stop)
            servers[tree].start(timeout=600)  # beside hogs on a busy machine: minutes
            _prepare(servers[tree].url)
        order = [(tree, attack) for attack in attacks for tree in trees]
        for r, turn in enumerate(rotations(order, rounds)):
            for tree, attack in turn:
                attacker = None if attack == "none" else attack
                server = servers[tree]
                main = server.proc.pid if server.proc else 0  # no /proc/0: 0.0 s
                began = time.perf_counter(), process_cpu_seconds(main) or 0.0, server.cpu_seconds()
                row = _scenario(server.url, attacker, budget, seconds, "victim")
                row["wall_s"] = time.perf_counter() - began[0]
                row["cpu_s"] = (process_cpu_seconds(main) or 0.0) - began[1]
                row["all_cpu_s"] = server.cpu_seconds() - began[2]
                rows.setdefault((tree, attack), []).append(row)
            print(f"round {r + 1}/{rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    envs = (("this", this_env), ("other", other_env))
    settings = "".join(f", {tree}'s env {env}" for tree, env in envs if env)
    print(f"this tree vs {other}{settings}, {backend}, --workers {workers}, {hogs} hogs in each server's "
          f"session, {rounds} rotated rounds of {seconds:g} s per scenario; p99 and max ms (medians over "
          "rounds) and the p99's ratio to the same tree's baseline (median of rounds); max: median/worst "
          f"of rounds; the victim's steps over {TARGET_MS:g} ms, all rounds")
    for attack in attacks:
        for tree in trees:
            got, base = rows[(tree, attack)], rows[(tree, "none")]
            line = [f"{attack:10} {tree:5}"]
            for what in ("step", "healthz"):
                ratios = [a[f"{what}_p99_ms"] / b[f"{what}_p99_ms"] for a, b in zip(got, base, strict=True)]
                line.append(f"{what} p50 {statistics.median(r[f'{what}_p50_ms'] for r in got):6.2f} "
                            f"p99 {statistics.median(r[f'{what}_p99_ms'] for r in got):6.2f} "
                            f"({statistics.median(ratios):.2f}x) "
                            f"max {statistics.median(r[f'{what}_max_ms'] for r in got):6.1f}"
                            f"/{max(r[f'{what}_max_ms'] for r in got):.0f}")
            over, steps = (sum(r[key] for r in got) for key in ("step_over_ms", "steps"))
            line.append(f"steps over {TARGET_MS:g} ms {over}/{steps}")
            if "worst_ms" in got[0]:
                line.append(f"worst {statistics.median(r['worst_ms'] for r in got):.0f} ms, "
                            f"{statistics.median(r['worst_count'] / r['wall_s'] for r in got):.1f}/s")
            cores = [statistics.median(r[key] / r["wall_s"] for r in got) for key in ("cpu_s", "all_cpu_s")]
            line.append(f"server cpu {cores[0]:.2f} cores (+workers {cores[1]:.2f})")
            print("  ".join(line))


def main() -> None:
    parser = argparse.ArgumentParser(description="figure 7's scenarios, this tree and another side by side")
    parser.add_argument("other", type=Path, help="the root of another checkout of the repository")
    parser.add_argument("--attacks", default="none,history", help="comma-separated; none: the baseline")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--workers", type=int, default=1, help="server processes (--workers) of each server")
    parser.add_argument("--hogs", type=int, default=0,
                        help="busy-looping processes at nice 0 in each server's session (its CPU group)")
    for tree in ("this", "other"):
        parser.add_argument(f"--{tree}-env", action="append", default=[], metavar="NAME=VALUE",
                            help=f"an environment variable for the {tree} tree's server (repeatable); OTHER "
                            "may be this tree (.): the same code under another setting")
    args = parser.parse_args()
    this_env, other_env = (dict(pair.split("=", 1) for pair in e) for e in (args.this_env, args.other_env))
    attacks = args.attacks.split(",")
    if "none" not in attacks:
        attacks.insert(0, "none")
    side_by_side(args.other.resolve(), attacks, args.rounds, args.seconds, args.backend,
                 workers=args.workers, hogs=args.hogs, this_env=this_env, other_env=other_env)


if __name__ == "__main__":
    main()
