"""lrserve's own app plus one trivial route, ``GET /bench/ping``: the ceiling of the stack.

``GET /healthz`` is a plain ``def`` route, so FastAPI runs it in a worker thread; the hot
path (``GET .../lr``) is ``async`` and answers on the event loop. A fair ceiling for the hot
path is therefore an ``async`` route that does nothing: same uvicorn, same middleware
(telemetry, body limit), same JSON response class. The figure reports both.
"""

from __future__ import annotations

from fastapi import FastAPI, Response

from service.api.responses import FastJSONResponse
from service.app import create_app as create_service_app


def create_app() -> FastAPI:
    app = create_service_app()

    @app.get("/bench/ping", include_in_schema=False)
    async def ping() -> Response:
        return FastJSONResponse({"status": "ok"})

    return app
