"""The three sizes of the suite: ``tiny`` (smoke test), ``quick`` (about a minute), ``default``.

``tiny`` and ``quick`` share their servers between figures (``servers.Pool``): a server
start costs seconds here. Only ``default`` starts fresh servers per figure; its numbers
are the ones to quote.

Each figure reads its knobs from ``Size``; one object keeps the suite's total time readable
in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    name: str
    # figure 1: client step cost
    step_rounds: int
    step_segment: int  # steps per measured segment
    step_work_s: float  # simulated training step (a sleep: releases the GIL as torch kernels do)
    step_long_work_s: float  # plateau rows again at a step longer than one round trip
    step_long_segment: int
    # figures 2 and 5: HTTP load
    load_rounds: int
    load_seconds: float  # below 1 s the asyncio generator runs (wrk counts whole seconds)
    load_connections: int
    load_warmup_s: float
    hot_runs: int  # runs the hot-path loads spread over
    # figure 3: report and decide
    report_rounds: int
    report_calls: int  # sequential calls per variant per round
    report_seeded_trials: int
    # figure 4: scale
    scale_runs: tuple[int, ...]  # cumulative run counts at which memory is read
    scale_steps_per_run: int
    scale_cold_rounds: int  # 0: no cold start (the tiny size: a start is most of its time)
    # (default 5: a start here varies by ±0.4 s from one to the next; a median of 2 was noise)
    scale_cold_small: bool  # also time the one-run database (the comparison)
    scale_step_runs: int  # runs stepped further, for the memory of one held step
    scale_extra_steps: int
    ranks: int
    rank_runs: int
    rank_epochs: int
    rank_epoch_s: float
    # figure 6: event stream fan-out (with the ranks above)
    fanout_subscribers: int


SIZES = {
    "tiny": Size("tiny", step_rounds=1, step_segment=100, step_work_s=0.0001,
                 step_long_work_s=0.002, step_long_segment=100,
                 load_rounds=1, load_seconds=0.3, load_connections=8, load_warmup_s=0.0, hot_runs=2,
                 report_rounds=1, report_calls=10, report_seeded_trials=2,
                 scale_runs=(50,), scale_steps_per_run=10, scale_cold_rounds=0,
                 scale_cold_small=False, scale_step_runs=5, scale_extra_steps=100,
                 ranks=20, rank_runs=4, rank_epochs=2, rank_epoch_s=0.5, fanout_subscribers=20),
    "quick": Size("quick", step_rounds=2, step_segment=600, step_work_s=0.0001,
                  step_long_work_s=0.005, step_long_segment=200,
                  load_rounds=1, load_seconds=1.0, load_connections=32, load_warmup_s=0.5, hot_runs=8,
                 
                  report_rounds=2, report_calls=50, report_seeded_trials=5,
                  scale_runs=(500,), scale_steps_per_run=100, scale_cold_rounds=1,
                  scale_cold_small=False, scale_step_runs=20, scale_extra_steps=500,
                  ranks=200, rank_runs=20, rank_epochs=2, rank_epoch_s=1.5, fanout_subscribers=200),
    "default": Size("default", step_rounds=3, step_segment=1500, step_work_s=0.0001,
                    step_long_work_s=0.005, step_long_segment=300,
                    load_rounds=3, load_seconds=2.0, load_connections=64, load_warmup_s=1.0, hot_runs=16,
                   
                    report_rounds=5, report_calls=100, report_seeded_trials=10,
                    scale_runs=(10_000,), scale_steps_per_run=100, scale_cold_rounds=5,
                    scale_cold_small=True, scale_step_runs=100, scale_extra_steps=1000,
                    ranks=1000, rank_runs=100, rank_epochs=2, rank_epoch_s=5.0, fanout_subscribers=200),
}
