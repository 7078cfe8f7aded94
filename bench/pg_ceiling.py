"""The ceiling of figure 5's commit load on PostgreSQL: lrserve's own commit, run by pgbench.

One commit of the commit load (a request that makes a new step final, no events) is one
transaction on PostgreSQL: ``BEGIN``, the run's row under its lock (``_LOCKED_ROWS["hold"]``
in ``service/store/sql.py``), the run's ``UPDATE`` (``_UPDATE_RUN``) and ``COMMIT``, as
PostgreSQL's log shows for such a request. pgbench runs exactly those statements, as
SQLAlchemy compiles them for psycopg, on a fresh schema that lrserve itself migrated (same
tables, same indexes), one run row per client, with the server's settings as they are
(``synchronous_commit`` on by default: each COMMIT waits for its WAL flush). So it is what
the same transactions cost with no HTTP, no Python and a load generator in C: the most
commits/s this machine's PostgreSQL gives at that concurrency.

``pipelined`` sends them as lrserve does (``service.store.pg_pipeline``: two flushes, ``BEGIN`` with the
locked row, then the ``UPDATE`` with ``COMMIT``), else one statement per round trip;
``protocol`` is pgbench's ``-M``: ``simple``, ``extended`` or ``prepared`` (psycopg prepares a
statement on a connection from its 5th execution, so lrserve under load is ``prepared``;
pgbench pipelines only the extended protocols). The values: the client's number as its
run's id, a random horizon per transaction, constants for the rest.

Besides the rate, each run reports the CPU that its database sessions and pgbench itself
spent per commit (``/proc``; sessions found by their process title on the URL's
database, so a database of its own, ``LRSERVE_BENCH_PG``, keeps other users' sessions out):
what is left of the machine's cores for lrserve and its load generator at a given rate.

``python -m bench.pg_ceiling [--clients 32 64 ...] [--seconds 5] [--rounds 1]``: every
variant at each client count. Figure 5 (``bench.backends``) runs lrserve's variant beside
the servers' commit load, in the same rotated rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.servers import pg_base_url, pg_schema, process_cpu_seconds
from bench.stats import percentile

PROTOCOLS = ("simple", "extended", "prepared")
_UPDATED_AT = "2026-01-01 00:00:00+00"  # a constant: the value's size costs, not its time


def pgbench_path() -> str | None:
    """pgbench on PATH, else the newest in Debian's ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which("pgbench")
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return str(versions[-1]) if versions else None


def commit_statements() -> list[str]:
    """The commit's locked read and its UPDATE as lrserve sends them, with pgbench variables for
    the values: ``:client_id`` (pgbench's number of the client: its run's id), ``:horizon``,
    ``:status``, ``:last_seq``, ``:updated_at``."""
    from lrserve.service.store.sql import _LOCKED_ROWS, _UPDATE_RUN
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    names = {"run_id": "client_id", "b_run_id": "client_id", "b_horizon": "horizon", "b_status": "status",
             "b_last_seq": "last_seq", "b_updated_at": "updated_at"}
    out = []
    for statement in (_LOCKED_ROWS["hold"], _UPDATE_RUN):
        sql = statement.compile(dialect=PGDialect_psycopg()).string
        sql = re.sub(r"%\((\w+)\)s", lambda m: ":" + names[m.group(1)], sql)
        out.append(" ".join(sql.split()) + ";")
    return out


def commit_script(*, pipelined: bool) -> str:
    """One commit as a pgbench script (``commit_statements`` between ``BEGIN`` and ``COMMIT``)."""
    lock, update = commit_statements()
    lines = ["\\set horizon random(1, 1000000000)"]
    if pipelined:  # lrserve's two flushes: BEGIN with the locked row (read), then the rest
        lines += ["\\startpipeline", "BEGIN;", lock, "\\endpipeline",
                  "\\startpipeline", update, "COMMIT;", "\\endpipeline"]
    else:
        lines += ["BEGIN;", lock, update, "COMMIT;"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Variant:
    """How pgbench sends the commit; the default is lrserve's way."""

    clients: int
    protocol: str = "prepared"
    pipelined: bool = True
    threads: int = 1  # pgbench's -j: one thread, as the load generator has

    @property
    def label(self) -> str:
        pipelined = " pipelined" if self.pipelined else ""
        return f"{self.protocol}{pipelined}, {self.clients} clients, -j{self.threads}"


def variants(clients: Sequence[int], threads: int = 1) -> list[Variant]:
    """Every protocol, one statement per round trip and (extended protocols) lrserve's two flushes."""
    return [Variant(c, p, pipe, threads) for c in clients for p in PROTOCOLS for pipe in (False, True)
            if not (pipe and p == "simple")]


def session_cpu(database: str) -> dict[int, float]:
    """User + system CPU seconds so far of each PostgreSQL session on ``database`` on this
    machine, by pid (by its process title: "postgres: [CLUSTER:] USER DATABASE HOST ...")."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").split()
            if title[:1] != ["postgres:"]:
                continue
            words = title[2:] if title[1].endswith(":") else title[1:]  # past the cluster's name
            if len(words) > 2 and words[1] == database:
                if (seconds := process_cpu_seconds(int(proc.name))) is not None:
                    found[int(proc.name)] = seconds
    return found


class SessionCpu:
    """CPU spent by the sessions on a database from now on, as of the last ``sample`` (a
    session that ends takes its figure with it); not the server's background processes."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._start = session_cpu(database)
        self._last = dict(self._start)

    def sample(self) -> None:
        self._last.update(session_cpu(self.database))

    def seconds(self) -> float:
        self.sample()
        return sum(v - self._start.get(pid, 0.0) for pid, v in self._last.items())


@contextlib.contextmanager
def commit_schema(clients: int) -> Iterator[str]:
    """A fresh schema migrated by lrserve with one run per client (run ids ``"0"`` ...);
    yields its URL (dropped after)."""
    from lrserve.service.store import open_store
    from lrserve.service.store.events import EventKind, NewEvent

    with pg_schema() as url:
        store = open_store(url)
        try:
            for i in range(clients):
                created = NewEvent(EventKind.CREATED, 0, {})
                store.create_run(str(i), {"schedule": {"type": "StepLR"}}, {}, created)
        finally:
            store.close()
        yield url


def run(url: str, variant: Variant, seconds: float, *, transactions: int | None = None) -> dict[str, Any]:
    """pgbench's commits/s, latency percentiles (ms) and CPU per commit (µs) for one variant on
    ``url``'s schema (``commit_schema`` with at least ``variant.clients`` runs), over a window of
    ``seconds``, or, with ``transactions``, that many commits by each client however long they
    take (``-t``: a check of what is committed, which a window spent connecting on a busy
    machine would not make)."""
    from sqlalchemy import make_url

    pgbench = pgbench_path()
    if pgbench is None:
        raise RuntimeError("pgbench is not installed (Debian: postgresql-client)")
    parsed = make_url(url)
    database = parsed.database or "postgres"
    env = {**os.environ, "PGOPTIONS": str(parsed.query.get("options", ""))}
    if parsed.password:
        env["PGPASSWORD"] = parsed.password
    quote = "'" if variant.protocol == "simple" else ""  # simple: pgbench writes values into the text
    values = {"status": f"{quote}active{quote}", "last_seq": "1",
              "updated_at": f"{quote}{_UPDATED_AT}{quote}"}
    length = ["-T", str(max(1, round(seconds)))] if transactions is None else ["-t", str(transactions)]
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "commit.sql"
        script.write_text(commit_script(pipelined=variant.pipelined))
        cmd = [pgbench, "-n", "-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432),
               "-U", parsed.username or "postgres", "-M", variant.protocol, "-c", str(variant.clients),
               "-j", str(variant.threads), *length, "-l", "-f", str(script),
               *(arg for k, v in values.items() for arg in ("-D", f"{k}={v}")), database]
        sessions, before = SessionCpu(database), resource.getrusage(resource.RUSAGE_CHILDREN)
        with subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            while proc.poll() is None:  # its sessions end with it: sample them until then
                sessions.sample()
                time.sleep(0.05)
            stdout, stderr = proc.communicate()
        database_cpu = sessions.seconds()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed ({proc.returncode}): {stderr.strip()[-2000:]}")
        latencies = [int(line.split()[2]) / 1000 for log in Path(folder).glob("pgbench_log.*")
                     for line in log.read_text().splitlines() if line.strip()]
    commits = max(len(latencies), 1)
    pgbench_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    failed = re.search(r"^number of failed transactions: (\d+)", stdout, re.MULTILINE)
    return {
        "variant": variant.label, "rps": committed_per_second(stdout), "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99), "requests": len(latencies),
        "errors": int(failed.group(1)) if failed else 0, "tool": "pgbench", "connections": variant.clients,
        "postgres_cpu_us": 1e6 * database_cpu / commits, "pgbench_cpu_us": 1e6 * pgbench_cpu / commits,
    }


def committed_per_second(report: str) -> float:
    """pgbench's tps (its initial connections left out), from its report: 0 where it committed
    nothing. Its ``-T`` window counts from before its clients connect, and on a busy machine a
    1 s window (the tiny size's) was all connecting: the report then has no tps line, and the
    whole suite failed on it (tests/bench/test_smoke.py, beside a busy CI).

    Raises:
        RuntimeError: the report has neither a tps nor a count of transactions.
    """
    tps = re.search(r"^tps = ([\d.]+)", report, re.MULTILINE)
    if tps is not None:
        return float(tps.group(1))
    processed = re.search(r"^number of transactions actually processed: (\d+)", report, re.MULTILINE)
    if processed is not None and int(processed.group(1)) == 0:
        return 0.0
    raise RuntimeError(f"no tps in pgbench's report: {report[-1000:]}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_ceiling",
                                     description="lrserve's commit on PostgreSQL, run by pgbench")
    parser.add_argument("--clients", type=int, nargs="+", default=[32])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1, help="every variant this many times, rotated")
    parser.add_argument("--threads", type=int, default=1, help="pgbench's -j")
    args = parser.parse_args(argv)
    chosen = variants(args.clients, args.threads)
    print(f"pgbench {pgbench_path()} on {pg_base_url()}; load {os.getloadavg()[0]:.1f}", flush=True)
    with commit_schema(max(args.clients)) as url:
        for r in range(args.rounds):
            shift = r % len(chosen)
            for variant in chosen[shift:] + chosen[:shift]:
                row = run(url, variant, args.seconds)
                print(f"{row['variant']:>38}: {row['rps']:7.0f}/s  p50 {row['p50_ms']:6.2f} ms  "
                      f"p99 {row['p99_ms']:6.2f} ms  CPU per commit: sessions "
                      f"{row['postgres_cpu_us']:4.0f} µs, pgbench {row['pgbench_cpu_us']:3.0f} µs  "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
