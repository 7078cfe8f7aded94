"""How ``LRClient``'s requests travel: over keep-alive connections of its own, or httpx.

Why two: the client's requests run on its fetch thread, which holds the GIL the training
loop needs. A request through ``httpx.Client`` costs ~0.5 ms of CPU here (URL parsing and
validation, its models, httpcore and h11, all pure Python); the same exchange written and
read over a socket by ``KeepAliveSender`` costs a fraction of that (docs/performance.md,
"Client transport"). So a client that owns its connections and talks plain HTTP to a server
with no proxy in between uses ``KeepAliveSender``; everything else keeps httpx's behaviour
exactly through ``HttpxSender``: ``https://`` (certificate verification), a proxy from the
environment (``HTTP_PROXY``/``ALL_PROXY`` and their rules), and an injected
``httpx.Client`` (the test seam, Starlette's ``TestClient``).

Both answer with an ``Answer`` and raise the client's ``TransportError`` tree, chosen by
what can be known: ``ServerUnreachable`` when nothing was sent (safe to retry any request),
``ServerTimeout`` when no answer came in time, ``TransportError`` when the connection broke
during the exchange.
"""

from __future__ import annotations

import re
import select
import socket
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
    return url.raw_host.decode("ascii"), url.port or 80  # an international name as IDNA (the Host line's)


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
    """Keep-alive HTTP/1.1 connections to one server, shared by threads (a request each at
    once; more threads open more connections, ``max_idle`` of them are kept).

    The exchange is written and read here (``_Connection``): the request's head is a few
    lines of text, and an answer is read with the socket's buffered reader (C): its status
    line and headers, then its body by ``Content-Length``, chunks, or up to the close.
    ``http.client`` did the same for about twice the CPU per request (its header checks, a
    reader made per answer, and an ``email.parser`` pass over every answer's headers), paid on
    the fetch thread holding the GIL, and by the training thread itself for a report that
    waits.

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
        name = f"[{host}]" if ":" in host else host  # an IPv6 address
        self._host_line = f"Host: {name}\r\n" if port == 80 else f"Host: {name}:{port}\r\n"
        self._timeout = _timeouts(timeout)
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
             timeout: Timeout) -> Answer:
        connect_s, write_s, read_s = self._timeout if timeout is None else _timeouts(timeout)
        request = _request(method, _path_of(url), self._host_line, headers, body)
        conn = self._checkout() or self._connect(connect_s)
        unsent: OSError | None = None
        try:
            conn.sock.settimeout(write_s)
            try:
                conn.sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError) as exc:
                unsent = exc  # the server may have answered already and closed (a 413 to a big body)
            conn.sock.settimeout(read_s)
            try:
                answer, keep = conn.read_answer(head_only=method == "HEAD")
            except (BadAnswer, OSError):
                if unsent is not None:  # no early answer: the failure is the send's
                    raise unsent from None
                raise
        except TimeoutError as exc:
            conn.close()
            raise ServerTimeout(f"the server did not answer in time: {exc or 'timed out'}") from exc
        except (BadAnswer, OSError) as exc:  # reset, closed, an answer that is not HTTP/1.x
            conn.close()
            raise TransportError(f"the connection to the server failed: {exc!r}") from exc
        if keep and unsent is None:
            self._checkin(conn)
        else:
            conn.close()
        return answer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _checkout(self) -> _Connection | None:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or not _closed_by_peer(conn.sock):
                return conn
            conn.close()

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, timeout_s: float | None) -> _Connection:
        try:
            sock = socket.create_connection((self._host, self._port), timeout_s)
        except TimeoutError as exc:
            raise ServerUnreachable(f"could not connect in time: {exc or 'timed out'}") from exc
        except OSError as exc:  # refused, unreachable, a name that does not resolve
            raise ServerUnreachable(f"could not connect to the server: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write
        return _Connection(sock)


class BadAnswer(Exception):
    """What came back is not an HTTP/1.x answer, or it ended before its end."""


class _Connection:
    """One connection: its socket, and the buffered reader its answers are read with."""

    __slots__ = ("fp", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fp = sock.makefile("rb")

    def close(self) -> None:
        self.fp.close()
        self.sock.close()

    def read_answer(self, *, head_only: bool) -> tuple[Answer, bool]:
        """The next final answer (interim ``1xx`` ones skipped), and whether the connection
        may carry another request (RFC 9112: HTTP/1.1, no ``Connection: close``, a body
        whose end was framed)."""
        fp = self.fp
        while True:
            line = fp.readline(_MAX_LINE + 1)
            if not line:
                raise BadAnswer("the server closed the connection without answering")
            parts = line.split(None, 2)
            if (len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3
                    or not parts[1].isdigit() or len(line) > _MAX_LINE):
                raise BadAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
            status = int(parts[1])
            fields = self._read_fields()
            if status >= 200:
                break
            if status == 101:
                raise BadAnswer("the server switched protocols, which no request asked for")
        keep = parts[0] == b"HTTP/1.1" and b"close" not in _tokens(fields.get(b"connection"))
        coding = fields.get(b"transfer-encoding")
        length = fields.get(b"content-length")
        if head_only or status in (204, 304):
            content = b""
        elif coding is not None:
            if _tokens(coding)[-1:] == [b"chunked"]:
                content = self._read_chunked()
            else:  # another coding last: the body runs to the close
                content, keep = fp.read(), False
            keep = keep and length is None  # both framings: answered, but not trusted again
        elif length is not None:
            sizes = set(_tokens(length))
            size = sizes.pop() if len(sizes) == 1 else b""
            if not size.isdigit():
                raise BadAnswer(f"not a Content-Length: {length[:80]!r}")
            content = fp.read(int(size))
            if len(content) < int(size):
                raise BadAnswer(f"the answer ended after {len(content)} of its {int(size)} bytes")
        else:
            content, keep = fp.read(), False  # no framing: the body runs to the close
        retry_after = fields.get(b"retry-after")
        answer = Answer(status, content, None if retry_after is None else retry_after.decode("latin-1"))
        return answer, keep

    def _read_fields(self) -> dict[bytes, bytes]:
        """Header fields up to the empty line: lower-case names, repeated ones joined by commas."""
        fields: dict[bytes, bytes] = {}
        name = b""
        for _ in range(_MAX_FIELDS):
            line = self.fp.readline(_MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return fields
            if not line.endswith(b"\n"):  # the close, or a line beyond the limit
                raise BadAnswer("the answer's header ended early" if len(line) <= _MAX_LINE
                                else "a header line too long")
            if line[0] in b" \t" and name:  # obs-fold: continues the field before (RFC 9112 5.2)
                fields[name] += b" " + line.strip()
                continue
            raw, colon, value = line.partition(b":")
            name = raw.lower()
            if not colon or not name or name != name.strip():
                raise BadAnswer(f"not a header field: {line[:80]!r}")
            value = value.strip()
            fields[name] = fields[name] + b", " + value if name in fields else value
        raise BadAnswer(f"more than {_MAX_FIELDS} header fields")

    def _read_chunked(self) -> bytes:
        fp, parts = self.fp, []
        while True:
            line = fp.readline(_MAX_LINE + 1)
            size = line.split(b";", 1)[0].strip()  # chunk extensions ignored
            if not size or size.strip(_HEX) or not line.endswith(b"\n"):
                raise BadAnswer(f"not a chunk size: {line[:80]!r}")
            n = int(size, 16)
            if n == 0:
                break
            data = fp.read(n)
            if len(data) < n or fp.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n"):
                raise BadAnswer("a chunk ended before its end")
            parts.append(data)
        self._read_fields()  # the trailer section, not used
        return b"".join(parts)


_MAX_LINE = 65536  # as http.client
_MAX_FIELDS = 100
_HEX = b"0123456789abcdefABCDEF"
_NOT_IN_TARGET = re.compile(r"[^\x21-\x7e]").search  # controls, spaces, non-ASCII
_NOT_IN_FIELD = re.compile(r"[\r\n\x00]").search


def _tokens(value: bytes | None) -> list[bytes]:
    """A comma-separated header value's items, lower case (``Connection``, ``Transfer-Encoding``)."""
    return [] if value is None else [t.strip() for t in value.lower().split(b",")]


def _request(method: str, target: str, host_line: str, headers: Mapping[str, str],
             body: bytes | None) -> bytes:
    """One request's bytes: its head, then its body. Refuses what would change the request's
    shape (as ``http.client`` does): a target with spaces or controls, a value with a line break."""
    if _NOT_IN_TARGET(target):
        raise ValueError(f"a request target may not hold spaces, controls or non-ASCII: {target!r}")
    head = [method, " ", target, " HTTP/1.1\r\n", host_line]
    for name, value in headers.items():
        if _NOT_IN_FIELD(value):
            raise ValueError(f"the {name} header may not hold a line break: {value!r}")
        head += (name, ": ", value, "\r\n")
    if body is not None:
        head += ("Content-Length: ", str(len(body)), "\r\n")
    data = "".join(head).encode("latin-1") + b"\r\n"
    return data if body is None else data + body


def _timeouts(timeout: Timeout) -> tuple[float | None, float | None, float | None]:
    """``(connect, write, read)`` seconds from what httpx accepts as a timeout."""
    t = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
    return t.connect, t.write, t.read


def _path_of(url: str) -> str:
    """The request target of an absolute ``http://host:port/path?query`` URL."""
    slash = url.find("/", url.find("//") + 2)
    return url[slash:] if slash >= 0 else "/"


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle connection is readable only if the server closed it (EOF) or broke the protocol."""
    poller = select.poll()  # not select.select: a training process may hold > 1024 descriptors
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
