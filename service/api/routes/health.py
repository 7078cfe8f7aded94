"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from lrserve.service.api.deps import StoreDep
from lrserve.service.api.responses import FastJSONResponse, status_body
from lrserve.service.api.schemas import HealthPublic
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthPublic)
def read_health() -> Response:
    """The process is up."""
    return FastJSONResponse(status_body("ok"))


@router.get("/readyz", response_model=HealthPublic)
def read_ready(store: StoreDep) -> Response:
    """The store is reachable (503 otherwise)."""
    store.ping()
    return FastJSONResponse(status_body("ready"))


@router.get("/metrics", response_class=PlainTextResponse)
def read_metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.telemetry.registry), media_type=CONTENT_TYPE_LATEST)
