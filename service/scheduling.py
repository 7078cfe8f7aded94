"""How the kernel schedules the calling thread: its nice value and its time slice (Linux).

Big work (a worker process's torch, a big history's JSON) shares the machine's cores with the
threads that answer every other request: the event loop, the commit threads, the database's
processes. Two hints tell the kernel which to run first, each applied to the calling thread
and inherited by the threads and processes it starts afterwards:

- ``lower_priority``: a higher nice value, a smaller share of the CPU when others want it
  (``background.py`` says why nice 5 and not 19 for threads that hold the server's GIL).
- ``request_slice``: a longer time slice, the same share. Since Linux 6.12 the scheduler
  (EEVDF) lets a task ask for its slice (``sched_setattr``'s ``sched_runtime``, 0.1-100 ms;
  the default is ~0.75 ms times 1 + log2 of the CPUs), and a task that wakes with a shorter
  slice than the one running preempts it at once (``PREEMPT_SHORT``) instead of waiting for
  the running one's slice to end. A busy worker process asking for a long slice is preempted
  by every request's thread as it wakes, and gives up none of its CPU share for it: no
  starvation, unlike a high nice value beside CPU-bound work (docs/hardening.md, "The worker
  process's time slice"). Older kernels accept the call and keep their own slices.

Both are best effort: elsewhere, or where a sandbox refuses the call, the thread keeps what it
inherited and the server runs as before.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading

_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
"""``sched_setattr`` and ``sched_getattr`` by machine (no wrapper in Python or glibc)."""

_FAIR_POLICIES = (0, 3)
"""SCHED_OTHER and SCHED_BATCH: the policies whose slice a task may ask for (realtime, deadline
and SCHED_IDLE threads are left as they are)."""


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (include/uapi/linux/sched/types.h)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


def lower_priority(nice: int) -> int:
    """Lower the calling thread's CPU priority to ``nice`` (never raise it); its nice value after.

    Linux only (elsewhere the call would apply to the whole process): returns the value
    unchanged there, as it does where the kernel refuses.
    """
    if sys.platform != "linux":
        return nice
    tid = threading.get_native_id()
    now = os.getpriority(os.PRIO_PROCESS, tid)
    if now < nice:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # a sandbox that forbids it: run at the priority inherited
            return now
        return nice
    return now


def time_slice_ms(tid: int = 0) -> float | None:
    """The time slice the kernel gives thread ``tid`` (0: the calling thread), in ms; 0.0 where
    the kernel keeps no slice per task (before Linux 6.12); None where it cannot be read."""
    attr = _get(tid)
    return None if attr is None else attr.sched_runtime / 1e6


def request_slice(ms: float) -> float | None:
    """Ask the kernel to run the calling thread in time slices of ``ms`` milliseconds (it clamps
    them to 0.1-100), keeping its policy and nice value; the slice in force after
    (``time_slice_ms``), or None where the call is not made or refused (not Linux on x86_64 or
    aarch64, a realtime or SCHED_IDLE thread, a sandbox)."""
    attr = _get(0)
    if attr is None or attr.sched_policy not in _FAIR_POLICIES:
        return None
    attr.size = ctypes.sizeof(attr)
    attr.sched_flags = 0
    attr.sched_runtime = round(ms * 1e6)
    if _syscall(0, 0, ctypes.byref(attr), 0) != 0:
        return None
    return time_slice_ms()


def _get(tid: int) -> _SchedAttr | None:
    attr = _SchedAttr()
    if _syscall(1, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    return attr


def _syscall(which: int, *args: object) -> int:
    """``sched_setattr`` (``which`` 0) or ``sched_getattr`` (1); -1 where there is neither."""
    numbers = _SYSCALLS.get(platform.machine()) if sys.platform == "linux" else None
    if numbers is None:
        return -1
    result: int = _libc().syscall(numbers[which], *args)
    return result


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
