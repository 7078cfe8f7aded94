"""A real lrserve process (uvicorn) for end-to-end tests: start, kill -9, restart.

The one helper for a real server, shared with ``python -m bench``, is ``bench.servers.Server``
(ports below the ephemeral range, one slice per xdist worker; ``kill()`` for kill -9);
the tests know it as ``ServerProcess``. ``Restarter`` kills one and starts it again, as slow
as a real cold start, while the test's training goes on.
"""

from __future__ import annotations

import threading
import time

from bench.servers import Server as ServerProcess
from bench.servers import free_port

__all__ = ["Restarter", "ServerProcess", "free_port"]


class Restarter:
    """Kills a server (``kill -9``) and starts it again, same port, database and settings, in a
    thread, while the caller (a training loop, or a test watching trainers) goes on.

    Attributes:
        server: The server: the restarted one once ``restart()`` was called.
        downtime: Seconds from the kill to the restarted server's readiness (``None`` until then).
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.downtime: float | None = None
        self._killed_at: float | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def started(self) -> bool:
        """Whether the kill happened."""
        return self._killed_at is not None

    @property
    def back(self) -> bool:
        """Whether the restarted server is ready; raises what made the restart fail (a caller
        polling for it learns that at once, not at its own deadline)."""
        if self._error is not None:
            raise self._error
        return self.downtime is not None

    @property
    def restarting(self) -> bool:
        """Whether ``restart()`` was called."""
        return self._thread is not None

    def kill_and_restart(self) -> None:
        self.kill()
        self.restart()

    def kill(self) -> None:
        """Kill the server; it stays down until ``restart()``."""
        self.server.kill()
        self._killed_at = time.monotonic()

    def restart(self) -> None:
        """Start the killed server again, in a thread."""
        old, killed_at = self.server, self._killed_at
        assert killed_at is not None, "restart() before kill()"

        def restart() -> None:
            try:
                self.server = ServerProcess(old.db, old.log_path.parent, app=old.app, port=old.port,
                                            workers=old.workers, env=old.env, args=old.args,
                                            hogs=old.hogs).start()
                self.downtime = time.monotonic() - killed_at
            except BaseException as exc:  # noqa: BLE001 - raised by join(), in the test
                self._error = exc

        self._thread = threading.Thread(target=restart, name="test-restart")
        self._thread.start()

    def join(self, timeout: float = 150.0) -> None:
        """Wait for the restart (its start gives up after 120 s); raise what made it fail."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # else the caller would go on with the killed server
                raise RuntimeError(f"the restart on port {self.server.port} still runs after {timeout} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Wait for the restart (if any), then stop the server."""
        try:
            self.join()
        finally:
            self.server.stop()
