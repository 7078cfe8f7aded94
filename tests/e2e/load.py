"""Concurrent load on one or more real servers sharing a database, and the ledger that checks it.

Ranks step runs through ``POST .../step`` (plateau metrics, the metric barrier), an
operator acts on them, a logger posts history metrics, readers fetch windows of final
values. Requests go to the replica a rank picks and fail over to the next one when that
one is down, as a load balancer would. The ``Ledger`` keeps every answer and every
acknowledgement, so a test can assert API.md's rules over all of them:

- finality: every ``(run, step)`` ever answered carries identical values in every answer;
- ranks agree: every rank got the same values at every step;
- nothing acknowledged is lost: every 202'd metric and 200'd action is in history.
"""

from __future__ import annotations

import math
import random
import reprlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.specs import plateau_on_any_rise, warmup_then

PLATEAU_AFTER_WARMUP = warmup_then(plateau_on_any_rise(factor=0.8, patience=1), steps=4, start_factor=0.25)
ACTIONS = ({"action": "scale", "factor": 0.9}, {"action": "hold"}, {"action": "resume"},
           {"action": "set_lr", "lr": 0.05}, {"action": "scale", "factor": 1.1})
# Actions that leave the schedule's clock running: a held run feeds no metric to its plateau
# stage, so a run whose plateau decisions a test expects must not be held for a
# timing-dependent share of its steps (test_replicas' "bar" once had none, issue 13).
CLOCK_RUNNING_ACTIONS = tuple(a for a in ACTIONS if a["action"] not in ("hold", "resume"))


def loss(run_id: str, rank: int, step: int) -> float:
    """A noisy, slowly improving loss: enough plateaus for several reductions."""
    seed = sum(map(ord, run_id)) * 7919 + rank * 104729 + step
    return 1.0 / math.sqrt(step) + random.Random(seed).uniform(0.0, 0.4)


class Cluster:
    """HTTP clients for every replica; a request fails over to the next replica when one is down.

    Each thread should build its own ``Cluster`` (own connections).
    """

    def __init__(
        self, urls: Sequence[str], *, keepalive: bool = True, headers: dict[str, str] | None = None
    ) -> None:
        limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
        self.clients = [
            httpx.Client(base_url=url, timeout=60, limits=limits, headers=headers) for url in urls
        ]

    def call(
        self, replica: int, method: str, path: str, *, retry: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """Send to ``replica``; on a transport error try the others (if ``retry``), then raise."""
        n = len(self.clients)
        last: Exception | None = None
        for attempt in range(3 * n if retry else 1):
            try:
                return self.clients[(replica + attempt) % n].request(method, path, **kwargs)
            except httpx.TransportError as exc:  # down, or killed mid-request
                last = exc
                time.sleep(0.05)
        assert last is not None
        raise last

    def close(self) -> None:
        for client in self.clients:
            client.close()


@dataclass
class Ledger:
    """Every answer and acknowledgement the load received, checked as they come."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    values: dict[tuple[str, int], Any] = field(default_factory=dict)
    violations: list[Any] = field(default_factory=list)
    by_rank: dict[tuple[str, int], dict[int, Any]] = field(default_factory=lambda: defaultdict(dict))
    metrics: set[tuple[str, str, int, int]] = field(default_factory=set)  # run, name, step, rank
    controls: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)  # run, applied_at, action
    errors: list[str] = field(default_factory=list)
    unacknowledged: int = 0  # requests lost to a killed replica (not retried: not idempotent)

    def answer(self, run_id: str, body: dict[str, Any]) -> None:
        """Keep a window of final values; any step answered differently before is a violation."""
        window = body["window"]
        moms = window["momentums"] or [None] * len(window["lrs"])
        with self.lock:
            for i, row in enumerate(zip(window["lrs"], moms, strict=True)):
                key = (run_id, window["start"] + i)
                first = self.values.setdefault(key, row)
                if first != row:
                    self.violations.append((key, first, row))

    def stepped(self, run_id: str, rank: int, k: int, response: httpx.Response,
                metrics: Iterable[str] = ()) -> bool:
        """Keep one rank's ``POST .../step`` answer for step ``k``; ``False`` (an error kept) unless 200."""
        if response.status_code != 200:
            self.fail(f"rank {rank} step {k} of {run_id}", response)
            return False
        body = response.json()
        self.answer(run_id, body)
        with self.lock:
            self.by_rank[(run_id, rank)][k] = body["lrs"]
            self.metrics.update((run_id, name, k, rank) for name in metrics)
        return True

    def horizon(self, run_id: str) -> int:
        with self.lock:
            return max((step for run, step in self.values if run == run_id), default=0)

    def progress(self, run_id: str, rank: int) -> int:
        with self.lock:
            return max(self.by_rank[(run_id, rank)], default=0)

    def fail(self, what: str, response: httpx.Response) -> None:
        with self.lock:
            self.errors.append(f"{what}: {response.status_code} {response.text[:300]}")


@dataclass
class Load:
    """The load threads of one test, bounded by step counts and a deadline."""

    urls: Sequence[str]
    ledger: Ledger
    deadline: float
    keepalive: bool = True
    headers: dict[str, str] | None = None  # e.g. the jobs' bearer token
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def spawn(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=self._guarded, args=(target, *args), daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def finish(self, ranks: Sequence[threading.Thread]) -> None:
        """Wait for the ranks to take their steps, then stop the other threads."""
        for thread in ranks:
            thread.join(max(0.0, self.deadline - time.monotonic()) + 30)
        self.stop.set()
        self.join()

    def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until ``condition()`` or the deadline (the load's own checks say what went wrong)."""
        while not condition() and not self.over():
            time.sleep(0.02)

    def _guarded(self, target: Callable[..., None], *args: Any) -> None:
        cluster = Cluster(self.urls, keepalive=self.keepalive, headers=self.headers)
        try:
            target(cluster, *args)
        except Exception as exc:  # noqa: BLE001 - a crash in a load thread must fail the test, not vanish
            with self.ledger.lock:
                # reprlib: an argument holding the ledger must not copy every earlier error into this one
                self.ledger.errors.append(f"{target.__name__}{reprlib.repr(args)}: {exc!r}")
        finally:
            cluster.close()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(max(0.0, self.deadline - time.monotonic()) + 30)
        assert not any(t.is_alive() for t in self.threads), "load threads did not finish"

    def over(self) -> bool:
        return self.stop.is_set() or time.monotonic() > self.deadline

    # -- the load ---------------------------------------------------------------------------

    def rank(self, cluster: Cluster, run_id: str, rank: int, steps: int, replica_of: Callable[[int], int],
             report: bool = True, midway: Callable[[], bool] | None = None) -> None:
        """One training rank: ``POST .../step`` for steps 1..steps, with its own plateau metric.

        With ``midway``, the rank waits halfway until ``midway()`` is true: what the test
        needs to happen while the run is live (operator actions) then does, however fast
        the server takes the steps.
        """
        for k in range(1, steps + 1):
            if midway is not None and k == steps // 2:
                self.wait_for(midway)
            if self.over():
                return
            metrics = {"val_loss": loss(run_id, rank, k)} if report else {}
            response = cluster.call(replica_of(k), "POST", f"/v1/runs/{run_id}/step",
                                    json={"step": k, "rank": rank, "metrics": metrics})
            if not self.ledger.stepped(run_id, rank, k, response, metrics):
                return

    def operator(self, cluster: Cluster, run_ids: Sequence[str], pause_s: float,
                 actions: dict[str, Sequence[dict[str, Any]]] | None = None) -> None:
        """Operator actions on every run, through alternating replicas, until the load ends.

        ``actions[run_id]`` replaces ``ACTIONS`` for that run.
        """
        for i in range(10_000):
            if self.over():
                return
            run_id = run_ids[i % len(run_ids)]
            choices = (actions or {}).get(run_id, ACTIONS)
            action = choices[(i // len(run_ids)) % len(choices)]
            try:  # not idempotent: never retried on another replica
                response = cluster.call(i % len(self.urls), "POST", f"/v1/runs/{run_id}/control",
                                        json=action, retry=False)
            except httpx.TransportError:
                with self.ledger.lock:
                    self.ledger.unacknowledged += 1
                continue
            if response.status_code != 200:
                self.ledger.fail(f"control {action} on {run_id}", response)
                return
            with self.ledger.lock:
                self.ledger.controls.append((run_id, response.json()["applied_at"], action))
            time.sleep(pause_s)

    def logger(self, cluster: Cluster, run_ids: Sequence[str]) -> None:
        """History-only metrics in small batches (idempotent: retried on another replica)."""
        for i in range(10_000):
            if self.over():
                return
            run_id = run_ids[i % len(run_ids)]
            records = [{"step": i, "name": "train_loss", "value": 1.0 / (i + 1), "rank": r} for r in (0, 1)]
            response = cluster.call(i % len(self.urls), "POST", f"/v1/runs/{run_id}/metrics",
                                    json={"records": records})
            if response.status_code != 202:
                self.ledger.fail(f"metrics of {run_id}", response)
                return
            with self.ledger.lock:
                self.ledger.metrics.update((run_id, "train_loss", i, r) for r in (0, 1))
            time.sleep(0.01)

    def reader(self, cluster: Cluster, run_ids: Sequence[str], seed: int) -> None:
        """Windows of steps already handed out, from random replicas (the hot path)."""
        rng = random.Random(seed)
        while not self.over():
            run_id = rng.choice(run_ids)
            top = self.ledger.horizon(run_id)
            start = rng.randrange(0, top + 1)
            response = cluster.call(rng.randrange(len(self.urls)), "GET", f"/v1/runs/{run_id}/lr",
                                    params={"step": start, "ahead": top - start})
            if response.status_code != 200:
                self.ledger.fail(f"window {start} of {run_id}", response)
                return
            self.ledger.answer(run_id, response.json())
            time.sleep(0.005)


def create_run(url: str, run_id: str, world_size: int) -> None:
    body = {"run_id": run_id, "schedule": PLATEAU_AFTER_WARMUP, "base_lrs": [0.1, 0.02],
            "world_size": world_size}
    response = httpx.post(f"{url}/v1/runs", json=body, timeout=30)
    assert response.status_code in (200, 201), response.text


def check_everything(urls: Sequence[str], ledger: Ledger, run_ids: Sequence[str], ranks: int = 2) -> None:
    """After the load: API.md's rules over every answer, and every replica agreeing with them."""
    assert ledger.errors == [], ledger.errors[:5]
    assert ledger.violations == [], f"{len(ledger.violations)} finality violations: {ledger.violations[:5]}"
    for run_id in run_ids:
        per_rank = [ledger.by_rank[(run_id, r)] for r in range(ranks)]
        for step in set(per_rank[0]) & set(per_rank[1]):
            assert per_rank[0][step] == per_rank[1][step], f"ranks of {run_id} differ at step {step}"
        horizon = ledger.horizon(run_id)
        finals = []
        for url in urls:
            body = httpx.get(f"{url}/v1/runs/{run_id}/lr", params={"step": 0, "ahead": horizon},
                             timeout=60).json()
            ledger.answer(run_id, body)  # every replica, now: the same values as every answer
            finals.append(body["window"]["lrs"])
            history = httpx.get(f"{url}/v1/runs/{run_id}/history", params={"max_points": 100_000},
                                timeout=60).json()
            _check_history(run_id, history, ledger)
        assert all(f == finals[0] for f in finals), f"replicas disagree on {run_id}"
    assert ledger.violations == [], f"{len(ledger.violations)} finality violations: {ledger.violations[:5]}"


def _check_history(run_id: str, history: dict[str, Any], ledger: Ledger) -> None:
    stored = {(run_id, name, step, rank) for name, series in history["metrics"].items()
              for step, rank in zip(series["steps"], series["ranks"], strict=True)}
    acknowledged = {m for m in ledger.metrics if m[0] == run_id}
    assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
    controls = [(e["step"], e["action"]) for e in history["events"] if e["kind"] == "control"]
    for run, applied_at, action in ledger.controls:
        if run == run_id:
            assert (applied_at, action["action"]) in controls, (applied_at, action)
