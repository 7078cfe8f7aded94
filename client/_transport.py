"""How ``LRClient``'s requests travel: over ``http.client`` keep-alive connections, or an ``httpx.Client``.

Why two: the client's requests run on its fetch thread, which holds the GIL the training
loop needs. A request through ``httpx.Client`` costs ~0.5 ms of CPU here (URL parsing and
validation, its models, httpcore and h11, all pure Python); the standard library's
``http.client`` does the same exchange in ~0.1 ms (docs/performance.md, "Client
transport"). So a client that owns its connections and talks plain HTTP to a server with no
proxy in between uses ``KeepAliveSender``; everything else keeps httpx's behaviour exactly
through ``HttpxSender``: ``https://`` (certificate verification), a proxy from the
environment (``HTTP_PROXY``/``ALL_PROXY`` and their rules), and an injected
``httpx.Client`` (the test seam, Starlette's ``TestClient``).

Both answer with an ``Answer`` and raise the client's ``TransportError`` tree, chosen by
what can be known: ``ServerUnreachable`` when nothing was sent (safe to retry any request),
``ServerTimeout`` when no answer came in time, ``TransportError`` when the connection broke
during the exchange.
"""

from __future__ import annotations

import http.client
import select
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import httpx
from lrserve.client._exceptions import ServerTimeout, ServerUnreachable, TransportError

__all__ = ["Answer", "HttpxSender", "KeepAliveSender", "Sender", "map_transport_errors", "plain_http_route"]

Timeout = float | httpx.Timeout | None


class Answer(NamedTuple):
    """A server's answer, whatever carried it."""

    status: int
    content: bytes
    retry_after: str | None


class Sender(Protocol):
    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
             timeout: Timeout) -> Answer: ...

    def close(self) -> None: ...

    @property
    def is_closed(self) -> bool: ...


@contextmanager
def map_transport_errors() -> Iterator[None]:
    """Re-raise httpx's transport exceptions as the client's ``TransportError`` tree."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise ServerUnreachable(f"could not connect in time: {exc}") from exc
    except httpx.TimeoutException as exc:
        raise ServerTimeout(f"the server did not answer in time: {exc}") from exc
    except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
        raise ServerUnreachable(f"could not connect to the server: {exc}") from exc
    except httpx.TransportError as exc:
        raise TransportError(f"the connection to the server failed: {exc}") from exc


def plain_http_route(base_url: str) -> tuple[str, int] | None:
    """``(host, port)`` when ``base_url`` is ``http://`` and the environment names no proxy
    (httpx would connect straight to the server); ``None`` when httpx must carry the requests."""
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        return None
    if url.scheme != "http" or not url.host or url.userinfo:
        return None  # TLS, or credentials in the URL (httpx sends them as basic auth)
    proxies = urllib.request.getproxies_environment()
    if "http" in proxies or "all" in proxies:
        return None  # httpx's proxy rules (NO_PROXY included) decide, not a copy of them
    return url.host, url.port or 80


class HttpxSender:
    """Requests through an ``httpx.Client``: its own or an injected one (then not closed here)."""

    def __init__(self, client: httpx.Client, *, owned: bool) -> None:
        self.client = client
        self._owned = owned

    @property
    def is_closed(self) -> bool:
        return self.client.is_closed

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
             timeout: Timeout) -> Answer:
        with map_transport_errors():
            if timeout is None:  # not even httpx's default marker: Starlette's TestClient refuses any
                response = self.client.request(method, url, headers=headers, content=body)
            else:
                response = self.client.request(method, url, headers=headers, content=body, timeout=timeout)
        return Answer(response.status_code, response.content, response.headers.get("retry-after"))

    def close(self) -> None:
        if self._owned:
            self.client.close()


class KeepAliveSender:
    """Keep-alive ``http.client`` connections to one server, shared by threads (a request each
    at once; more threads open more connections, ``max_idle`` of them are kept).

    A connection the server has since closed (uvicorn closes idle ones after 5 s) is noticed
    before it is reused, as httpcore does, so a request never goes out on it.

    Args:
        host, port: The server.
        timeout: The default per-request timeout (``DEFAULT_TIMEOUT``'s shape: ``connect`` to
            connect, ``write`` to send, ``read`` for the answer).
        max_idle: Idle connections kept.
    """

    def __init__(self, host: str, port: int, *, timeout: Timeout, max_idle: int = 8) -> None:
        self._host, self._port = host, port
        self._timeout = _timeouts(timeout)
        self._max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
             timeout: Timeout) -> Answer:
        connect_s, write_s, read_s = self._timeout if timeout is None else _timeouts(timeout)
        conn = self._checkout() or self._connect(connect_s)
        unsent: OSError | None = None
        try:
            conn.sock.settimeout(write_s)  # connected: a socket
            conn.putrequest(method, _path_of(url), skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            try:
                conn.endheaders(body)
            except (BrokenPipeError, ConnectionResetError) as exc:
                unsent = exc  # the server may have answered already and closed (a 413 to a big body)
            conn.sock.settimeout(read_s)
            try:
                answer = conn.getresponse()
                content = answer.read()
            except (http.client.HTTPException, OSError):
                if unsent is not None:  # no early answer: the failure is the send's
                    raise unsent from None
                raise
        except TimeoutError as exc:
            conn.close()
            raise ServerTimeout(f"the server did not answer in time: {exc or 'timed out'}") from exc
        except (http.client.HTTPException, OSError) as exc:  # reset, closed, a bad status line
            conn.close()
            raise TransportError(f"the connection to the server failed: {exc!r}") from exc
        if answer.will_close or unsent is not None:
            conn.close()
        else:
            self._checkin(conn)
        return Answer(answer.status, content, answer.getheader("retry-after"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _checkout(self) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or not _closed_by_peer(conn):
                return conn
            conn.close()

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, timeout_s: float | None) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        try:
            conn.connect()  # with TCP_NODELAY (http.client sets it)
        except TimeoutError as exc:
            conn.close()
            raise ServerUnreachable(f"could not connect in time: {exc or 'timed out'}") from exc
        except OSError as exc:  # refused, unreachable, a name that does not resolve
            conn.close()
            raise ServerUnreachable(f"could not connect to the server: {exc}") from exc
        return conn


def _timeouts(timeout: Timeout) -> tuple[float | None, float | None, float | None]:
    """``(connect, write, read)`` seconds from what httpx accepts as a timeout."""
    t = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
    return t.connect, t.write, t.read


def _path_of(url: str) -> str:
    """The request target of an absolute ``http://host:port/path?query`` URL."""
    slash = url.find("/", url.find("//") + 2)
    return url[slash:] if slash >= 0 else "/"


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """An idle connection is readable only if the server closed it (EOF) or broke the protocol."""
    sock = conn.sock
    if sock is None:
        return True
    poller = select.poll()  # not select.select: a training process may hold > 1024 descriptors
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
