"""``bench.pg_ceiling``: pgbench runs lrserve's own commit, and it commits what lrserve would.

Skipped only where pgbench is not installed or PostgreSQL is not reachable (the reason is
given). No timing is asserted: only that each variant committed, without a failure.
"""

from __future__ import annotations

import pytest
from lrserve.service.store import open_store

from bench import pg_ceiling
from bench.servers import pg_problem


@pytest.fixture
def bench_url():
    if pg_ceiling.pgbench_path() is None:
        pytest.skip("pgbench is not installed")
    if problem := pg_problem():
        pytest.skip(problem)
    with pg_ceiling.commit_schema(3) as url:
        yield url


def test_the_script_is_lrserves_commit():
    lock, update = pg_ceiling.commit_statements()
    assert lock.startswith("SELECT runs.run_id") and lock.endswith("FOR NO KEY UPDATE;")
    assert "runs.run_id = :client_id::VARCHAR" in lock
    assert update.startswith("UPDATE runs SET") and ":horizon::BIGINT" in update
    script = pg_ceiling.commit_script(pipelined=True).splitlines()
    assert script[1:] == ["\\startpipeline", "BEGIN;", lock, "\\endpipeline",
                          "\\startpipeline", update, "COMMIT;", "\\endpipeline"]


@pytest.mark.parametrize("variant", [pg_ceiling.Variant(3), pg_ceiling.Variant(3, "simple", pipelined=False)],
                         ids=lambda v: v.label)
def test_each_client_commits_its_own_runs_new_horizon(bench_url, variant):
    """20 commits per client, however long the machine takes (a 1 s window could be spent
    connecting on a busy one: no commit to check)."""
    row = pg_ceiling.run(bench_url, variant, seconds=1, transactions=20)
    assert row["errors"] == 0
    assert row["requests"] == 20 * variant.clients and row["rps"] > 0
    assert row["p50_ms"] <= row["p99_ms"]
    assert row["pgbench_cpu_us"] > 0
    store = open_store(bench_url)
    try:  # every client's UPDATE found its run: a horizon of pgbench's random ones, never 0 left
        assert all(store.read_run(str(i)).horizon > 0 for i in range(variant.clients))
    finally:
        store.close()


# pgbench 15's report of a 1 s window spent connecting (a busy CI): no tps line at all
NOTHING_COMMITTED = """pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: /tmp/tmpfp8jeeeo/commit.sql
scaling factor: 1
query mode: prepared
number of clients: 8
number of threads: 1
maximum number of tries: 1
duration: 1 s
number of transactions actually processed: 0
number of failed transactions: 0 (NaN%)
"""


def test_a_window_that_committed_nothing_is_a_rate_of_zero_not_a_failed_suite():
    assert pg_ceiling.committed_per_second(NOTHING_COMMITTED) == 0.0
    committed = NOTHING_COMMITTED.replace("processed: 0", "processed: 1200") + (
        "tps = 1187.402211 (without initial connection time)\n")
    assert pg_ceiling.committed_per_second(committed) == 1187.402211
    with pytest.raises(RuntimeError, match="no tps"):
        pg_ceiling.committed_per_second("pgbench: error: connection failed\n")
