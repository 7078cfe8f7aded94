"""How the kernel schedules the calling thread: its nice value and its time slice (Linux).

Big work (a worker process's torch, a big history's JSON) shares the machine's cores with the
threads that answer every other request: the event loop, the commit threads, the database's
processes. Two hints tell the kernel which to run first, each applied to the calling thread
and inherited by the threads and processes it starts afterwards:

- ``lower_priority``: a higher nice value, a smaller share of the CPU when others want it
  (``background.py`` says why nice 5 and not 19 for threads that hold the server's GIL).
- ``request_slice``: a longer time slice, the same share. Since Linux 6.12 the scheduler
  (EEVDF) lets a task ask for its slice (``sched_setattr``'s ``sched_runtime``, 0.1-100 ms;
  by default ~0.7 ms times 1 + log2 of the CPUs, up to 8: 1.4 ms on two cores), and
  a task that wakes with a shorter slice than the one running preempts it at once
  (``PREEMPT_SHORT``) instead of waiting for the running one's slice to end. Since 6.17
  (``LONG_SLICES_SINCE``) a running task's slice is also protected only as long as the
  shortest slice queued beside it, so a task that is runnable without waking (the event loop
  in the middle of a big answer) does not wait a whole long slice either. A busy worker
  process asking for a long slice on such a kernel is preempted by every request's thread,
  and gives up none of its CPU share for it: no starvation, unlike a high nice value beside
  CPU-bound work (docs/hardening.md, "The worker process's time slice").

Both are best effort: elsewhere, or where a sandbox refuses the call, the thread keeps what it
inherited and the server runs as before.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
import sys
import threading

LONG_SLICES_SINCE = (6, 17)
"""The first Linux release where a long slice holds back no other task: a waking task with a
shorter slice preempts it (6.12), and its protection from the others lasts only the shortest
slice queued beside it (6.17 by our reading of the scheduler's history; before, up to its own
whole slice). Measured on 6.18."""

_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275), "riscv64": (274, 275), "loongarch64": (274, 275)}
"""``sched_setattr`` and ``sched_getattr`` by machine (no wrapper in Python or glibc): 64-bit only,
as ``platform.machine()`` names the kernel's machine, not this interpreter's."""
_SETATTR, _GETATTR = 0, 1  # their places in each pair

_SLICED_POLICIES = (getattr(os, "SCHED_OTHER", 0), getattr(os, "SCHED_BATCH", 3))
"""The policies whose slice a task may ask for (realtime, deadline and SCHED_IDLE threads are
left as they are)."""

_SCHED_FLAG_RESET_ON_FORK = 0x01
"""The one flag of a fair thread that ``sched_setattr`` would clear if not passed back."""


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


def long_slices_hold_back_none(release: str | None = None) -> bool:
    """Whether this kernel (or the Linux ``release`` named, as ``uname -r`` prints it) is one where
    a long slice holds back no other task (``LONG_SLICES_SINCE``); False where the release cannot
    be read, or not on Linux."""
    if sys.platform != "linux":
        return False
    found = re.match(r"(\d+)\.(\d+)", platform.release() if release is None else release)
    return found is not None and (int(found[1]), int(found[2])) >= LONG_SLICES_SINCE


def time_slice_ms(tid: int = 0) -> float | None:
    """The time slice the kernel gives thread ``tid`` (0: the calling thread), in ms, as
    ``sched_getattr`` reads it: 0.0 where the kernel keeps no slice per task (before Linux 6.12)
    and for realtime threads; None where it cannot be read (no such thread, not Linux)."""
    attr = _getattr(tid)
    return None if attr is None else attr.sched_runtime / 1e6


def request_slice(ms: float) -> float | None:
    """Ask the kernel to run the calling thread in time slices of ``ms`` milliseconds (it clamps
    them to 0.1-100; 0: its default again), keeping the thread's policy, nice value and flags;
    the slice in force after (``time_slice_ms``), or None where the call is not made or refused
    (not a 64-bit Linux the module knows, a realtime or SCHED_IDLE thread, a sandbox)."""
    attr = _getattr(0)
    if attr is None or attr.sched_policy not in _SLICED_POLICIES:
        return None
    attr.size = ctypes.sizeof(attr)
    attr.sched_flags &= _SCHED_FLAG_RESET_ON_FORK  # the util clamps' flags left out: untouched
    attr.sched_runtime = max(1, round(ms * 1e6)) if ms > 0 else 0  # a positive ask is never 0 ns
    if _syscall(_SETATTR, 0, ctypes.byref(attr), 0) != 0:  # (pid, attr, flags); pid 0: this thread
        return None
    return time_slice_ms()


def _getattr(tid: int) -> _SchedAttr | None:
    attr = _SchedAttr()
    if _syscall(_GETATTR, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:  # (pid, attr, size, flags)
        return None
    return attr


def _syscall(which: int, *args: object) -> int:
    """``sched_setattr`` (``which``: ``_SETATTR``) or ``sched_getattr`` (``_GETATTR``) with ``args``;
    -1 where there is neither (the call's error is not read: every caller keeps what it has)."""
    libc = _libc()
    numbers = _SYSCALLS.get(platform.machine())
    if libc is None or numbers is None:
        return -1
    result: int = libc.syscall(numbers[which], *args)
    return result


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """This process's C library, where it has ``syscall`` (64-bit Linux)."""
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.syscall  # noqa: B018 - looked up once here: a C library without it is none
    except (OSError, AttributeError):
        return None
    return libc
