"""Fleet control: one operator action on every run a label selector matches (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from lrserve.service.api.deps import AdminAccess, ManagerDep
from lrserve.service.api.responses import FastJSONResponse, fleet_body
from lrserve.service.api.schemas import FleetControlRequest, FleetControlResult
from lrserve.service.auth import Identity
from lrserve.service.fleet import Selector, control_fleet

router = APIRouter(prefix="/v1", tags=["fleet"])


@router.post("/control", response_model=FleetControlResult, response_model_exclude_none=True)
def control_selected(
    body: FleetControlRequest, manager: ManagerDep, identity: Annotated[Identity, AdminAccess]
) -> Response:
    """Apply one action to every run matching `selector` (labels and/or statuses), each at its
    own first free step. One result per run: `applied_at`, or the `error` that run answered
    (the others still took the action). `dry_run` lists the matches and changes nothing."""
    selector = Selector(body.selector.labels, body.selector.status)
    action = body.action.given()
    outcome = control_fleet(manager, selector, action, actor=identity.name, reason=body.reason,
                            dry_run=body.dry_run)
    return FastJSONResponse(fleet_body(outcome))
