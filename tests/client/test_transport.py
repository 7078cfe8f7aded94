"""``KeepAliveSender`` (``http.client``) and when ``LRClient`` uses it instead of httpx.

The failure cases run against a scripted socket server (what a real server does at the byte
level: close an idle connection, never answer, break off an answer); the rest against a
real lrserve process.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from lrserve.client import LRClient, ServerError, ServerTimeout, ServerUnreachable, TransportError
from lrserve.client._transport import HttpxSender, KeepAliveSender, plain_http_route

from tests.live_server import ServerProcess, free_port

OK = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"
      b'{"ok":true}')

Script = Callable[[socket.socket, int], None]
"""What the scripted server does with its n-th accepted connection."""


class ScriptedServer:
    """Accepts connections on loopback and hands each to ``script``; counts them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self.script, args=(conn, self.accepted), daemon=True)
            thread.start()
            self._threads.append(thread)

    def read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                while len(body) < int(line.split(b":")[1]):
                    body += conn.recv(65536)
        self.requests.append(head + b"\r\n\r\n" + body)
        return data

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], ScriptedServer]]:
    made: list[ScriptedServer] = []

    def make(script: Script) -> ScriptedServer:
        made.append(ScriptedServer(script))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_plain_http_server_with_no_proxy_gets_the_keep_alive_sender(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert plain_http_route("http://lrserve:8000") == ("lrserve", 8000)
    assert plain_http_route("http://10.0.0.5") == ("10.0.0.5", 80)
    assert plain_http_route("http://[::1]:8000") == ("::1", 8000)
    # an international name as IDNA, as httpx sends it (the Host line is ASCII)
    assert plain_http_route("http://bücher.example:8000") == ("xn--bcher-kva.example", 8000)
    with LRClient("http://127.0.0.1:9") as api:
        assert isinstance(api._sender, KeepAliveSender)
    # httpx carries what needs it: TLS, and a proxy from the environment (with its NO_PROXY rules)
    assert plain_http_route("https://lrserve:8443") is None
    assert plain_http_route("http://user:secret@lrserve:8000") is None
    with LRClient("https://127.0.0.1:9") as api:
        assert isinstance(api._sender, HttpxSender) and api._sender._owned
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert plain_http_route("http://lrserve:8000") is None
    with LRClient("http://127.0.0.1:9") as api:
        assert isinstance(api._sender, HttpxSender)
    injected = httpx.Client()
    with LRClient("http://127.0.0.1:9", http_client=injected) as api:
        assert isinstance(api._sender, HttpxSender) and not api._sender._owned
    assert not injected.is_closed  # an injected client is the caller's to close
    injected.close()


def test_one_connection_carries_many_requests(scripted):
    def keep_answering(conn: socket.socket, n: int) -> None:
        with conn:
            while server.read_request(conn):
                conn.sendall(OK)

    server = scripted(keep_answering)
    with LRClient(f"http://127.0.0.1:{server.port}", token="t0k") as api:
        for _ in range(5):
            assert api.request("GET", "/v1/whoami") == {"ok": True}
        assert api.request("POST", "/v1/x", json={"loss": math.nan}) == {"ok": True}
    assert server.accepted == 1
    first, last = server.requests[0], server.requests[-1]
    assert first.startswith(b"GET /v1/whoami HTTP/1.1\r\n")
    assert b"Host: 127.0.0.1:%d" % server.port in first and b"Authorization: Bearer t0k" in first
    assert last.endswith(b'{"loss":NaN}') and b"Content-Type: application/json" in last


def test_a_connection_the_server_closed_while_idle_is_not_used(scripted):
    """uvicorn closes an idle keep-alive connection after 5 s: the next request, even one that
    is never retried (a control action), goes out on a new connection and succeeds."""
    def answer_once_then_close(conn: socket.socket, n: int) -> None:
        with conn:
            server.read_request(conn)
            conn.sendall(OK)  # no "connection: close": the client keeps it

    server = scripted(answer_once_then_close)
    with LRClient(f"http://127.0.0.1:{server.port}", max_retries=0) as api:
        assert api.request("GET", "/a") == {"ok": True}
        time.sleep(0.2)  # the server has closed it by now
        hold = api.request("POST", "/v1/runs/r/control", json={"action": "hold"}, idempotent=False)
        assert hold == {"ok": True}
    assert server.accepted == 2


def test_nothing_listening_is_unreachable(monkeypatch):
    port = free_port()
    with LRClient(f"http://127.0.0.1:{port}", max_retries=0) as api:
        with pytest.raises(ServerUnreachable, match="could not connect"):
            api.request("GET", "/healthz")


def test_no_answer_in_time_is_a_timeout(scripted):
    def never_answer(conn: socket.socket, n: int) -> None:
        server.read_request(conn)
        time.sleep(3)
        conn.close()

    server = scripted(never_answer)
    with LRClient(f"http://127.0.0.1:{server.port}", max_retries=0, timeout=0.3) as api:
        started = time.monotonic()
        with pytest.raises(ServerTimeout):
            api.request("GET", "/v1/runs/r")
        assert time.monotonic() - started < 2.5


def test_an_answer_broken_off_is_a_transport_error_not_unreachable(scripted):
    """Something reached the server: a request that is not idempotent must not be sent again."""
    def break_off(conn: socket.socket, n: int) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"par")
        conn.close()

    server = scripted(break_off)
    with LRClient(f"http://127.0.0.1:{server.port}", max_retries=3, sleep=lambda s: None) as api:
        with pytest.raises(TransportError) as caught:
            api.request("POST", "/v1/runs/r/control", json={"action": "stop"}, idempotent=False)
    assert not isinstance(caught.value, ServerUnreachable)
    assert server.accepted == 1  # sent once


def test_error_answers_keep_their_code_and_retry_after(scripted):
    body = b'{"detail":"busy","code":"store_unavailable","errors":[]}'

    def unavailable(conn: socket.socket, n: int) -> None:
        with conn:
            while server.read_request(conn):
                head = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: %d\r\n\r\n"
                conn.sendall(head % len(body) + body)

    server = scripted(unavailable)
    delays: list[float] = []
    url = f"http://127.0.0.1:{server.port}"
    with LRClient(url, max_retries=1, sleep=delays.append, rand=lambda: 0.0) as api:
        with pytest.raises(ServerError) as caught:
            api.request("GET", "/v1/runs/r")
    assert caught.value.status_code == 503 and caught.value.code == "store_unavailable"
    assert delays == [2.0]  # Retry-After honoured


def test_threads_share_the_sender_against_a_real_server(tmp_path):
    """The fetch thread, the tail thread and the training thread use one client at once."""
    server = ServerProcess(f"sqlite:///{tmp_path}/db.sqlite", tmp_path).start()
    try:
        with LRClient(server.url) as api:
            api.create_run({"type": "StepLR", "step_size": 3, "gamma": 0.5}, [0.1], run_id="r")
            expected = [0.1 * 0.5 ** (s // 3) for s in range(40)]
            errors: list[BaseException] = []

            def ask(offset: int) -> None:
                try:
                    for i in range(40):
                        step = (i + offset) % 40
                        assert api.read_lr("r", step)["lrs"] == [expected[step]]
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    errors.append(exc)

            threads = [threading.Thread(target=ask, args=(k * 5,)) for k in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors[0]
            assert len(api._sender._idle) <= 8  # type: ignore[attr-defined]
    finally:
        server.stop()


def test_an_answer_sent_before_the_whole_body_is_read_is_kept(scripted):
    """A server refuses a body too large from its Content-Length (a 413) and closes without
    reading it: the client's send fails, and the answer, already there, is what it reports
    (as httpx does), not a broken connection retried three times."""
    body = b'{"detail":"the body is larger than 1048576 bytes","code":"limit_exceeded","errors":[]}'

    def refuse_big_bodies(conn: socket.socket, n: int) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
                     % len(body) + body)
        conn.close()

    server = scripted(refuse_big_bodies)
    with LRClient(f"http://127.0.0.1:{server.port}", sleep=lambda s: None) as api:
        with pytest.raises(ServerError) as caught:
            api.request("POST", "/v1/runs/r/metrics", json={"records": ["x" * 64] * 400_000})
    assert caught.value.status_code == 413 and caught.value.code == "limit_exceeded"
    assert server.accepted == 1  # not retried: a 413 is final


def _answer_each(server_of: Callable[[], ScriptedServer], answers: list[bytes]) -> Script:
    """A script that reads a request and sends the next of ``answers``, while they last and the
    connection stays open."""

    def script(conn: socket.socket, n: int) -> None:
        with conn:
            while answers and server_of().read_request(conn):
                conn.sendall(answers.pop(0))

    return script


def _answer_once(server_of: Callable[[], ScriptedServer], answer: bytes) -> Script:
    """A script that reads one request on each connection, sends ``answer`` and closes it."""

    def script(conn: socket.socket, n: int) -> None:
        with conn:
            server_of().read_request(conn)
            conn.sendall(answer)

    return script


def test_chunked_answers_are_joined_and_keep_the_connection(scripted):
    chunked = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5;ext=1\r\n{\"ok\"\r\n6\r\n:true}\r\n0\r\nx-trailer: 1\r\n\r\n")
    server = scripted(_answer_each(lambda: server, [chunked, chunked]))
    with LRClient(f"http://127.0.0.1:{server.port}", max_retries=0) as api:
        assert api.request("GET", "/a") == {"ok": True}
        assert api.request("GET", "/b") == {"ok": True}
    assert server.accepted == 1


def test_interim_answers_are_skipped(scripted):
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
    server = scripted(_answer_each(lambda: server, [early + OK, OK]))
    with LRClient(f"http://127.0.0.1:{server.port}", max_retries=0) as api:
        assert api.request("POST", "/a", json={"x": 1}) == {"ok": True}
        assert api.request("GET", "/b") == {"ok": True}  # the same connection, nothing left over
    assert server.accepted == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\ncontent-length: 11\r\n\r\n{\"ok\":true}",
        b"HTTP/1.0 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"ok\":true}",  # up to the close
    ],
    ids=["connection-close", "http-1.0", "no-framing"],
)
def test_an_answer_that_ends_its_connection_is_read_and_the_next_request_connects_again(scripted, answer):
    server = scripted(_answer_once(lambda: server, answer))
    with LRClient(f"http://127.0.0.1:{server.port}", max_retries=0) as api:
        for path in ("/a", "/b"):
            assert api.request("POST", path, json={}, idempotent=False) == {"ok": True}
    assert server.accepted == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: eleven\r\n\r\n{\"ok\":true}",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"ok\"",
        b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
    ],
    ids=["not-http", "bad-length", "chunks-cut", "bad-field"],
)
def test_what_is_not_a_whole_http_answer_is_a_transport_error(scripted, answer):
    server = scripted(_answer_once(lambda: server, answer))
    with LRClient(f"http://127.0.0.1:{server.port}", max_retries=0) as api:
        with pytest.raises(TransportError) as caught:
            api.request("GET", "/a")
    assert not isinstance(caught.value, (ServerUnreachable, ServerTimeout))


def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent(scripted):
    server = scripted(_answer_each(lambda: server, [OK]))
    with LRClient(f"http://127.0.0.1:{server.port}", token="t0k\r\nX-Admin: 1") as api:
        with pytest.raises(ValueError, match="Authorization"):
            api.request("GET", "/a")
        with pytest.raises(ValueError, match="target"):
            api.request("GET", "/a b")
    assert server.requests == []
