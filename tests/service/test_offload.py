"""``BigWork``: big work in a worker process; a dead worker is a 503 once, then a new pool."""

from __future__ import annotations

import os

import pytest
from lrserve.service.engine.cost import CREATE_STEPS
from lrserve.service.offload import OFFLOAD_TEXT, BigWork, WorkerLost, is_big
from lrserve.service.runs.manager import checked_spec
from lrserve.service.scheduling import long_slices_hold_back_none, time_slice_ms

STEP_LR = {"type": "StepLR", "step_size": 7}


def test_small_work_stays_and_big_work_goes():
    assert not is_big(n_groups=1, steps=1000, schedule=STEP_LR)  # a typical preview
    assert not is_big(n_groups=8, steps=CREATE_STEPS, schedule=STEP_LR)  # a typical create
    assert is_big(n_groups=1024, steps=CREATE_STEPS, schedule=STEP_LR)
    assert is_big(n_groups=1, steps=100_000, schedule=STEP_LR)
    long_expression = {"type": "LambdaLR", "lr_lambda": "0.99**step" + "+0*step" * (OFFLOAD_TEXT // 7)}
    assert is_big(n_groups=1, steps=CREATE_STEPS, schedule=long_expression)


@pytest.mark.slow  # spawns three worker processes (first, replacement, new pool), each importing torch
def test_a_worker_process_computes_what_this_one_would_and_a_dead_one_is_replaced():
    big = BigWork(1)  # its process starts with the first run
    try:
        request = {"schedule": {"type": "LambdaLR", "lr_lambda": ["1/(1+step)", "0.9**step"]},
                   "base_lrs": [0.1, 0.2]}
        assert big.run(checked_spec, request, 500_000) == checked_spec(request, 500_000)
        assert big.run(os.getpid) != os.getpid()
        with pytest.raises(WorkerLost):
            big.run(os._exit, 1)  # the worker dies mid-request, and its replacement too
        assert big.run(checked_spec, request, 500_000) == checked_spec(request, 500_000)
    finally:
        big.close()


def test_zero_workers_compute_in_the_calling_thread():
    big = BigWork(0)
    assert big.run(os.getpid) == os.getpid()
    big.close()


@pytest.mark.slow  # spawns a worker process (it imports torch)
def test_a_worker_process_runs_at_the_nice_value_asked_never_below_this_ones():
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for nice in (7, 0):
        big = BigWork(1, nice=nice)
        try:
            assert big.run(os.getpriority, os.PRIO_PROCESS, 0) == max(mine, nice)
        finally:
            big.close()


@pytest.mark.slow  # spawns two worker processes (each imports torch)
def test_a_worker_process_asks_for_the_slice_asked_where_long_slices_hold_back_none():
    """``BigWork(1, slice_ms=12)``: 12 ms where this kernel honours it without holding others back
    (Linux 6.17+), else this process's own; ``slice_ms=0``: none asked, this process's own."""
    mine = time_slice_ms()
    for slice_ms, expected in ((12, 12.0 if mine and long_slices_hold_back_none() else mine), (0, mine)):
        big = BigWork(1, slice_ms=slice_ms)
        try:
            assert big.run(time_slice_ms) == expected
        finally:
            big.close()
