"""A real ``lrserve serve`` process per module, with the default settings (an SQLite file)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.live_server import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("server")
    with ServerProcess(f"sqlite:///{tmp / 'lrserve.db'}", tmp) as proc:
        yield proc


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def post_json(http: httpx.Client, url: str, body: object) -> httpx.Response:
    """POST with Python's JSON, which writes NaN and Infinity (httpx refuses to)."""
    return http.post(url, content=json.dumps(body), headers={"content-type": "application/json"})
