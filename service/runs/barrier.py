"""The metric barrier (API.md, ``POST .../step`` with ``world_size > 1``).

Each rank reports its own value of the watched metric for step *k*; the decision waits
until all ``world_size`` ranks have reported, then uses their mean (the sum in rank
order divided by N), so it does not depend on which rank came first. If some rank has
not reported after ``barrier_timeout_s``, the ranks that did decide with their own mean
and a ``barrier_timeout`` event names the missing ranks. Reports are stored in the
database, so ranks spread over several replicas meet in the same barrier; a waiting
request polls the store, and is woken at once by reports that reach its own process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from starlette.concurrency import run_in_threadpool

from service.errors import InvalidInput
from service.runs.manager import RunManager, Window

POLL_S = 0.02


class Barriers:
    """Waits at metric barriers without holding a worker thread."""

    def __init__(self, manager: RunManager, timeout_s: float) -> None:
        self.manager = manager
        self.timeout_s = timeout_s
        self._wakeups: dict[tuple[str, int], asyncio.Event] = {}

    async def step(
        self, run_id: str, step: int, metrics: Mapping[str, float], rank: int, ahead: int
    ) -> Window:
        """``POST .../step``: through the barrier when the run needs one, else straight on."""
        state = await run_in_threadpool(self.manager.state, run_id)
        watched = {k: float(v) for k, v in metrics.items() if k in state.watched}
        if state.world_size == 1 or not watched or step <= state.horizon:
            return await run_in_threadpool(self.manager.step_run, run_id, step, metrics, rank, ahead)
        if rank >= state.world_size:
            raise InvalidInput.at(
                "rank", f"must be below the run's world_size ({state.world_size}), got {rank}"
            )
        await run_in_threadpool(self.manager.report_to_barrier, run_id, step, rank, metrics, watched)
        key = (run_id, step)
        wakeup = self._wakeups.setdefault(key, asyncio.Event())
        wakeup.set()  # let ranks already waiting here count the new report
        await self._wait(run_id, step, key)
        return await run_in_threadpool(self.manager.window, run_id, step, ahead)

    async def _wait(self, run_id: str, step: int, key: tuple[str, int]) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                timed_out = time.monotonic() >= deadline
                if await run_in_threadpool(self.manager.resolve_barrier, run_id, step, timed_out):
                    break
                wakeup = self._wakeups.setdefault(key, asyncio.Event())
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), min(POLL_S, max(0.0, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    pass
        finally:
            event = self._wakeups.pop(key, None)
            if event is not None:
                event.set()
