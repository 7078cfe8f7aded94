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

from tests.trainer.threads import thread_names, write_line


def report() -> None:
    rank = os.environ.get("RANK", "0")
    write_line(sys.stderr, f"exit threads rank {rank}: {json.dumps(thread_names())}")


atexit.register(report)
runpy.run_module("lrserve.trainer", run_name="__main__", alter_sys=True)
