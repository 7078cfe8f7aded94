"""Connections that never finish their request cannot exhaust the server.

uvicorn waits forever for a request's headers and body, and holds a file descriptor per
connection meanwhile: 19,990 half-sent requests once took every descriptor and
``/healthz`` failed for their lifetime. ``GuardedHttpProtocol`` (uvicorn's httptools
protocol, passed as ``http=``) adds these rules, per server process:

- **Request timeout** (``LRSERVE_REQUEST_TIMEOUT_S``, default 10): a request's headers and
  body must arrive within this many seconds of its first byte (of the connection, for the
  first one). Otherwise the server answers ``408`` and closes the connection.
- **Connection limit** (``LRSERVE_MAX_CONNECTIONS``, default 4096): a connection beyond it
  makes room by closing, with a ``503``, the oldest connection that has no request in
  progress (half-sent or idle keep-alive); when every connection is busy with a request,
  the new one gets the ``503`` instead. So a flood of half-sent requests evicts itself, and a
  client that sends its request at once (``/healthz``, a training job) still gets in.
- **Answers not read**: a connection whose answer waits (the socket's buffers full, its own
  above 64 KiB) with not a byte of it read for ``LRSERVE_REQUEST_TIMEOUT_S`` is dropped
  (aborted: the answer not kept to be sent); a slow reader that reads goes on. Before, each
  held its whole answer for as long as it stayed open: 150 connections asking a 9 MB window
  and reading nothing held 1.3 GB, closed or not.
- **Head size** (``MAX_HEAD_BYTES``, 64 KiB): a request's line and headers larger than this
  are answered ``431`` and the connection closed. uvicorn's parser keeps them whole, with no
  limit of its own: one connection streaming header lines grew a server by 7 GB in 6 s, and
  a 170 MB URL (kept by repeated concatenation) held ``/healthz`` for seconds.

The answers (408, 503, 431) are the API's error body and say ``connection: close``. What happened is
logged at most once per 5 seconds per kind, with a count (a flood would bury the log).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from typing import Any

import orjson
from lrserve.service.api.responses import error_body
from lrserve.service.errors import HeadTooLarge, LRServeError, RequestTimeout, TooManyConnections
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("lrserve")

# Connections of this process with no request in progress, oldest first. An OrderedDict:
# finding the first of a plain dict after many deletions at its front scans their holes.
_waiting: OrderedDict[GuardedHttpProtocol, None] = OrderedDict()


class _Tally:
    """Counts an event and logs it at most once per ``every_s``."""

    def __init__(self, text: str, every_s: float = 5.0) -> None:
        self.text = text
        self.every_s = every_s
        self.count = 0
        self.logged_at = -every_s

    def add(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= self.every_s:
            log.warning("%s (%d connection(s) since the last such line)", self.text, self.count)
            self.count = 0
            self.logged_at = now


MAX_HEAD_BYTES = 64 << 10
"""Most bytes of a request's line and headers (nginx's default buffers take 32 KiB)."""

_timed_out = _Tally("request not received in LRSERVE_REQUEST_TIMEOUT_S: answered 408 and closed")
_unread = _Tally("answer not read in LRSERVE_REQUEST_TIMEOUT_S: connection dropped")
_too_large = _Tally(f"request line and headers over {MAX_HEAD_BYTES} bytes: answered 431 and closed")
_evicted = _Tally("LRSERVE_MAX_CONNECTIONS reached: answered 503 and closed")


def _answer(reason: bytes, error: LRServeError) -> bytes:
    body = orjson.dumps(error_body(error))
    return b"".join([
        b"HTTP/1.1 ", str(error.status_code).encode(), b" ", reason, b"\r\n",
        b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(), b"\r\n",
        b"connection: close\r\n\r\n", body,
    ])


class GuardedHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a request timeout and a connection limit (module docstring).

    uvicorn builds one per connection, through ``service.workers.GuardedProtocol`` (which
    binds the server's settings).
    """

    def __init__(self, *args: Any, request_timeout_s: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self._deadline: asyncio.TimerHandle | None = None
        self._deferred: tuple[Any, Any] | None = None  # (cycle, app) of a request not all received
        self._head: int | None = 0  # bytes received of the awaited request's line and headers
        self._unread: asyncio.TimerHandle | None = None  # armed while the answer's buffer is full

    # -- the request timeout: armed while a request is awaited, until it is all received --

    def _arm(self) -> None:
        if self._deadline is None:
            _waiting[self] = None
            self._deadline = self.loop.call_later(self.request_timeout_s, self._on_timeout)

    def _disarm(self) -> None:
        _waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_timeout(self) -> None:
        self._deadline = None
        _waiting.pop(self, None)
        _timed_out.add()
        self._close_with(_answer(b"Request Timeout", RequestTimeout(
            f"the request was not received within {self.request_timeout_s:g} s "
            "(LRSERVE_REQUEST_TIMEOUT_S); send it at once")))

    def _close_with(self, answer: bytes) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(answer)
        self.transport.close()

    # -- answers not read: the write buffer full for the request timeout --------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._unread is None:
            self._watch_unread()

    def resume_writing(self) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None
        super().resume_writing()

    def _watch_unread(self) -> None:
        left = self.transport.get_write_buffer_size()
        self._unread = self.loop.call_later(self.request_timeout_s, self._on_unread, left)

    def _on_unread(self, left: int) -> None:
        """The buffer has been full for the request timeout: dropped if nothing of it was read
        meanwhile (a slow reader that reads goes on: a 9 MB answer at 1 MB/s takes 9 s)."""
        if self.transport.get_write_buffer_size() < left:
            self._watch_unread()
            return
        self._unread = None
        _unread.add()
        self.transport.abort()  # close() would keep the answer until it is sent: never

    # -- uvicorn's callbacks ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._head is not None:  # the awaited request's headers are not all in yet
            self._head += len(data)
        super().data_received(data)  # may end them (``_head`` None), and the request (0)
        if self._head is not None and self._head > MAX_HEAD_BYTES:  # still not all in: refused
            self._head = None  # (at most one read, 256 KiB, parsed past the limit)
            _too_large.add()
            self._close_with(_answer(b"Request Header Fields Too Large", HeadTooLarge(
                f"the request's line and headers exceed {MAX_HEAD_BYTES} bytes")))

    def on_headers_complete(self) -> None:
        self._head = None  # its body's size is the body limit's (LRSERVE_MAX_BODY_BYTES)
        super().on_headers_complete()

    # asyncio.Transport, as uvicorn's own protocols declare it (asyncio says BaseTransport)
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            victim = next(iter(_waiting), None)  # the oldest connection with no request in progress
            _evicted.add()
            busy = _answer(b"Service Unavailable", TooManyConnections(
                f"the server holds {self.max_connections} connections (LRSERVE_MAX_CONNECTIONS); "
                "retry shortly"))
            if victim is None:
                self._close_with(busy)
                return
            victim._close_with(busy)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None
        self._deferred = None  # never started: nothing to tell it
        super().connection_lost(exc)
        # The request's cycle refers back to this protocol (its ``on_response``): left here,
        # each closed connection is a reference cycle only the garbage collector frees, and a
        # flood's thousands of them made full collections of 0.4-0.8 s, every request of the
        # process waiting. A running request's task holds its cycle itself.
        self.cycle = None  # type: ignore[assignment]
        self.pipeline.clear()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a keep-alive connection's next request: its own deadline

    def on_message_complete(self) -> None:
        self._disarm()  # received in full: the application's time starts
        self._head = 0  # the next request's, on a keep-alive connection
        super().on_message_complete()
        self._start_deferred()

    # -- the application starts once its request is all here -------------------------------

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """uvicorn starts the application as soon as a request's headers are in; a half-sent
        request then holds a task, the whole middleware stack and, once closed, an exception
        through it. Wait for the body, unless the client waits for ``100 Continue``."""
        if cycle.more_body and not cycle.waiting_for_100_continue:
            self._deferred = (cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._deferred is not None and self.flow.read_paused:  # more than uvicorn buffers: stream it
            self._start_deferred()

    def _start_deferred(self) -> None:
        if self._deferred is not None:
            cycle, app = self._deferred
            self._deferred = None
            super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            _waiting[self] = None  # idle keep-alive: may make room (uvicorn closes it after 5 s)


def raise_fd_limit(connections: int) -> str | None:
    """Raise the soft limit on open files to fit ``connections`` (and the database's files).

    Returns:
        ``None``, or a line saying the hard limit is too low (the server still starts).
    """
    want = connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            return (f"the open-files limit is {new} (hard); LRSERVE_MAX_CONNECTIONS={connections} "
                    f"needs about {want}: raise it (ulimit -n) or lower LRSERVE_MAX_CONNECTIONS")
    return None
