"""A real lrserve process (uvicorn) for end-to-end tests: start, kill -9, restart."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# Ports for servers that tests start come from below the kernel's ephemeral range
# (32768-60999 on Linux), so no outgoing connection of any process takes one between
# ``free_port()`` and the server's bind, nor while a killed server's port waits for its
# restart; each xdist worker draws from its own slice, so parallel workers never collide.
_PORTS = range(12000, 32000)
_SLICE = 1000
_given: set[int] = set()
_random = random.Random()  # its own: a test seeding `random` must not make workers agree


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3"; unset outside xdist
    index = int(worker[2:]) if worker[2:].isdigit() else len(_PORTS) // _SLICE - 1
    start = _PORTS.start + (index % (len(_PORTS) // _SLICE)) * _SLICE
    return range(start, start + _SLICE)


def free_port() -> int:
    """A loopback port nothing listens on, never handed out before in this process."""
    ports = _port_slice()
    for _ in range(len(ports)):
        port = _random.choice(ports)
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {ports}")


class ServerProcess:
    """``python -m service serve`` on a free loopback port, logging to a file."""

    def __init__(self, db_url: str, log_dir: Path, *, port: int | None = None, env: dict | None = None,
                 workers: int = 1, log_level: str = "warning", args: tuple[str, ...] = ()) -> None:
        self.db_url = db_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.workers = workers
        self.log_level = log_level
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--db", self.db_url,
               "--workers", str(self.workers), "--log-level", self.log_level, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown hooks run."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
