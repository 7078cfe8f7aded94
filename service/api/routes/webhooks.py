"""``GET /v1/webhooks``: each configured webhook endpoint's delivery status (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from lrserve.service.api.deps import AdminAccess
from lrserve.service.api.responses import FastJSONResponse, webhooks_body
from lrserve.service.api.schemas import WebhooksPublic

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("", response_model=WebhooksPublic, dependencies=[AdminAccess])
async def webhooks_status(request: Request) -> Response:
    """Every configured endpoint (URL without query or user info; never the secret): what waits
    in its queue, what was delivered, the last error. Counts are shared by all replicas."""
    return FastJSONResponse(webhooks_body(await request.app.state.webhooks.status()))
