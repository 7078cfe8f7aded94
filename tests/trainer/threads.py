"""The names of the calling process's native threads (Linux, ``/proc/self/task``), for the
teardown checks (``teardown.py``, ``exit_threads.py``)."""

from __future__ import annotations

import os


def thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(names)
