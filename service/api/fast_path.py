"""The hot path, answered before FastAPI: ``GET /v1/runs/{run_id}/lr`` of final steps.

Profiling (docs/performance.md) showed FastAPI's dependency solving and validation taking
most of a request whose answer is already in memory. This ASGI layer answers exactly
those requests itself — a well-formed query, an authorised token, every step in the
window final and cached — with the same body the route would give. Anything else
(errors, steps to commit, other routes) goes on to the FastAPI app unchanged, so the
route stays the one definition of the behaviour and of the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from lrserve.service.api.responses import window_body
from lrserve.service.api.schemas import MAX_STEP, RUN_ID_PATTERN
from lrserve.service.errors import LRServeError
from lrserve.service.runs.manager import ON_LOOP_VALUES, RunManager
from starlette.types import ASGIApp, Receive, Scope, Send

ROUTE = "/v1/runs/{run_id}/lr"
_PATH = re.compile(rf"^/v1/runs/({RUN_ID_PATTERN.strip('^$')})/lr$")
_MAX_DIGITS = len(str(MAX_STEP))  # longer strings go to the route's 422 (never to int())


@dataclass(eq=False)
class _Miss:
    """A request for a window not yet final, gone on to the route (which commits it)."""

    last: int
    """The last step it asked for."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0
    """Requests waiting for it to end."""


class FastWindows:
    """Serves cached windows of final values; passes every other request on.

    The ranks of a job ask for the same window at nearly the same moment, and the first
    to arrive commits it. Those that arrive while its commit is under way (in this
    process) wait for it and are answered here from what it made final, rather than each
    going through the route, a worker thread and the run's lock to find it done; if it
    fails, or made less final than they ask, they go on to the route as before.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._misses: dict[str, _Miss] = {}  # by run id: the request that commits its next window

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = self._asked(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        if asked is None:
            await self.app(scope, receive, send)
            return
        manager, run_id, step, ahead = asked
        body = self._answer(scope, manager, run_id, step, ahead)
        miss = self._misses.get(run_id) if body is None else None
        if miss is not None and miss.last >= step + ahead:  # committed by a request under way
            miss.waiting += 1
            try:
                await miss.done.wait()
            finally:
                miss.waiting -= 1
            body = self._answer(scope, manager, run_id, step, ahead)
        if body is not None:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if run_id in self._misses:
            await self.app(scope, receive, send)
            return
        miss = self._misses[run_id] = _Miss(step + ahead)
        try:
            await self.app(scope, receive, send)
        finally:
            del self._misses[run_id]
            miss.done.set()

    @staticmethod
    def _asked(scope: Scope) -> tuple[RunManager, str, int, int] | None:
        """What a well-formed, authorised request for a window asks (None: the route answers)."""
        match = _PATH.match(scope["path"])
        if match is None:
            return None
        query = _parse_query(scope.get("query_string", b""))
        if query is None:
            return None
        app = scope["app"]
        manager: RunManager | None = getattr(app.state, "manager", None)
        if manager is None:
            return None
        try:
            app.state.auth.require(_header(scope, b"authorization"), "read")
        except LRServeError:
            return None  # the route answers 401/403 with its usual body
        return manager, match.group(1), *query

    @staticmethod
    def _answer(scope: Scope, manager: RunManager, run_id: str, step: int, ahead: int) -> bytes | None:
        window = manager.cached_window(run_id, step, ahead, most_values=ON_LOOP_VALUES)
        if window is None:
            return None
        scope["lrserve.route"] = ROUTE  # for the telemetry middleware (and liveness)
        scope["path_params"] = {"run_id": window.run_id}  # as the route would have it
        return orjson.dumps(window_body(window))


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
