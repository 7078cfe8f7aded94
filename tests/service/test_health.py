"""``HealthListener``: probes on a port of their own, answered by a thread of their own, saying
what the server's event loop and store say (``service/health.py``)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from lrserve.service import health
from lrserve.service.errors import StoreUnavailable
from lrserve.service.health import HealthListener, port_problem

from tests.live_server import free_port


async def _get(port: int, raw: bytes) -> tuple[int, dict | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    if not answer:
        return 0, None
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head
    return int(head.split(b" ")[1]), json.loads(body)


def _get_with_the_loop_stopped(port: int, raw: bytes) -> tuple[int, dict]:
    """``_get`` with a plain blocking socket, called on the event loop's thread: the loop does
    not turn until the answer is in, as a wedged loop would not (so its heartbeat cannot be
    stamped meanwhile; an awaited request let the loop turn, and a beat due in that time made
    the probe's answer 200: once in a full suite at load 6)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _request(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode()


def test_probes_say_what_the_loop_and_the_store_say():
    down = []

    def ping() -> None:
        if down:
            raise StoreUnavailable("/srv/secret/lrserve.db: no such file")

    async def scenario() -> None:
        port = free_port()
        probes = HealthListener("127.0.0.1", port, ping)
        await probes.start()
        try:
            assert await _get(port, _request("/healthz")) == (200, {"status": "ok"})
            assert await _get(port, _request("/readyz?verbose=1")) == (200, {"status": "ready"})
            down.append(True)
            status, body = await _get(port, _request("/readyz"))
            assert status == 503 and body["code"] == "store_unavailable" and "/srv" not in body["detail"]
            assert await _get(port, _request("/healthz")) == (200, {"status": "ok"})  # alive all the same
            status, body = await _get(port, _request("/v1/runs"))
            assert status == 404 and body["code"] == "not_found"
            assert (await _get(port, _request("/healthz", "POST")))[0] == 404
            assert await _get(port, b"GET /healthz HTTP/1.1\r\nHost: " + b"x" * 2000) == (0, None)  # too long
            started = time.monotonic()
            assert await _get(port, b"GET /healthz HTTP/1.1\r\n") == (0, None)  # half-sent: closed
            assert time.monotonic() - started < health.READ_S + 5
            probes.beat -= health.STALLED_S + 1  # as if the server's event loop had stopped turning
            status, body = _get_with_the_loop_stopped(port, _request("/healthz"))  # and it does not turn
            assert status == 503 and body["code"] == "event_loop_stalled"
            await asyncio.sleep(health.BEAT_S * 2)  # turning again: it stamps a new beat
            assert (await _get(port, _request("/healthz")))[0] == 200
        finally:
            await probes.close()
        with pytest.raises(OSError):  # closed: nothing listens there any more
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(scenario())


def test_a_port_that_cannot_be_bound_is_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        problem = port_problem("127.0.0.1", taken.getsockname()[1])
    assert problem is not None and problem.startswith("LRSERVE_HEALTH_PORT: cannot listen on 127.0.0.1:")
    assert "\n" not in problem


def test_the_probes_port_differs_from_the_apis():
    from lrserve.service.settings import Settings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="health_port must differ from port"):
        Settings(port=8000, health_port=8000)
    assert Settings(port=8000, health_port=8001).health_port == 8001
    assert Settings().health_port is None  # off unless asked: a second port must be chosen
