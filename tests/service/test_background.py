"""``Background``: work in threads at a lower CPU priority than the server's other threads."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest
from lrserve.service.background import BACKGROUND_NICE, THREAD_NAME, Background
from lrserve.service.errors import ServerStopping

linux = pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")


def _where() -> tuple[str, int]:
    return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux
def test_work_runs_in_a_background_thread_at_the_lower_priority_and_the_caller_keeps_its_own():
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    background = Background(workers=2)
    try:
        name, nice = asyncio.run(background.run(_where))
    finally:
        background.close()
    assert name.startswith(THREAD_NAME)
    assert nice == max(mine, BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # this thread's unchanged


def test_a_result_and_an_exception_come_back_to_the_caller():
    background = Background(workers=1)

    def fails() -> None:
        raise KeyError("no such run")

    async def both() -> tuple[int, BaseException | None]:
        got = await background.run(pow, 2, 10)
        try:
            await background.run(fails)
        except KeyError as error:
            return got, error
        return got, None

    try:
        got, error = asyncio.run(both())
    finally:
        background.close()
    assert got == 1024 and isinstance(error, KeyError)


def test_close_waits_for_the_work_under_way():
    background = Background(workers=1)
    started, release, done = threading.Event(), threading.Event(), []

    def slow() -> None:
        started.set()
        release.wait(30)
        done.append(True)

    future = background._pool.submit(slow)
    assert started.wait(30)
    threading.Timer(0.2, release.set).start()
    background.close()
    assert done == [True] and future.done()


def test_after_close_work_is_a_server_stopping_not_a_runtime_error():
    """A request that reaches ``run`` after the lifespan closed the pool gets the API's 503
    ``server_stopping`` (as ``CommitThreads`` does), not the pool's RuntimeError (a 500)."""
    background = Background(workers=1)
    background.close()
    with pytest.raises(ServerStopping):
        asyncio.run(background.run(pow, 2, 10))


def test_at_most_twice_the_workers_hold_a_slot_the_rest_wait_on_the_loop():
    """``slot``: held around a big history's read and write, so that at most ``slots`` (twice the
    workers) histories are held in memory at once, however slow the background threads are."""
    background = Background(workers=1)
    assert background.slots == 2

    async def many() -> int:
        most, busy, release = 0, 0, asyncio.Event()

        async def one() -> None:
            nonlocal most, busy
            async with background.slot:
                busy += 1
                most = max(most, busy)
                await release.wait()
                busy -= 1

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        for _ in range(20):
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return most

    try:
        assert asyncio.run(many()) == 2
    finally:
        background.close()


@linux
def test_nice_zero_leaves_the_threads_at_the_callers_priority():
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    background = Background(workers=1, nice=0)
    try:
        name, nice = asyncio.run(background.run(_where))
    finally:
        background.close()
    assert name.startswith(THREAD_NAME) and nice == mine
