"""lrserve's own app plus one bench-only route, under the same uvicorn settings.

``GET /bench/ping`` is the ceiling of the stack. ``GET /healthz`` is a plain ``def`` route,
so FastAPI runs it in a worker thread; the hot path (``GET .../lr``) is answered on the
event loop. A fair ceiling for it is an ``async`` route that does nothing: same uvicorn,
same middleware (telemetry, body limit), same JSON response.
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from lrserve.service.api.responses import FastJSONResponse, status_body
from lrserve.service.app import create_app as create_service_app


def create_app() -> FastAPI:
    app = create_service_app()

    @app.get("/bench/ping", include_in_schema=False)
    async def ping() -> Response:
        return FastJSONResponse(status_body("ok"))

    return app
