"""Slow and half-sent requests behind the compose proxy: ``docker/nginx.conf`` as shipped,
run by a real nginx in front of a real ``lrserve serve`` (default settings).

Only the replicas' addresses and the listening port are rewritten (no Docker engine runs
here); every other line is the file compose mounts. Needs an ``nginx`` binary: where none
is installed the module is skipped with that reason (``tests/trainer/test_compose.py``
checks the file's names everywhere).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.adversarial.test_slow_clients import _send_and_wait
from tests.live_server import ServerProcess, free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(NGINX is None, reason="no nginx binary installed")]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("proxy")
    with ServerProcess(f"sqlite:///{tmp / 'lrserve.db'}", tmp) as server:
        port = free_port()
        shipped = (ROOT / "docker" / "nginx.conf").read_text()
        site = re.sub(r"^\s*server\s+lrserve-\d:8000[^;]*;\n", "", shipped, flags=re.M)
        site = site.replace("upstream lrserve {", f"upstream lrserve {{\n    server {server.url.removeprefix('http://')};")
        site = re.sub(r"listen\s+8080;", f"listen 127.0.0.1:{port};", site)
        assert f"127.0.0.1:{port}" in site and "lrserve-1" not in site
        (tmp / "site.conf").write_text(site)
        temp = {name: tmp / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir()
        (tmp / "nginx.conf").write_text("\n".join([
            "user root;" if os.geteuid() == 0 else "",
            "daemon off;", "worker_processes 1;", f"pid {tmp / 'nginx.pid'};",
            f"error_log {tmp / 'error.log'} warn;",
            "events { worker_connections 4096; }",
            "http {", "  access_log off;",
            f"  client_body_temp_path {temp['body']};", f"  proxy_temp_path {temp['proxy']};",
            f"  fastcgi_temp_path {temp['fastcgi']};", f"  uwsgi_temp_path {temp['uwsgi']};",
            f"  scgi_temp_path {temp['scgi']};",
            f"  include {tmp / 'site.conf'};", "}", ""]))
        process = subprocess.Popen([NGINX, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                                   stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert process.poll() is None, (tmp / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not answer"
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            process.wait(30)


def test_a_request_through_the_proxy_reaches_the_server(proxy):
    created = httpx.post(f"{proxy}/v1/runs", json={"schedule": {"type": "StepLR", "step_size": 2},
                                                   "base_lrs": [0.1]})
    assert created.status_code == 201


def test_half_sent_requests_end_at_the_proxy(proxy):
    """Headers or a body never finished: nginx closes the connection after
    ``client_header_timeout`` / ``client_body_timeout`` (10 s), with no answer (nginx sends no
    ``408``; a replica behind it never sees the request)."""

    async def both():
        return await asyncio.gather(
            _send_and_wait(proxy, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"),
            _send_and_wait(proxy, b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 100\r\n\r\n{"))

    for answer, seconds in asyncio.run(both()):
        assert answer == b"" and 9 < seconds < 30
    assert httpx.get(f"{proxy}/healthz", timeout=30).status_code == 200


def test_more_connections_than_the_proxy_allows_one_address_get_the_apis_503(proxy):
    """``limit_conn per_client 512``: the 513th open connection from one address gets a
    ``503`` in the API's error shape (before: nginx's HTML page), while the first 512 wait."""

    async def flood():
        host, port = proxy.removeprefix("http://").split(":")
        opened = []
        try:
            for _ in range(512):  # each holds a request nginx is still reading (the body is short)
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
                opened.append((reader, writer))
            await asyncio.sleep(0.5)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return answer
        finally:
            for _, writer in opened:
                writer.close()

    answer = asyncio.run(flood())
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer[:300]
    assert httpx.Response(503, content=content).json()["code"] == "too_many_connections"
    time.sleep(1)  # the 512 closed: the proxy serves again
    assert httpx.get(f"{proxy}/healthz", timeout=30).status_code == 200
