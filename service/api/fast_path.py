"""The hot path, answered before FastAPI: ``GET /v1/runs/{run_id}/lr``.

Profiling (docs/performance.md) showed FastAPI's dependency solving and validation taking
most of a request whose answer is already in memory. This ASGI layer answers exactly
those requests itself — a well-formed query, an authorised token, a loaded run — with the
same body the route would give: a window of final steps from memory, or one whose new steps
it commits right here on the event loop when that needs no wait and little work
(``RunManager.window_now``: SQLite, the write slot free; durable before the answer, as
always). Anything else (errors, work for a worker thread, other routes) goes on to the
FastAPI app unchanged, so the route stays the one definition of the behaviour, of the
errors and of the OpenAPI document.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl

import orjson
from lrserve.service.api.responses import window_body
from lrserve.service.api.schemas import MAX_STEP, RUN_ID_PATTERN
from lrserve.service.errors import LRServeError
from lrserve.service.runs.manager import ON_LOOP_VALUES, RunManager, Window
from starlette.types import ASGIApp, Receive, Scope, Send

ROUTE = "/v1/runs/{run_id}/lr"
_PATH = re.compile(rf"^/v1/runs/({RUN_ID_PATTERN.strip('^$')})/lr$")
log = logging.getLogger("lrserve")
_MAX_DIGITS = len(str(MAX_STEP))  # longer strings go to the route's 422 (never to int())


class FastWindows:
    """Serves cached windows of final values; passes every other request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            body = self._answer(scope)
            if body is not None:
                scope["lrserve.route"] = ROUTE  # for the telemetry middleware (and liveness)
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _answer(self, scope: Scope) -> bytes | None:
        match = _PATH.match(scope["path"])
        if match is None:
            return None
        query = _parse_query(scope.get("query_string", b""))
        if query is None:
            return None
        app = scope["app"]
        manager = getattr(app.state, "manager", None)
        if manager is None:
            return None
        try:
            app.state.auth.require(_header(scope, b"authorization"), "read")
        except LRServeError:
            return None  # the route answers 401/403 with its usual body
        window = manager.cached_window(match.group(1), *query, most_values=ON_LOOP_VALUES)
        if window is None:
            window = _committed_now(manager, match.group(1), *query)
            if window is None:
                return None
        scope["path_params"] = {"run_id": window.run_id}  # as the route would have it
        return orjson.dumps(window_body(window))


def _committed_now(manager: RunManager, run_id: str, step: int, ahead: int) -> Window | None:
    """The window with its new steps committed here on the loop, or None: the route answers
    (in a worker thread). An error, too, goes on to the route, which asks again, as a client's
    retry would (a refused request changed nothing; a commit that went through is final there)
    and answers it the one way errors are answered."""
    try:
        return manager.window_now(run_id, step, ahead, most_values=ON_LOOP_VALUES)
    except LRServeError:
        return None
    except Exception:
        log.exception("GET %s/lr on the event loop failed; the route asks again", run_id)
        return None


def _parse_query(raw: bytes) -> tuple[int, int] | None:
    """``step`` and ``ahead`` when the query holds exactly those, as plain non-negative ints."""
    try:
        pairs = parse_qsl(raw.decode("latin-1"), strict_parsing=True)
    except ValueError:
        return None
    params: dict[str, Any] = dict(pairs)
    if len(params) != len(pairs) or not set(params) <= {"step", "ahead"} or "step" not in params:
        return None
    values = [params["step"], params.get("ahead", "0")]
    if not all(len(v) <= _MAX_DIGITS and v.isdigit() and v.isascii() for v in values):
        return None
    step, ahead = (int(v) for v in values)
    return (step, ahead) if step <= MAX_STEP else None


def _header(scope: Scope, name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
