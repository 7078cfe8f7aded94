"""``python -m tests.trainer.exit_threads ARGS``: ``python -m lrserve.trainer ARGS``, and at exit
(an atexit handler, right before the interpreter finalizes) one line on stderr naming the
native threads still alive: ``exit threads rank N: ["python3", ...]`` (Linux, /proc/self/task).

A gloo thread alive then can outlive the interpreter's shutdown (see ``ddp.Dist.close``).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys


def report() -> None:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    rank = os.environ.get("RANK", "0")
    print(f"exit threads rank {rank}: {json.dumps(sorted(names))}", file=sys.stderr, flush=True)


atexit.register(report)
runpy.run_module("lrserve.trainer", run_name="__main__", alter_sys=True)
