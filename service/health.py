"""Probes on a port of their own (``LRSERVE_HEALTH_PORT``), answered by a thread of their own.

On the API's port a probe opens a connection that waits in the kernel's accept queue (first
in, first out) behind every connection queued before it, then behind their set-ups on the
server's one event loop: under a flood of half-sent requests ``/healthz`` took seconds
(docs/hardening.md), and an orchestrator would restart a server that was doing its job. A
port of its own has an accept queue of its own, and a thread with its own event loop answers
it, so a probe waits for neither the API's connections nor the API's event loop. What it
says still comes from the server:

- ``GET /healthz``: ``200`` while the server's event loop turns (it stamps a heartbeat every
  ``BEAT_S``), ``503`` once it has not for ``STALLED_S`` (a wedged process: restart it);
- ``GET /readyz``: that too, and the store answers and is the one the server started with
  (``store.ping``, as the API's ``/readyz``);
- anything else: ``404``. A request must arrive within ``READ_S``, in at most 1 KiB.

Each server process binds the port itself (``SO_REUSEPORT``: with ``--workers N`` the kernel
spreads probes over the processes), once it is ready (torch warmed up, as the API's
``/readyz``), and closes it first on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable

import orjson
from lrserve.service.api.responses import error_body, status_body
from lrserve.service.errors import STORE_UNAVAILABLE, LRServeError, StoreUnavailable

log = logging.getLogger("lrserve")

BEAT_S = 1.0
"""How often the server's event loop stamps its heartbeat."""

STALLED_S = 30.0
"""A heartbeat older than this: the event loop is wedged, ``/healthz`` answers ``503``."""

READ_S = 2.0
"""A probe's request must arrive within this long (else the connection is closed)."""

LOG_EVERY_S = 5.0
"""A failing ``/readyz`` is logged at most this often (an orchestrator probes every few seconds)."""


class NotAProbe(LRServeError):
    """The probes' port answers nothing else."""

    status_code = 404
    code = "not_found"


class LoopStalled(LRServeError):
    """The server's event loop has not turned for ``STALLED_S``."""

    status_code = 503
    code = "event_loop_stalled"


class HealthListener:
    """``/healthz`` and ``/readyz`` on ``host:port``, in a thread (module docstring).

    Args:
        host: Bind address (the server's).
        port: The probes' port.
        ping: Raises ``StoreUnavailable`` when the store does not answer (``store.ping``).
    """

    def __init__(self, host: str, port: int, ping: Callable[[], None]) -> None:
        self.host, self.port, self.ping = host, port, ping
        self.beat = time.monotonic()
        self._beating: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._logged_at = -LOG_EVERY_S

    async def start(self) -> None:
        """Bind the port (``OSError`` if it cannot), start the heartbeat on the calling (the
        server's) event loop and the probes' thread."""
        sock = _bind(self.host, self.port)
        self._beating = asyncio.create_task(self._beat())
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(sock, started), name="lrserve-health",
                                        daemon=True)
        self._thread.start()
        started.wait()

    async def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        if self._beating is not None:
            self._beating.cancel()

    async def _beat(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(BEAT_S)

    # -- the probes' thread ------------------------------------------------------------

    def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        asyncio.run(self._main(sock, started))

    async def _main(self, sock: socket.socket, started: threading.Event) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, sock=sock, limit=1024)
        started.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S)
            method, target, _ = head.split(b" ", 2)
            status, body = await self._answer(method, target.split(b"?", 1)[0])
            writer.write(b"".join([
                b"HTTP/1.1 ", str(status).encode(), b" ", _REASONS[status], b"\r\n",
                b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(), b"\r\n",
                b"connection: close\r\n\r\n", body,
            ]))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                OSError):
            pass  # too slow, too long, or not HTTP: closed without an answer
        finally:
            writer.close()

    async def _answer(self, method: bytes, path: bytes) -> tuple[int, bytes]:
        if method != b"GET" or path not in (b"/healthz", b"/readyz"):
            return _error(NotAProbe(f"{path.decode(errors='replace')[:64]}: this port answers only "
                                   "GET /healthz and GET /readyz"))
        stalled = time.monotonic() - self.beat
        if stalled > STALLED_S:
            return _error(LoopStalled(f"the server's event loop has not turned for {stalled:.0f} s"))
        if path == b"/healthz":
            return 200, orjson.dumps(status_body("ok"))
        try:
            await asyncio.to_thread(self.ping)
        except StoreUnavailable as exc:  # its words name the file or host: the log's, not the caller's
            now = time.monotonic()
            if now - self._logged_at >= LOG_EVERY_S:
                self._logged_at = now
                log.warning("store unavailable on the probes' GET /readyz: %s", exc.message)
            return _error(StoreUnavailable(STORE_UNAVAILABLE))
        return 200, orjson.dumps(status_body("ready"))


_REASONS = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}


def _error(error: LRServeError) -> tuple[int, bytes]:
    return error.status_code, orjson.dumps(error_body(error))


def port_problem(host: str, port: int) -> str | None:
    """Why the probes' port cannot be bound (one line), or None: ``lrserve serve`` asks before
    any worker starts."""
    try:
        _bind(host, port).close()
    except OSError as exc:
        return f"LRSERVE_HEALTH_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # one per worker process
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
