"""The spike guard of a run: its settings, spikes and the detector's baseline band."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import ManagerDep, ReadAccess
from service.api.responses import FastJSONResponse
from service.api.schemas import RunId, SpikeGuardPublic
from service.engine.codec import public_float
from service.engine.spike_guard import Spike

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["runs"])


def spike_public(spike: Spike) -> dict[str, Any]:
    """A spike as the ``loss_spike`` event shows it (without ``at``)."""
    payload = spike.payload()
    payload["value"] = public_float(payload["value"])
    return {"kind": "loss_spike", **payload}


@router.get("/spike-guard", response_model=SpikeGuardPublic, dependencies=[ReadAccess])
async def read_spike_guard(
    run_id: RunId,
    manager: ManagerDep,
    max_points: Annotated[int, Query(ge=2, le=10_000)] = 1000,
) -> Response:
    """The run's spike guard: settings, spikes, the backoff now, and each rank's baseline band."""
    guard = await run_in_threadpool(manager.spike_guard, run_id, max_points)
    guard["spikes"] = [spike_public(s) for s in guard["spikes"]]
    for series in guard["band"].values():
        series["values"] = [public_float(v) for v in series["values"]]  # NaN: a spike, plotted
    return FastJSONResponse(guard)
