"""The metric barrier (API.md, ``POST .../step`` with ``world_size > 1``).

Each rank reports its own value of the watched metric for step *k*; the decision waits
until all ``world_size`` ranks have reported, then uses their mean (the sum in rank
order divided by N), so it does not depend on which rank came first. If some rank has
not reported after ``barrier_timeout_s``, the ranks that did decide with their own mean
and a ``barrier_timeout`` event names the missing ranks.

Reports are stored in the database, so ranks spread over several replicas meet in the
same barrier. A job's ranks report within milliseconds of each other: the reports that
reach a process while another of the same barrier is being written go together in the
next write (one transaction and one worker thread for them). The rank that completes the
barrier decides at once and wakes the ranks waiting in its own process: it knows it is
the last from its report's transaction, which reads the barrier back with every report
committed before it. On SQLite writers take turns; on PostgreSQL the reports are written
under the run's row lock and the decision goes in the same transaction
(``Committer.report_to_barrier``), so a barrier is decided once, by its last reports.
Ranks waiting in other processes learn of the decision by asking the store: on
PostgreSQL when a notification says another process decided the run (``LISTEN``/``NOTIFY``,
``BaseStore.run_listener``); and every ``POLL_S`` where no notification can come (SQLite
replicas, a lost listener), every ``NOTIFIED_POLL_S`` while one can. One question per
barrier and process, however many ranks wait there. A barrier that times out asks too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from lrserve.service.errors import InvalidInput, OutageLog
from lrserve.service.runs.manager import ON_LOOP_VALUES, RankReport, RunManager, Window
from starlette.concurrency import run_in_threadpool

log = logging.getLogger("lrserve.barrier")
Listener = Callable[[Callable[[str | None], None]], Awaitable[None]]

POLL_S = 0.1
"""How often ranks waiting in this process ask the store whether another process decided."""
NOTIFIED_POLL_S = 2.0
"""The same while the database notifies this process of other processes' reports and decisions."""


@dataclass(eq=False)
class _Barrier:
    """One (run, step) barrier as this process sees it, while requests use it."""

    done: bool = False
    stirred: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the barrier is decided here or another process may have changed it."""
    nudged: bool = False
    """Another process reported or decided since this process last asked the store."""
    polled_at: float = field(default_factory=time.monotonic)
    users: int = 0
    reported: set[int] = field(default_factory=set)
    """Ranks whose report this process has written (committed)."""
    queued: list[tuple[RankReport, int, asyncio.Future[bool]]] = field(default_factory=list)
    """Reports not written yet (with the ``ahead`` each asks for): they go in the next write."""
    writer: asyncio.Task[None] | None = None
    """Writes the queued reports, a group at a time, while there are any."""

    def finish(self) -> None:
        self.done = True
        self.stirred.set()

    def nudge(self) -> None:
        self.nudged = True
        self.stirred.set()


class Barriers:
    """Waits at metric barriers without holding a worker thread."""

    def __init__(self, manager: RunManager, timeout_s: float, listen: Listener | None = None) -> None:
        """``listen``: the store's ``run_listener()`` (None: other processes are polled)."""
        self.manager = manager
        self.timeout_s = timeout_s
        self._open: dict[tuple[str, int], _Barrier] = {}
        self._by_run: dict[str, set[int]] = {}  # steps of the open barriers, by run
        self._listen = listen
        self._listening = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start listening for other processes' reports and decisions (where the store can)."""
        if self._listen is not None:
            self._task = asyncio.create_task(self._listen_forever(), name="lrserve-barrier-listen")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _poll_s(self) -> float:
        return NOTIFIED_POLL_S if self._listening else POLL_S

    def notified(self, run_id: str | None) -> None:
        """Another process reported to or decided ``run_id`` (None: any run, the listener just
        connected). Called by this object's own listener, or by the one the event hub holds."""
        if run_id is None:
            self._listening = True
            keys = list(self._open)
        else:
            keys = [(run_id, step) for step in self._by_run.get(run_id, ())]
        for key in keys:
            self._open[key].nudge()

    async def _listen_forever(self) -> None:
        assert self._listen is not None
        outage = OutageLog(log, "metric barrier", "database notifications lost, polling only")

        def woke(run_id: str | None) -> None:  # None once listening, then a run per notification
            if run_id is None:
                outage.ok()
            self.notified(run_id)

        while True:
            try:
                await self._listen(woke)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - polling goes on meanwhile; try again later
                outage.failed(exc)
            finally:
                self._listening = False
            await asyncio.sleep(1.0)

    async def step(
        self, run_id: str, step: int, metrics: Mapping[str, float], rank: int, ahead: int
    ) -> Window:
        """``POST .../step``: through the barrier when the run needs one, else straight on."""
        state = self.manager.loaded(run_id)
        if state is None:
            state = await run_in_threadpool(self.manager.state, run_id)
        watched = {k: float(v) for k, v in metrics.items() if k in state.watched}
        if state.world_size == 1 or not watched or step <= state.horizon:
            def step_run() -> Window:
                return self.manager.step_run(run_id, step, metrics, rank, ahead)

            window = self.manager.now(step_run)  # SQLite, small: no hop to a worker thread
            return window if window is not None else await self.manager.in_commit_thread(step_run)
        if rank >= state.world_size:
            raise InvalidInput.at(
                "rank", f"must be below the run's world_size ({state.world_size}), got {rank}"
            )
        key = (run_id, step)
        barrier = self._enter(key)
        try:
            decided = await self._report(run_id, step, barrier, RankReport(rank, metrics, watched), ahead)
            if not decided and len(barrier.reported) >= state.world_size:  # all in, though unseen
                resolve = self.manager.resolve_barrier
                decided = await self.manager.in_commit_thread(resolve, run_id, step, False, ahead)
            if decided:
                barrier.finish()  # wake the ranks waiting here
            else:
                await self._wait(run_id, step, ahead, barrier)
        finally:
            self._leave(key, barrier)
        window = self.manager.cached_window(run_id, step, ahead, most_values=ON_LOOP_VALUES)
        if window is None:
            window = await self.manager.in_commit_thread(self.manager.window, run_id, step, ahead)
        return window

    async def _report(
        self, run_id: str, step: int, barrier: _Barrier, report: RankReport, ahead: int
    ) -> bool:
        """Write this rank's report; True once the barrier is decided.

        A job's ranks report within milliseconds of each other: those that reach this
        process while a write of the barrier is in progress go together in the next one
        (one transaction and one worker thread for them, not one each)."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        barrier.queued.append((report, ahead, answer))
        if barrier.writer is None:
            barrier.writer = asyncio.create_task(self._write_reports(run_id, step, barrier))
        return await answer

    async def _write_reports(self, run_id: str, step: int, barrier: _Barrier) -> None:
        try:
            while barrier.queued:
                group, barrier.queued = barrier.queued, []
                reports = [report for report, _, _ in group]
                most = max(ahead for _, ahead, _ in group)
                try:
                    decided = await self.manager.in_commit_thread(
                        self.manager.report_ranks_to_barrier, run_id, step, reports, most)
                except Exception as exc:  # noqa: BLE001 - each rank of the group answers with it
                    for _, _, answer in group:
                        if not answer.done():  # not given up on (a request cancelled)
                            answer.set_exception(exc)
                    continue
                barrier.reported.update(report.rank for report in reports)
                for _, _, answer in group:
                    if not answer.done():
                        answer.set_result(decided)
        finally:
            barrier.writer = None

    def _enter(self, key: tuple[str, int]) -> _Barrier:
        barrier = self._open.get(key)
        if barrier is None:
            barrier = self._open[key] = _Barrier()
            self._by_run.setdefault(key[0], set()).add(key[1])
        barrier.users += 1
        return barrier

    def _leave(self, key: tuple[str, int], barrier: _Barrier) -> None:
        barrier.users -= 1
        if barrier.users == 0:
            del self._open[key]
            steps = self._by_run[key[0]]
            steps.discard(key[1])
            if not steps:
                del self._by_run[key[0]]

    async def _wait(self, run_id: str, step: int, ahead: int, barrier: _Barrier) -> None:
        """Until the barrier is decided: woken by a report here, or asking the store when another
        process may have changed it (notified), now and then, and when time is up."""
        deadline = time.monotonic() + self.timeout_s
        while not barrier.done:
            now = time.monotonic()
            timed_out = now >= deadline
            if timed_out or barrier.nudged or now >= barrier.polled_at + self._poll_s():
                barrier.polled_at = now  # the other ranks waiting here skip this round
                barrier.nudged = False  # a notification from now on asks again
                barrier.stirred.clear()
                resolve = self.manager.resolve_barrier
                if await self.manager.in_commit_thread(resolve, run_id, step, timed_out, ahead):
                    barrier.finish()
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                wait_s = min(deadline, barrier.polled_at + self._poll_s()) - now
                await asyncio.wait_for(barrier.stirred.wait(), wait_s)
