"""Stepping, the hot path: windows of final values, metrics that drive decisions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import ManagerDep, ReadAccess, WriteAccess
from service.api.responses import FastJSONResponse
from service.api.routes.spike_guard import spike_public
from service.api.schemas import MetricsAccepted, MetricsCreate, RunId, Step, StepRequest, StepResult
from service.runs.manager import Window

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["steps"])


def window_public(window: Window) -> dict:
    lrs = [list(v[0]) for v in window.values]
    moms = None if window.values[0][1] is None else [list(v[1]) for v in window.values]
    public = {
        "run_id": window.run_id,
        "step": window.start,
        "lrs": lrs[0],
        "momentums": moms[0] if moms is not None else None,
        "status": window.status,
        "stopped_at": window.stopped_at,
        "switched_at": window.switched_at,
        "window": {"start": window.start, "lrs": lrs, "momentums": moms},
    }
    if window.spikes:  # a spike guard's backoffs that take effect in this window
        public["spikes"] = [spike_public(s) for s in window.spikes]
    return public


@router.get("/lr", response_model=StepResult, dependencies=[ReadAccess])
async def read_lr(
    run_id: RunId,
    manager: ManagerDep,
    step: Annotated[Step, Query()],
    ahead: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Values for steps step..step+ahead (capped); asking commits them (they become final)."""
    # Final values already in memory are answered right here, without a worker thread.
    window = manager.cached_window(run_id, step, ahead)
    if window is None:
        window = await run_in_threadpool(manager.window, run_id, step, ahead)
    return FastJSONResponse(window_public(window))


@router.post("/step", response_model=StepResult, dependencies=[WriteAccess])
async def step_run(run_id: RunId, body: StepRequest, request: Request) -> Response:
    """Commit `step` with the metrics reported with it, as `scheduler.step(metric)` would.

    With `world_size > 1` and the watched metric, waits at the metric barrier.
    """
    barriers = request.app.state.barriers
    window = await barriers.step(run_id, body.step, body.metrics, body.rank, body.ahead)
    return FastJSONResponse(window_public(window))


@router.post("/metrics", response_model=MetricsAccepted, status_code=202, dependencies=[WriteAccess])
def log_metrics(run_id: RunId, body: MetricsCreate, manager: ManagerDep) -> Response:
    """Record metrics for history and plots (idempotent per name, step and rank)."""
    new = manager.record_metrics(run_id, [r.model_dump() for r in body.records])
    return FastJSONResponse({"accepted": len(body.records), "new": new}, status_code=202)
