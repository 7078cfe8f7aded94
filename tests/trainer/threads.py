"""The names of the calling process's native threads (Linux, ``/proc/self/task``), and how a
rank reports them, for the teardown checks (``teardown.py``, ``exit_threads.py``)."""

from __future__ import annotations

import os
from typing import TextIO


def write_line(stream: TextIO, line: str) -> None:
    """``line`` and its newline in one write: the ranks share the pipe, and ``print``'s text and
    end are two writes when unbuffered (``PYTHONUNBUFFERED``), which the other rank's can split."""
    stream.write(line + "\n")
    stream.flush()


def thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(names)
