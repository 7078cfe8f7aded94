"""Big work in a worker process, so that it does not share the server's interpreter.

A request's work runs in the server's thread pool, and every thread of a process shares one
GIL with the event loop: while a thread computed the worst preview or create the budget
allows (1-4 s of pure Python and torch), every other request of the process waited for the
GIL at each of its dozens of handoffs, and another run's ``POST .../step`` p99 went from
24 ms to 137 ms (bench figure 7, budgets). Work that needs nothing but its request —
previews, and the checks a create (or a new schedule) runs — can go to another process
whole: its request goes over, its answer (JSON bytes, or the checked ``RunSpec``, pickled with
its expressions' compiled code) comes back, and the values are torch's own, computed by the
same code (bit for bit: floats travel as JSON written by orjson, which round-trips, or pickled).

``BigWork`` is that process pool (``LRSERVE_OFFLOAD_WORKERS``, default 1; 0 computes in the
server's threads, as before), its processes at nice ``LRSERVE_OFFLOAD_NICE`` (``OFFLOAD_NICE``,
default 0: the server's own priority) and in time slices of ``LRSERVE_OFFLOAD_SLICE_MS``
(``OFFLOAD_SLICE_MS``: long, so that every request's thread preempts a busy worker as it
wakes; ``service/scheduling.py``), both set in each before torch starts a thread. Only work
over ``OFFLOAD_UNITS`` goes there (``is_big``): a small preview or create stays on the fast
path, with no process round trip. Windows and
step jumps need the run's engine, which lives in the server process: their steps with no
input on them go over as the engine's snapshot and come back as the values and the
snapshot after them (``engine.steps_from``, called by ``RunState.advance_to``); restoring
the engine here costs a few per cent of the steps it saves.

If a worker process dies (killed, out of memory), a new one is started and the request is
given to it once more (the work has no side effects); a request whose worker dies twice is a
``503`` ``worker_lost``.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from lrserve.service.engine import cost
from lrserve.service.errors import LRServeError
from lrserve.service.scheduling import long_slices_hold_back_none, lower_priority, request_slice

log = logging.getLogger("lrserve")

T = TypeVar("T")

OFFLOAD_UNITS = 50_000
"""Work units (``service/engine/cost.py``) above which a preview or create runs in a worker
process: about 25-50 ms of work, against a process round trip of about a millisecond."""

OFFLOAD_TEXT = 2_000
"""Characters of strings in a schedule (its expressions) above which its checks are big work:
about ``OFFLOAD_UNITS`` of parsing and evaluating them at steps 0..100."""


OFFLOAD_NICE = 0
"""The nice value of a worker process (``LRSERVE_OFFLOAD_NICE``; at least: a server already
running nicer keeps its own). 0, the server's priority: at nice 19 the kernel ran the event loop
first beside it (another run's step p99 under the worst window 0.78-2.36x idle against main's
1.20-2.90x, better in four side-by-side runs of four; other rows either way), but a nice-19
worker beside CPU-bound work of the server's own session or cgroup (two busy-looping processes
there) got 2 s of CPU in 9 minutes: a 1024-group create waited for it all that time
(docs/hardening.md, "The worker process's priority")."""


OFFLOAD_SLICE_MS = 50.0
"""The time slice a worker process asks of the kernel (``LRSERVE_OFFLOAD_SLICE_MS``; 0: none
asked, the worker keeps the server's, normally the kernel's ~1.4 ms on two cores), on Linux
6.17 and later (``scheduling.LONG_SLICES_SINCE``; older kernels keep their own). Longer than any
request thread's, so that each of them, the event loop, a commit thread, a database's process,
the client, preempts the busy worker the moment it wakes rather than at the end of the worker's
slice; the worker's share of the CPU is unchanged. Measured side by side (figure 7's scenarios
on PostgreSQL, whose step wakes ~20 threads and processes in turn, 5 rounds, load 1.8-2.6):
another run's step p99 under the worst preview, window and step jump 1.93-1.98x idle against
2.44-2.55x at the kernel's slice; on SQLite no change (docs/hardening.md, "The worker process's
time slice")."""


class WorkerLost(LRServeError):
    """The worker process computing this request died (killed, out of memory)."""

    status_code = 503
    code = "worker_lost"


def is_big(*, n_groups: int, steps: int, schedule: Any) -> bool:
    """Whether ``steps`` steps of ``schedule`` (its request JSON) on ``n_groups`` groups may be
    more than ``OFFLOAD_UNITS``: a lower bound of its cost (every schedule costs at least one
    unit per step and group), or the size of its expressions, known without parsing it."""
    return cost.at_least(n_groups=n_groups, steps=steps) > OFFLOAD_UNITS or _text(schedule) > OFFLOAD_TEXT


def over_budget_anyway(*, n_groups: int, steps: int, schedule: Any, budget: int) -> bool:
    """Whether ``steps`` steps of ``schedule`` on ``n_groups`` groups are over ``budget``
    whatever the schedule (a lower bound of its cost is), with a schedule small enough to parse
    in the calling thread: such a request is refused there, after a parse and no work, rather
    than given to a worker process only to be refused (the first one waited seconds for the
    process's start and torch's import: 18 s at load 22)."""
    return cost.at_least(n_groups=n_groups, steps=steps) > budget and _text(schedule) <= OFFLOAD_TEXT


def _text(value: Any, depth: int = 0) -> int:
    """Characters of the strings in ``value`` (a schedule's JSON), counting lists and dicts."""
    if isinstance(value, str):
        return len(value)
    if depth > 64:
        return 0
    if isinstance(value, Mapping):
        return sum(_text(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return sum(_text(v, depth + 1) for v in value)
    return 0


def _start(nice: int, slice_ms: float) -> None:
    """A worker's start: its CPU priority lowered to ``nice`` and, on a kernel where a long slice
    holds back no other task, its time slice ``slice_ms`` (0: the one it inherits), before torch
    starts any thread, so that every thread of the process has them; then torch imported and
    one engine built (seconds), before any request waits."""
    lower_priority(nice)
    if slice_ms and long_slices_hold_back_none():
        request_slice(slice_ms)
    from lrserve.service.engine.engine import warm_up_torch

    warm_up_torch()


class BigWork:
    """Runs big work in ``workers`` processes, or in the calling thread when ``workers`` is 0.
    ``run`` is called from the server's worker threads.

    The processes are spawned by the first big request (which waits for their torch import,
    seconds), not at the server's start: a process that never gets big work (most servers,
    every app a test builds) spawns none, and a server's start-up does not compete with one."""

    def __init__(self, workers: int, nice: int = OFFLOAD_NICE, slice_ms: float = OFFLOAD_SLICE_MS) -> None:
        self.workers = workers
        self.nice = nice
        self.slice_ms = slice_ms
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _new_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, never fork: the server process has threads (and torch's state)
                self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"),
                                                 initializer=_start, initargs=(self.nice, self.slice_ms))
            return self._pool

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker process (``fn`` a module-level function with no side effects;
        arguments and result picklable); its exceptions are raised here.

        A worker found dead (killed while idle, or while computing this) is replaced and the
        work given once more to the new one: it has no side effects, so a second try is safe.

        Raises:
            WorkerLost: the worker died twice while computing it.
        """
        if self.workers == 0:
            return fn(*args)
        for attempt in (1, 2):
            pool = self._new_pool()
            try:
                return pool.submit(fn, *args).result()
            except BrokenProcessPool:
                self._discard(pool)
                log.warning("a worker process for big work died (try %d of 2); it is started again", attempt)
        raise WorkerLost("the worker process computing this request died; retry")

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
