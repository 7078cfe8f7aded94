"""``bench/hogs.py``: busy processes in the server's session (its scheduling group), not of its
process group, gone with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.servers import process_cpu_seconds

HOGS = Path(__file__).resolve().parents[2] / "bench" / "hogs.py"


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def test_hogs_spin_in_the_commands_session_in_groups_of_their_own_and_end_with_it():
    command = [sys.executable, str(HOGS), "2", "--", sys.executable, "-c", "import time; time.sleep(600)"]
    proc = subprocess.Popen(command, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(hogs := _children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(hogs) == 2
        while any((process_cpu_seconds(h) or 0.0) < 0.05 for h in hogs) and time.monotonic() < deadline:
            time.sleep(0.05)  # busy: CPU time grows while the command sleeps
        assert all((process_cpu_seconds(h) or 0.0) >= 0.05 for h in hogs)
        assert b"time.sleep(600)" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # it became the command
        for hog in hogs:
            assert os.getsid(hog) == proc.pid  # the command's session: its autogroup
            assert os.getpgid(hog) == hog  # not the command's process group
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_state(h) not in "ZX" for h in hogs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_state(h) in "ZX" for h in hogs)  # ended (reaped or not) once the command was gone


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"  # gone
