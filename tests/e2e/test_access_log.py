"""``lrserve serve`` logs requests only with ``--access-log``: at the default level (info)
a line per request would cost the hot path more than it tells."""

from __future__ import annotations

import httpx
import pytest

from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("args", "logged"), [((), False), (("--access-log",), True)])
def test_requests_are_logged_only_when_asked(tmp_path, args, logged):
    server = ServerProcess(f"sqlite:///{tmp_path}/a.db", tmp_path, log_level="info", args=args).start()
    try:
        assert httpx.get(f"{server.url}/v1/runs/no-such-run/lr?step=0").status_code == 404
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "Application startup complete" in log  # info lines are there either way
    assert ('"GET /v1/runs/no-such-run/lr?step=0 HTTP/1.1" 404' in log) is logged
