"""The spike guard of a run: its settings, spikes and the detector's baseline band."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from lrserve.service.api.deps import ManagerDep, ReadAccess
from lrserve.service.api.responses import FastJSONResponse, spike_guard_body
from lrserve.service.api.schemas import QueryInt, RunId, SpikeGuardPublic
from starlette.concurrency import run_in_threadpool

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["runs"])


@router.get("/spike-guard", response_model=SpikeGuardPublic, dependencies=[ReadAccess])
async def read_spike_guard(
    run_id: RunId,
    manager: ManagerDep,
    max_points: Annotated[QueryInt, Query(ge=2, le=10_000)] = 1000,
) -> Response:
    """The run's spike guard: settings, spikes, the backoff now, and each rank's baseline band."""
    view = await run_in_threadpool(manager.spike_guard, run_id, max_points)
    return FastJSONResponse(spike_guard_body(view))
