"""Work that may wait, in threads the kernel runs after the server's other threads.

A history of the most points the work budget allows (485 points x 1,024 groups: a 10 MB
answer) is ~16 ms of CPU in the server process, ~11 of them writing its JSON, in one of its
threads. On a busy
machine (two cores shared with the clients and other processes), what another run's
``POST .../step`` paid for it was mostly not the GIL but a core: timed on the event loop
(its thread's CPU time and the kernel's run-queue delay, ``/proc/thread-self/schedstat``),
the loop's thread waited *runnable* for a core before and during the step (p99 8-10 ms under
the history, 5 ms without), against a p99 of 2-4 ms holding or waiting for the GIL; the
history's thread, at the same priority, was one of those it waited behind (docs/hardening.md,
"The history row: the loop waited for a core").

``Background`` (a big history's JSON: ``fast_reads.big_history``; its reads, any lock they
take, and keeping the answer, whose lock the event loop takes too, stay at the server's
priority: a background thread takes no lock) is a small thread pool whose threads lower their
own scheduling priority (``nice``: ``LRSERVE_BACKGROUND_NICE``, by default ``BACKGROUND_NICE``;
0 leaves them at the server's; Linux: a thread's nice value is its own):
when the event loop's thread (or a commit thread) and a background thread are both runnable on
the server's share of the cores, the kernel runs the former first. Nothing else changes: the
work and its answer are the same; it takes longer only while others want the CPU. The server's
threads share a scheduling group (the process's session, or its cgroup), in which that
priority counts; the group's share against other processes is unchanged.

**Why nice 5, not 19.** A background thread still holds the GIL while it runs Python (it gives
it away between the slices of a big answer: ``sliced_json``), and one preempted while holding
it keeps the loop waiting until it runs again: a priority inversion the kernel does not see.
The loop's thread, waiting for the GIL, is not runnable, so the holder gets a core only at its
weight against every other runnable task of the server's group: the server's other threads,
and every process of its session (``autogroup``: the other ``--workers`` processes, a job
started from the server's shell) or cgroup. Beside two CPU-bound nice-0 processes there, a
nice-19 thread (weight 15 against 2 x 1,024) gets ~0.7 % of the group's CPU: the worst history
took 20 s instead of 1.5 s at nice 0, another run's step p99 went to 2.20 x idle (nice 0:
1.16 x), and a loop ticking every 2 ms beside a thread writing histories was late by up to
0.2-1.3 s (nice 0: 63-138 ms). At nice 5 (weight 335: ~14 % of that group's CPU) the worst
history took 2.8 s (nice 0: 1.7 s) and the step's p99 was 1.11 x idle (nice 0: 0.90 x); without
such work in the group, nice 5 did no worse than nice 19 (step / ``/healthz`` p99 1.06 x / 0.95 x
and 0.81 x / 0.74 x, nice 19 1.72 x / 2.05 x and 0.98 x / 0.97 x). docs/hardening.md, "The
history row beside CPU-bound work in the server's group". A thread at nice 5 beside ``k`` busy
nice-0 tasks of its group gets about 1/(1 + 3k) of their cores: a bound, where nice 19's is
1/(1 + 68k).

At most ``slots`` (``SLOTS_PER_WORKER`` per worker) callers hold what they read for the pool at
once (``slot``): on a busy machine the background step is the slow one, and without a bound the
reads, at normal priority, would pile up big histories waiting for a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lrserve.service.errors import ServerStopping
from lrserve.service.scheduling import lower_priority

T = TypeVar("T")

BACKGROUND_NICE = 5
"""The nice value of a background thread (at least; a server already running nicer keeps its
own): low enough that the kernel runs the loop's thread first (weight 335 against 1,024), high
enough that a thread preempted holding the GIL is not starved behind CPU-bound work of the
server's group (as one at nice 19, weight 15, was: see the module's note)."""

BACKGROUND_WORKERS = 4
"""Background threads per server process: requests beyond that wait for one to be free."""

SLOTS_PER_WORKER = 2
"""``Background.slot``'s size per worker: enough to keep every thread busy (one input being read
while another is written), few enough to bound memory (a big history is up to ~4 MB of LRs plus
its metrics; with the first version of this pool there was no bound, and before it the shared
thread pool's 40 threads were the bound)."""

THREAD_NAME = "lrserve-background"


class Background:
    """A thread pool of ``workers`` threads at ``nice``: ``await background.run(call, *args)``.

    ``slot`` (an ``asyncio.Semaphore`` of ``slots``, twice the workers) is for the caller to hold
    around what it reads for the pool and the pool's work on it (a big history: its read and its
    JSON), so that at most ``slots`` such inputs are held in memory at once however slow the
    background threads are (on a busy machine they run last); callers beyond wait on the event
    loop holding nothing. One per app (per event loop: created in the lifespan).
    """

    def __init__(self, workers: int = BACKGROUND_WORKERS, nice: int = BACKGROUND_NICE) -> None:
        self.nice = nice
        self.slots = SLOTS_PER_WORKER * workers
        self.slot = asyncio.Semaphore(self.slots)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=THREAD_NAME,
                                        initializer=lower_priority, initargs=(nice,))

    async def run(self, call: Callable[..., T], *args: object) -> T:
        """``call(*args)`` in a background thread; its result or its exception.

        Raises:
            ServerStopping: after ``close`` (a 503, not the pool's RuntimeError: a 500).
        """
        try:
            future = self._pool.submit(call, *args)
        except RuntimeError as error:  # shut down (or the interpreter is)
            raise ServerStopping("the server is stopping; retry (another replica, or once it is up)"
                                 ) from error
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Wait for the work under way; no more is taken."""
        self._pool.shutdown(wait=True, cancel_futures=True)
