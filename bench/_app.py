"""lrserve's own app plus two bench-only routes, under the same uvicorn settings.

- ``GET /bench/ping``: the ceiling of the stack. ``GET /healthz`` is a plain ``def`` route,
  so FastAPI runs it in a worker thread; the hot path (``GET .../lr``) is ``async`` and
  answers on the event loop. A fair ceiling for it is an ``async`` route that does
  nothing: same uvicorn, same middleware (telemetry, body limit), same JSON response.
- ``GET /bench/lean/v1/runs/{run_id}/lr``: a *prototype*, not lrserve's route, for the
  proposal in docs/performance.md: the same answer for final values in memory, from a
  plain Starlette route that parses its two integers and checks the token itself instead
  of FastAPI's dependency solving (about a quarter of the server's CPU under the hot-path
  load). Anything it cannot answer from memory goes to the real route's code path.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from service.api.responses import FastJSONResponse
from service.api.routes.steps import window_public
from service.app import create_app as create_service_app


def create_app() -> FastAPI:
    app = create_service_app()

    @app.get("/bench/ping", include_in_schema=False)
    async def ping() -> Response:
        return FastJSONResponse({"status": "ok"})

    async def lean_lr(request: Request) -> Response:
        request.app.state.auth.require(request.headers.get("authorization"), "read")
        query = request.query_params
        try:
            step, ahead = int(query["step"]), int(query.get("ahead", "0"))
        except (KeyError, ValueError):
            step = ahead = -1
        run_id = request.path_params["run_id"]
        manager = request.app.state.manager
        window = manager.cached_window(run_id, step, ahead) if step >= 0 and ahead >= 0 else None
        if window is None:  # not final in memory, or invalid: what the real route would do
            window = await run_in_threadpool(manager.window, run_id, step, ahead)
        return FastJSONResponse(window_public(window))

    app.router.routes.insert(0, Route("/bench/lean/v1/runs/{run_id}/lr", lean_lr, methods=["GET"]))
    return app
