"""``service/scheduling.py``: a thread's time slice, asked of the kernel, kept by the threads it
starts, never the caller's neighbours'; its nice value and policy untouched."""

from __future__ import annotations

import os
import platform
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
from lrserve.service.scheduling import (
    LONG_SLICES_SINCE,
    long_slices_hold_back_none,
    lower_priority,
    request_slice,
    time_slice_ms,
)

T = TypeVar("T")

linux = pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")


def in_thread(call: Callable[[], T]) -> T:
    """``call()`` in a new thread (whose slice and nice value this process's others never see)."""
    got: list[T] = []
    thread = threading.Thread(target=lambda: got.append(call()))
    thread.start()
    thread.join()
    return got[0]


KERNEL_SLICE = time_slice_ms()
"""This thread's slice as the test starts: the kernel's default (this process asks for none)."""

slices = pytest.mark.skipif(
    not KERNEL_SLICE or in_thread(lambda: request_slice(20)) != 20.0,
    reason="this kernel keeps no time slice per task (Linux before 6.12, not Linux) or refuses to set one",
)


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
def test_a_slice_keeps_the_thread_s_reset_on_fork_flag():
    def asks() -> tuple[float | None, int]:
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
        return request_slice(20), os.sched_getscheduler(0)

    assert in_thread(asks) == (20.0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK)


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


@pytest.mark.parametrize("release,holds", [
    ("6.18.44-fc-v1252", True), ("6.17.0", True), ("7.0.1-arch1", True), ("6.16.9-200.fc42.x86_64", False),
    ("6.12.48+deb13-amd64", False), ("5.15.0-122-generic", False), ("not-a-release", False),
])
def test_long_slices_are_asked_for_from_the_release_that_holds_back_no_other_task(release, holds):
    assert LONG_SLICES_SINCE == (6, 17)
    assert long_slices_hold_back_none(release) is (holds and sys.platform == "linux")


def test_without_a_release_named_it_is_this_kernel_s():
    assert long_slices_hold_back_none() is long_slices_hold_back_none(platform.release())


@linux
def test_lower_priority_never_raises_a_threads_priority():
    def nicer_already() -> tuple[int, int]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return lower_priority(5), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert in_thread(nicer_already) == (19, 19)
