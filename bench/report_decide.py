"""Figure 3: one reported metric and its decision, lrserve against Optuna's gRPC storage proxy.

The same client pattern for both: one client process making sequential calls, the
variants taking turns in rotated rounds, every call timed on its own.

- **lrserve**: ``LRClient.step_run(run, k, metrics={"val_loss": v})`` on a
  ``ReduceLROnPlateau`` run: one ``POST .../step``; the answer is step k's LR, decided by v
  and durable (SQLite) before it is sent.
- **optuna**: ``trial.report(v, k)`` then ``trial.should_prune()`` (``MedianPruner``, with
  completed trials in the study so the pruner really compares) through
  ``GrpcStorageProxy`` to ``run_grpc_proxy_server``, over RDB storage on SQLite (durable,
  the like-for-like variant), and over in-memory storage (Optuna at its fastest).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import report
from bench.servers import Pool, free_port
from bench.sizes import Size
from bench.stats import median, percentile, rotations

NAME = "report_decide"
TITLE = "Figure 3: report a metric and get the decision, lrserve vs Optuna gRPC proxy"
TARGET = 0.5
LONG_TARGET = 1.1
"""Target 3 (issue 15): report-and-decide at step 100,000 within this of step 1,000."""
SHORT, LONG = 1_000, 100_000
JUMP = 10_000
SEEDED_STEPS = 20
LR = "lrserve (SQLite)"
LR_LONG = "lrserve (SQLite), run at step 100,000"


@contextlib.contextmanager
def optuna_proxy(storage: str, log_dir: Path) -> Iterator[int]:
    """Start ``bench._optuna_proxy``; yields its port once it answers."""
    port = free_port()
    log = open(log_dir / f"optuna-{port}.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "bench._optuna_proxy", "--port", str(port),
                             "--storage", storage], stdout=log, stderr=log, start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)
    log.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the Optuna proxy exited: {(log_dir / f'optuna-{port}.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the Optuna proxy did not start in 60 s")
            time.sleep(0.05)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_seconds(port: int, route: str = "/v1/runs/{run_id}/step",
                   method: str = "POST") -> tuple[float, float]:
    """(sum of seconds, count) of lrserve's request histogram for ``method route``, from /metrics."""
    from bench.servers import http_get

    _, body = http_get(port, "/metrics")
    total = count = 0.0
    labels = f'method="{method}",route="{route}"'
    for line in body.decode().splitlines():
        if labels in line:
            if line.startswith("lrserve_request_seconds_sum"):
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith("lrserve_request_seconds_count"):
                count = float(line.rsplit(" ", 1)[1])
    return total, count


def _value(k: int) -> float:
    return 1.0 / (1 + k % 13)


def optuna_caller(port: int, seeded: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A study with ``seeded`` completed trials and a running one; the per-step call."""
    import optuna
    from optuna.storages import GrpcStorageProxy

    optuna.logging.set_verbosity(logging.WARNING)
    with warnings.catch_warnings():  # GrpcStorageProxy is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = GrpcStorageProxy(host="127.0.0.1", port=port)
    study = optuna.create_study(storage=storage, study_name=f"bench-{uuid.uuid4().hex[:8]}",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    for t in range(seeded):
        trial = study.ask()
        for step in range(SEEDED_STEPS):
            trial.report(_value(step + t), step)
        study.tell(trial, _value(t))
    trial = study.ask()

    def call(k: int) -> None:
        trial.report(_value(k), k)
        trial.should_prune()

    return call, storage.close


def lrserve_caller(url: str, start: int = 0) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A plateau run taken to step ``start`` first; the call reports at ``start + k``."""
    from lrserve.client import LRClient

    api = LRClient(url)
    run_id = f"decide-{uuid.uuid4().hex[:8]}"
    api.create_run({"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 2}, [0.1], run_id=run_id)
    for step in range(JUMP, start + 1, JUMP):  # the server's max_jump per request
        api.step_run(run_id, step)

    def call(k: int) -> None:
        api.step_run(run_id, start + k, metrics={"val_loss": _value(k)})

    return call, api.close


COLUMNS = [("variant", "variant"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("mean_ms", "mean ms"),
           ("lrserve_vs", "lrserve p50 / this p50"), ("calls", "calls")]


def run(size: Size, work: Path, pool: Pool) -> dict[str, Any]:
    try:
        import grpc  # noqa: F401
        import optuna  # noqa: F401
        from optuna.storages import GrpcStorageProxy  # noqa: F401
    except ImportError as exc:
        return report.skipped(NAME, TITLE, f"needs optuna with its gRPC proxy (pip install optuna grpcio "
                                           f"protobuf): {exc}")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(pool.sqlite("decide"))
        rdb_port = stack.enter_context(optuna_proxy(f"sqlite:///{work / 'optuna.db'}", work))
        mem_port = stack.enter_context(optuna_proxy("memory", work))
        callers = {
            LR: lrserve_caller(server.url, SHORT),
            LR_LONG: lrserve_caller(server.url, LONG),
            "optuna gRPC (SQLite RDB)": optuna_caller(rdb_port, size.report_seeded_trials),
            "optuna gRPC (in-memory)": optuna_caller(mem_port, size.report_seeded_trials),
        }
        for _, close in callers.values():
            stack.callback(close)
        step = {name: 0 for name in callers}
        for name, (call, _) in callers.items():  # warm-up: connections, caches, first plan
            for _ in range(5):
                step[name] += 1
                call(step[name])
        latencies: dict[str, list[float]] = {name: [] for name in callers}
        server_before = server_seconds(server.port)
        for order in rotations(list(callers), size.report_rounds):
            for name in order:
                call = callers[name][0]
                for _ in range(size.report_calls):
                    step[name] += 1
                    t0 = time.perf_counter()
                    call(step[name])
                    latencies[name].append((time.perf_counter() - t0) * 1e3)
        server_after = server_seconds(server.port)
    lr_p50 = median(latencies[LR])
    rows = []
    for name, ms in latencies.items():
        p50 = median(ms)
        rows.append({"variant": name, "p50_ms": p50, "p99_ms": percentile(ms, 99),
                     "mean_ms": sum(ms) / len(ms), "lrserve_vs": lr_p50 / p50, "calls": len(ms)})
    calls = server_after[1] - server_before[1]
    server_mean = (server_after[0] - server_before[0]) / calls * 1e3 if calls else float("nan")
    rows.insert(2, {"variant": "  lrserve inside the server (mean of both runs, /metrics)",
                    "mean_ms": server_mean, "calls": int(calls)})
    ratio = {row["variant"]: row.get("lrserve_vs") for row in rows}
    durable, in_memory = ratio["optuna gRPC (SQLite RDB)"], ratio["optuna gRPC (in-memory)"]
    longer = median(latencies[LR_LONG]) / lr_p50
    return report.figure(
        NAME, TITLE,
        ran=f"one client process, sequential calls, {size.report_rounds} rotated rounds x "
            f"{size.report_calls} calls per variant; lrserve: `lrserve serve` (SQLite, 1 process) "
            f"via client.LRClient; Optuna {_optuna_version()}: run_grpc_proxy_server + GrpcStorageProxy, "
            f"MedianPruner, {size.report_seeded_trials} completed trials of {SEEDED_STEPS} steps",
        target=f"lrserve p50 <= {TARGET} x Optuna's, durable and in-memory (issue 15, target 1); "
               f"at step {LONG:,} <= {LONG_TARGET} x at step {SHORT:,} (target 3)",
        holds=durable <= TARGET and in_memory <= TARGET and longer <= LONG_TARGET,
        columns=COLUMNS, rows=rows,
        notes=[f"lrserve vs Optuna: durable (SQLite RDB) {durable:.3f}, in-memory {in_memory:.3f}; "
               f"lrserve at step {LONG:,} / at step {SHORT:,}: {longer:.3f}",
               "optuna per step = trial.report() + trial.should_prune(); lrserve per step = one POST "
               ".../step with the metric (decision and durable commit included)",
               "'inside the server': lrserve's own request histogram (TelemetryMiddleware) over the same "
               "calls; the rest of lrserve's mean is the client (LRClient over http.client), loopback and "
               "the event loop"],
    )


def _optuna_version() -> str:
    import optuna

    return optuna.__version__
