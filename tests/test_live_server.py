"""The real-server helper's kill and restart: nothing else may take the port or the database
between the kill and the restart, and the restart waits for nothing of the old server.

A killed server's port is free (nothing listens) until its restart binds it, seconds later
on a busy machine. ``free_port`` only tried a bind, so another test process on the machine
(another pytest session's worker of the same index draws from the same slice) could hand
the port to a server of its own in that gap: the restart then failed to bind ("server exited
early"), or its readiness poll was answered by the other test's server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.live_server import Restarter, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]

_DRAW = """
import itertools, sys
import pytest  # as a test process: its worker's slice
from bench import servers
picks = itertools.chain([int(sys.argv[1])], servers._port_slice())  # that port first, then any
servers._random.choice = lambda ports: next(picks)
print(servers.free_port())
"""


def _port_another_process_draws(first: int) -> int:
    """The port another process of this worker's slice (another session's worker of the same
    index) draws while this one lives, when its draw tries ``first`` first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _DRAW, str(first)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return int(out)


def test_a_port_handed_out_is_never_handed_out_by_another_process(tmp_path):
    port = free_port()  # nothing listens on it: as a killed server's port before its restart
    assert _port_another_process_draws(port) != port


def test_a_killed_server_is_restarted_on_its_port_with_another_process_drawing_ports(tmp_path):
    restarter = Restarter(ServerProcess(f"sqlite:///{tmp_path}/r.db", tmp_path).start())
    try:
        restarter.kill()
        port = restarter.server.port
        assert _port_another_process_draws(port) != port  # while it is down
        restarter.restart()
        restarter.join()
        assert restarter.server.proc is not None and restarter.server.proc.poll() is None
    finally:
        restarter.stop()


def test_kill_returns_once_every_process_of_the_server_is_gone(tmp_path):
    """``--workers 2``: the workers hold the listening socket and the database; ``wait`` on the
    supervisor alone returned while they could still be dying, and a restart on the same port
    then failed to bind."""
    server = ServerProcess(f"sqlite:///{tmp_path}/w.db", tmp_path, workers=2).start()
    try:
        assert len(server.pids(living=True)) >= 3  # the supervisor, two workers
        server.kill()
        assert server.pids(living=True) == []
    finally:
        server.stop()


def test_kill_and_stop_take_the_workers_of_a_supervisor_that_died_first(tmp_path):
    """The supervisor gone (killed alone, as an OOM kill takes one process): its workers live on
    in its group, holding the port and the database. ``kill`` and ``stop`` skipped the group
    once the supervisor had exited, so ``kill`` waited 10 s and raised, ``stop`` left them."""
    import signal

    for end in ("kill", "stop"):
        server = ServerProcess(f"sqlite:///{tmp_path}/{end}.db", tmp_path, workers=2).start()
        try:
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=30)
            getattr(server, end)()
            assert server.pids(living=True) == []
        finally:
            server.kill()
