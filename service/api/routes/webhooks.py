"""``GET /v1/webhooks``: each configured webhook endpoint's delivery status (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from service.api.deps import AdminAccess
from service.api.responses import FastJSONResponse

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookStatus(BaseModel):
    url: str
    kinds: list[str] | None
    labels: dict[str, str] | None
    pending: int
    retrying: int
    oldest_pending_id: int | None
    queued_through_id: int
    delivered: int
    failed_attempts: int
    last_error: str | None
    last_error_at: str | None
    last_delivered_at: str | None


class WebhooksPublic(BaseModel):
    data: list[WebhookStatus]


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


@router.get("", response_model=WebhooksPublic, dependencies=[AdminAccess])
async def webhooks_status(request: Request) -> Response:
    """Every configured endpoint (URL without query or user info; never the secret): what waits
    in its queue, what was delivered, the last error. Counts are shared by all replicas."""
    found = await request.app.state.webhooks.status()
    return FastJSONResponse({"data": [{
        "url": endpoint.shown,
        "kinds": [k.value for k in endpoint.kinds] if endpoint.kinds else None,
        "labels": endpoint.labels,
        "pending": status.pending,
        "retrying": status.retrying,
        "oldest_pending_id": status.oldest_pending_gid,
        "queued_through_id": status.queued_after,
        "delivered": status.delivered,
        "failed_attempts": status.failures,
        "last_error": status.last_error,
        "last_error_at": _iso(status.last_error_at),
        "last_delivered_at": _iso(status.last_delivered_at),
    } for endpoint, status in found]})
