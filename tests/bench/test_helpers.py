"""The suite's pure helpers: statistics, round order, wrk's report, table rendering, a process's CPU."""

from __future__ import annotations

import math
import os

from bench import report
from bench.loadgen import parse_wrk
from bench.profile import summarise
from bench.servers import process_cpu_seconds
from bench.stats import interleave, median, percentile, rotations, rounded

WRK_OUT = """Running 2s test @ http://127.0.0.1:40000/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.12ms    3.01ms  63.10ms   90.00%
    Req/Sec     4.21k   250.00     4.50k    70.00%
  Latency Distribution
     50%   14.80ms
     75%   16.00ms
     90%   18.00ms
     99%    1.20s
  8420 requests in 2.00s, 2.10MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:   4210.50
Transfer/sec:      1.05MB
"""


def test_percentile_is_nearest_rank() -> None:
    data = list(range(1, 101))
    assert percentile(data, 50) == 50
    assert percentile(data, 99) == 99
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_median_of_odd_and_even_counts() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
    assert math.isnan(median([]))


def test_rotations_start_each_round_one_further() -> None:
    assert rotations(["a", "b", "c"], 4) == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_interleave_runs_every_variant_once_per_round() -> None:
    calls: list[str] = []
    out = interleave({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 2)
    assert calls == ["a", "b", "b", "a"]
    assert out == {"a": [1, 1], "b": [2, 2]}


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    parsed = parse_wrk(WRK_OUT)
    assert parsed["rps"] == 4210.5
    assert parsed["p50_ms"] == 14.8
    assert parsed["p99_ms"] == 1200.0
    assert parsed["requests"] == 8420
    assert parsed["errors"] == 6


def test_rounded_turns_nan_into_none() -> None:
    assert rounded({"a": [math.nan, 1.23456]}, 2) == {"a": [None, 1.23]}


def test_table_shows_rows_target_and_verdict() -> None:
    fig = report.figure("x", "Figure X", ran="here", target="a <= 1", holds=False,
                        columns=[("name", "name"), ("a", "a")], rows=[{"name": "one", "a": 1.5}])
    text = report.table(fig)
    assert "one" in text and "1.50" in text and "DOES NOT HOLD" in text
    assert "SKIPPED: no wrk" in report.table(report.skipped("x", "Figure X", "no wrk"))


def test_summarise_shares_by_function_and_drops_idle_threads() -> None:
    raw = "\n".join([
        "main (service/__main__.py:1);read_lr (service/api/routes/steps.py:40) 3",
        "main (service/__main__.py:1);send (uvicorn/protocols/http/h.py:9) 1",
        "run (threading.py:1);Condition.wait (threading.py:320) 50",
    ])
    out = summarise(raw)
    assert out["samples"] == 4 and out["idle_samples"] == 50
    assert out["self"][0] == ["read_lr (service/api/routes/steps.py)", 75.0]
    assert ["lrserve (service/)", 75.0] in out["layers"]


def test_a_processs_cpu_seconds_are_its_user_and_system_time() -> None:
    before = os.times()
    sum(i * i for i in range(300_000))  # some CPU of its own
    seconds = process_cpu_seconds(os.getpid())
    after = os.times()  # the kernel's same ticks (times(2)), read on each side
    assert seconds is not None
    tick = os.sysconf("SC_CLK_TCK")  # compared in whole clock ticks, not in rounded floats
    assert round((before.user + before.system) * tick) <= round(seconds * tick) \
        <= round((after.user + after.system) * tick)
    assert seconds > 0
    assert process_cpu_seconds(0) is None  # no such process: /proc/0 is never there
