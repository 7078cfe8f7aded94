"""``GET /v1/whoami``: who the caller's token is and what it may do (the dashboard asks)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from lrserve.service.api.deps import ReadAccess
from lrserve.service.api.responses import FastJSONResponse, whoami_body
from lrserve.service.api.schemas import WhoAmI
from lrserve.service.auth import Identity

router = APIRouter(prefix="/v1", tags=["auth"])


@router.get("/whoami", response_model=WhoAmI)
async def read_whoami(identity: Annotated[Identity, ReadAccess]) -> Response:
    """The token's name (the actor on what it does) and role; `admin` named `local` on a server
    without tokens. Any valid token may ask (401 without one)."""
    return FastJSONResponse(whoami_body(identity.name, identity.role))
