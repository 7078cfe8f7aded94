"""Stepping, the hot path: windows of final values, metrics that drive decisions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from lrserve.service.api.deps import ManagerDep, ReadAccess, access, small_or_in_thread
from lrserve.service.api.fast_path import FastWrite
from lrserve.service.api.responses import (
    FastJSONResponse,
    event_body,
    metrics_accepted_body,
    tail_body,
    window_body,
    window_response,
)
from lrserve.service.api.schemas import (
    AHEAD_DOC,
    MetricsAccepted,
    MetricsCreate,
    QueryInt,
    QueryStep,
    RunId,
    StepRequest,
    StepResult,
)
from lrserve.service.auth import Identity
from lrserve.service.runs import provisional
from lrserve.service.runs.manager import ON_LOOP_VALUES, RunManager, Window
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["steps"])

_RANK_DOC = "The asking rank (named in a provisional_divergence)."
_TAIL_DOC = "Steps of provisional values wanted after the window (capped by LRSERVE_MAX_PROVISIONAL)."
_FROM_DOC = "The first step this job took on provisional values during an outage now over."
_ID_DOC = "The `provisional.id` of the tail held (those steps came from)."
_AFTER_DOC = (
    "The last step of the tail held (with `provisional_id`): if still valid, the answer's tail "
    "continues it rather than repeating it."
)


def _with_tail(
    manager: RunManager,
    window: Window,
    rank: int,
    size: int,
    since: int | None,
    tail_id: int | None,
    held_until: int | None = None,
) -> dict[str, Any]:
    """The answer, with the provisional tail asked for and the outage settled (in a worker thread)."""
    body = window_body(window)
    if since is not None:
        divergence = provisional.settle(manager, window.run_id, rank, since, window.start, tail_id)
        if divergence is not None:
            body["provisional_divergence"] = event_body(divergence)
    if size > 0 or since is not None:
        end = window.start + len(window.values) - 1
        held = (tail_id, held_until) if tail_id is not None and held_until is not None else None
        body["provisional"] = tail_body(provisional.tail(manager, window.run_id, end, size, held))
    return body


@router.get("/lr", response_model=StepResult, dependencies=[ReadAccess])
async def read_lr(
    run_id: RunId,
    manager: ManagerDep,
    step: Annotated[QueryStep, Query()],
    ahead: Annotated[QueryInt, Query(ge=0, description=AHEAD_DOC)] = 0,
    provisional_size: Annotated[QueryInt, Query(alias="provisional", ge=0, description=_TAIL_DOC)] = 0,
    provisional_from: Annotated[QueryInt | None, Query(ge=0, description=_FROM_DOC)] = None,
    provisional_id: Annotated[QueryInt | None, Query(ge=0, description=_ID_DOC)] = None,
    provisional_after: Annotated[QueryInt | None, Query(ge=0, description=_AFTER_DOC)] = None,
    rank: Annotated[QueryInt, Query(ge=0, description=_RANK_DOC)] = 0,
) -> Response:
    """Values for steps step..step+ahead (capped); asking commits them (they become final).

    With `provisional=n`, also the next n values as if no input arrived (uncommitted), to
    ride an outage on (API.md, "Outages: the provisional tail").
    """
    if provisional_size or provisional_from is not None:
        def with_tail() -> Response:
            window = manager.window(run_id, step, ahead)
            tail = _with_tail(
                manager, window, rank, provisional_size, provisional_from, provisional_id, provisional_after
            )
            return FastJSONResponse(tail)

        return await manager.in_commit_thread(with_tail)
    # Final values already in memory, or a small commit that needs no wait, are answered right
    # here, without a worker thread (if few values). service.api.fast_path answers most of these.
    window = manager.cached_window(run_id, step, ahead, most_values=ON_LOOP_VALUES)
    if window is None:
        window = manager.window_now(run_id, step, ahead, most_values=ON_LOOP_VALUES)
    if window is not None:
        return FastJSONResponse(window_body(window))
    return await manager.in_commit_thread(lambda: window_response(manager.window(run_id, step, ahead)))


async def answer_step(app: Starlette, run_id: str, body: StepRequest, identity: Identity) -> Response:
    """``POST .../step``'s answer (the route's, and the fast path's: ``STEP``)."""
    barriers = app.state.barriers
    window = await barriers.step(run_id, body.step, body.metrics, body.rank, body.ahead)
    if body.provisional or body.provisional_from is not None:
        args = (body.rank, body.provisional, body.provisional_from, body.provisional_id,
                body.provisional_after)
        manager: RunManager = barriers.manager  # the tail's settling may commit (a divergence)
        return await manager.in_commit_thread(lambda: FastJSONResponse(_with_tail(manager, window, *args)))
    if len(window.values) * len(window.values[0][0]) <= ON_LOOP_VALUES:
        return FastJSONResponse(window_body(window))
    return await run_in_threadpool(window_response, window)


STEP = FastWrite("/v1/runs/{run_id}/step", StepRequest, "write", answer_step)


@router.post("/step", response_model=StepResult)
async def step_run(
    run_id: RunId, body: StepRequest, request: Request, identity: Annotated[Identity, access(STEP.role)]
) -> Response:
    """Commit `step` with the metrics reported with it, as `scheduler.step(metric)` would.

    With `world_size > 1` and the watched metric, waits at the metric barrier.
    """
    return await STEP.answer(request.app, run_id, body, identity)


async def answer_metrics(app: Starlette, run_id: str, body: MetricsCreate, identity: Identity) -> Response:
    """``POST .../metrics``' answer (the route's, and the fast path's: ``METRICS``)."""
    manager: RunManager = app.state.manager
    records = [r.model_dump() for r in body.records]

    def record() -> Response:
        new = manager.record_metrics(run_id, records)
        return FastJSONResponse(metrics_accepted_body(len(records), new), status_code=202)

    return await small_or_in_thread(manager, record)


METRICS = FastWrite("/v1/runs/{run_id}/metrics", MetricsCreate, "write", answer_metrics)


@router.post("/metrics", response_model=MetricsAccepted, status_code=202)
async def log_metrics(
    run_id: RunId, body: MetricsCreate, request: Request, identity: Annotated[Identity, access(METRICS.role)]
) -> Response:
    """Record metrics for history and plots (idempotent per name, step and rank)."""
    return await METRICS.answer(request.app, run_id, body, identity)
