"""The spike guard of a run: its settings, spikes and the detector's baseline band."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from lrserve.service.api.deps import ManagerDep, ReadAccess
from lrserve.service.api.responses import spike_guard_json
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
    def answer() -> bytes:  # up to the budget's points (~8 MB): written in the worker thread, not the loop
        return spike_guard_json(manager.spike_guard(run_id, max_points))

    return Response(await run_in_threadpool(answer), media_type="application/json")
