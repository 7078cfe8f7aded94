"""The metric barrier (API.md, ``POST .../step`` with ``world_size > 1``).

Each rank reports its own value of the watched metric for step *k*; the decision waits
until all ``world_size`` ranks have reported, then uses their mean (the sum in rank
order divided by N), so it does not depend on which rank came first. If some rank has
not reported after ``barrier_timeout_s``, the ranks that did decide with their own mean
and a ``barrier_timeout`` event names the missing ranks.

Reports are stored in the database, so ranks spread over several replicas meet in the
same barrier. The rank that completes it decides at once and wakes the ranks waiting in
its own process: it knows it is the last either from its report's transaction, which
reads the barrier back (on SQLite, where writers take turns, always), or from the
reports this process has counted (PostgreSQL lets concurrent reports miss each other).
Ranks waiting in other processes learn of the decision by asking the store every
``POLL_S`` (one question per barrier and process, however many ranks wait there); so
does a barrier whose last reports crossed on two replicas, and one that times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from service.errors import InvalidInput
from service.runs.manager import ON_LOOP_VALUES, RunManager, Window

POLL_S = 0.1
"""How often ranks waiting in this process ask the store whether another process decided."""


@dataclass(eq=False)
class _Barrier:
    """One (run, step) barrier as this process sees it, while requests use it."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    polled_at: float = field(default_factory=time.monotonic)
    users: int = 0
    reported: set[int] = field(default_factory=set)
    """Ranks whose report this process has written (committed)."""


class Barriers:
    """Waits at metric barriers without holding a worker thread."""

    def __init__(self, manager: RunManager, timeout_s: float) -> None:
        self.manager = manager
        self.timeout_s = timeout_s
        self._open: dict[tuple[str, int], _Barrier] = {}

    async def step(
        self, run_id: str, step: int, metrics: Mapping[str, float], rank: int, ahead: int
    ) -> Window:
        """``POST .../step``: through the barrier when the run needs one, else straight on."""
        state = self.manager.loaded(run_id) or await run_in_threadpool(self.manager.state, run_id)
        watched = {k: float(v) for k, v in metrics.items() if k in state.watched}
        if state.world_size == 1 or not watched or step <= state.horizon:
            return await run_in_threadpool(self.manager.step_run, run_id, step, metrics, rank, ahead)
        if rank >= state.world_size:
            raise InvalidInput.at(
                "rank", f"must be below the run's world_size ({state.world_size}), got {rank}"
            )
        key = (run_id, step)
        barrier = self._enter(key)
        try:
            args = (run_id, step, rank, metrics, watched, ahead)
            decided = await run_in_threadpool(self.manager.report_to_barrier, *args)
            barrier.reported.add(rank)
            if not decided and len(barrier.reported) >= state.world_size:  # all in, though unseen
                decided = await run_in_threadpool(self.manager.resolve_barrier, run_id, step, False, ahead)
            if decided:
                barrier.done.set()  # wake the ranks waiting here
            else:
                await self._wait(run_id, step, ahead, barrier)
        finally:
            self._leave(key, barrier)
        window = self.manager.cached_window(run_id, step, ahead, most_values=ON_LOOP_VALUES)
        return window or await run_in_threadpool(self.manager.window, run_id, step, ahead)

    def _enter(self, key: tuple[str, int]) -> _Barrier:
        barrier = self._open.get(key)
        if barrier is None:
            barrier = self._open[key] = _Barrier()
        barrier.users += 1
        return barrier

    def _leave(self, key: tuple[str, int], barrier: _Barrier) -> None:
        barrier.users -= 1
        if barrier.users == 0:
            del self._open[key]

    async def _wait(self, run_id: str, step: int, ahead: int, barrier: _Barrier) -> None:
        """Until the barrier is decided: woken by a report here, or asking the store now and then."""
        deadline = time.monotonic() + self.timeout_s
        while not barrier.done.is_set():
            now = time.monotonic()
            timed_out = now >= deadline
            if timed_out or now >= barrier.polled_at + POLL_S:
                barrier.polled_at = now  # the other ranks waiting here skip this round
                if await run_in_threadpool(self.manager.resolve_barrier, run_id, step, timed_out, ahead):
                    barrier.done.set()
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(barrier.done.wait(), min(deadline, barrier.polled_at + POLL_S) - now)
