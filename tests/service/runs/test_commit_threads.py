"""``CommitThreads``, the hand-off of ``RunManager.in_commit_thread``: calls run in at most
``size`` named threads, their results and errors come back to the caller's loop, a call
whose caller gave up before it began is not run, and ``close`` runs what was queued and then
refuses more (``ServerStopping``, a 503)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from lrserve.service.errors import ServerStopping
from lrserve.service.runs.manager import CommitThreads


def test_calls_run_in_at_most_size_named_threads_and_answer_with_their_results_and_errors():
    pool = CommitThreads(3, "lrserve-commit")
    names: set[str] = set()
    lock = threading.Lock()

    def call(i: int) -> int:
        with lock:
            names.add(threading.current_thread().name)
        if i == 7:
            raise KeyError(i)
        return i * 2

    async def main() -> list[object]:
        return await asyncio.gather(*(pool.run(call, i) for i in range(20)), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        pool.close()
    assert [r for i, r in enumerate(results) if i != 7] == [i * 2 for i in range(20) if i != 7]
    assert isinstance(results[7], KeyError)
    assert names <= {"lrserve-commit_0", "lrserve-commit_1", "lrserve-commit_2"} and names


def test_a_call_cancelled_before_it_began_is_not_run_and_close_runs_what_was_queued():
    pool = CommitThreads(1, "lrserve-commit")
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold() -> None:
        started.set()
        release.wait(10)
        ran.append("hold")

    async def main() -> None:
        first = asyncio.ensure_future(pool.run(hold))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        second = asyncio.ensure_future(pool.run(ran.append, "cancelled"))
        third = asyncio.ensure_future(pool.run(ran.append, "queued"))
        await asyncio.sleep(0)
        second.cancel()
        await asyncio.sleep(0)
        release.set()
        await first
        await third

    asyncio.run(main())
    pool.close()
    assert ran == ["hold", "queued"]

    async def after_close() -> None:
        await pool.run(ran.append, "late")

    with pytest.raises(ServerStopping):
        asyncio.run(after_close())
    assert ran == ["hold", "queued"]
