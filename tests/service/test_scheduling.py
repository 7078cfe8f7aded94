"""``service/scheduling.py``: a thread's time slice, asked of the kernel, kept by the threads it
starts, never the caller's neighbours'; its nice value and policy untouched."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
from lrserve.service.scheduling import request_slice, time_slice_ms

T = TypeVar("T")

KERNEL_SLICE = time_slice_ms()
"""This thread's slice as the test starts: the kernel's default (this process asks for none)."""

slices = pytest.mark.skipif(
    not KERNEL_SLICE, reason="this kernel keeps no time slice per task (Linux before 6.12, or not Linux)"
)


def in_thread(call: Callable[[], T]) -> T:
    """``call()`` in a new thread (whose slice and nice value this process's others never see)."""
    got: list[T] = []
    thread = threading.Thread(target=lambda: got.append(call()))
    thread.start()
    thread.join()
    return got[0]


@slices
def test_a_thread_s_slice_is_its_own_and_the_threads_it_starts_afterwards_keep_it():
    def asks() -> tuple[float | None, float | None, float | None]:
        after = request_slice(50)
        return after, time_slice_ms(), in_thread(time_slice_ms)

    assert in_thread(asks) == (50.0, 50.0, 50.0)
    assert time_slice_ms() == KERNEL_SLICE  # the caller's, unchanged


@slices
def test_the_kernel_clamps_a_slice_to_its_range_and_zero_is_its_default_again():
    def asks() -> list[float | None]:
        return [request_slice(0.01), request_slice(1_000), request_slice(0)]

    assert in_thread(asks) == [0.1, 100.0, KERNEL_SLICE]


@slices
def test_a_slice_keeps_the_thread_s_nice_value_and_policy():
    def asks() -> tuple[float | None, int, int]:
        tid = threading.get_native_id()
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: the calling thread
        os.setpriority(os.PRIO_PROCESS, tid, 7)
        return request_slice(20), os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(0)

    assert in_thread(asks) == (20.0, 7, os.SCHED_BATCH)


@slices
def test_an_idle_policy_thread_is_left_as_it_is():
    def asks() -> tuple[float | None, float | None, int]:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        before = time_slice_ms()
        return request_slice(20), before == time_slice_ms(), os.sched_getscheduler(0)

    assert in_thread(asks) == (None, True, os.SCHED_IDLE)


@slices
def test_another_thread_s_slice_is_read_by_its_id():
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def holds() -> None:
        request_slice(30)
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=holds)
    thread.start()
    try:
        assert ready.wait(10)
        assert time_slice_ms(tid[0]) == 30.0
    finally:
        done.set()
        thread.join()


def test_a_thread_that_is_gone_has_no_slice_to_read():
    assert time_slice_ms(2**22 + 7) is None  # above Linux's pid_max: no such thread
