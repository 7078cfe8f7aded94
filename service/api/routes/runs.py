"""Runs: create, list, read, delete, operator control, history."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from lrserve.service.api.deps import (
    AdminAccess,
    HistoryAnswersDep,
    LivenessDep,
    ManagerDep,
    ReadAccess,
    access,
    small_or_in_thread,
)
from lrserve.service.api.fast_path import FastWrite
from lrserve.service.api.fast_reads import (
    DEFAULT_POINTS,
    MAX_POINTS,
    big_history,
    history_or_kept,
    read_run_body,
    run_public,
)
from lrserve.service.api.responses import (
    FastJSONResponse,
    control_body,
    lr_finder_body,
    runs_body,
)
from lrserve.service.api.schemas import (
    MAX_LABEL_LENGTH,
    MAX_LABELS,
    ControlRequest,
    ControlResult,
    HistoryPublic,
    LRFinderPublic,
    QueryInt,
    RunCreate,
    RunId,
    RunPublic,
    RunsPublic,
    Status,
)
from lrserve.service.auth import Identity
from lrserve.service.background import Background
from lrserve.service.errors import InvalidInput
from lrserve.service.liveness import Liveness
from lrserve.service.runs.manager import RunManager, SpecConflict
from lrserve.service.store.base import RunRecord
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool

router = APIRouter(prefix="/v1/runs", tags=["runs"])


Made = tuple[RunRecord, bool, dict[str, Any]]
"""A create's answer: the run, whether this request created it, the run's body."""


@dataclass(eq=False)
class _UnderWay:
    """A create (a build or a join) of one run in a worker thread."""

    seq: int
    """Its place among the creates this process began (``Creates.began``)."""
    record: asyncio.Future[RunRecord | None]
    """The run it wrote or read, also where it read another spec's (a 409); ``None``: it failed."""


class Creates:
    """``POST /v1/runs`` in a worker thread in this process, at most one per run id at a time.

    A job's ranks send their creates together: one builds the run in a worker thread, and those
    arriving meanwhile wait for it on the event loop, so that no rank holds a thread-pool token
    while it waits on the run's lock. Then they join: where the store answers on the loop
    (SQLite, a spec of at most ``ON_LOOP_SPEC_CHARS``), each with its own read there; else the
    first of them joins in a worker thread and the others take the run it read, or the 409 it
    met (``SpecConflict``: the run is stored with another spec).

    A waiting request takes only what a create begun after it arrived wrote or read: as of a
    moment within the request, as its own read would be (a run another process deleted before
    then is never answered for). Where that create failed, or asked for another spec, the
    request goes on as a lone one does: a spec it refused is kept refused (``CheckedSpecs``),
    so each rank's own create raises that refusal without checking the spec again.
    """

    def __init__(self) -> None:
        self._under_way: dict[str, _UnderWay] = {}
        self.began = 0

    async def answer(
        self, manager: RunManager, run_id: str | None, create: Callable[[], Made],
        join: Callable[[RunRecord], Made | None],
    ) -> Made:
        """``create()`` on the loop where it goes through (a join), else in a worker thread;
        ``join(record)``: this request's answer from a run another create of the same id wrote or
        read (None: it answers for itself)."""
        arrived = self.began
        while run_id is not None and (under_way := self._under_way.get(run_id)) is not None:
            record = await asyncio.shield(under_way.record)
            if under_way.seq > arrived and record is not None:
                made = join(record)
                if made is not None:
                    return made
                break
        made = manager.now(create)
        if made is not None:
            return made
        if run_id is None or run_id in self._under_way:  # no id: a new run each; or a create began meanwhile
            return await run_in_threadpool(create)
        self.began += 1
        under_way = _UnderWay(self.began, asyncio.get_running_loop().create_future())
        self._under_way[run_id] = under_way
        record = None
        try:
            made = await run_in_threadpool(create)
            record = made[0]
            return made
        except SpecConflict as conflict:  # stored with another spec: a join, refused
            record = conflict.record
            raise
        finally:
            del self._under_way[run_id]
            under_way.record.set_result(record)


async def answer_create(app: Starlette, run_id: str, body: RunCreate, identity: Identity) -> Response:
    """``POST /v1/runs``' answer (the route's, and the fast path's: ``CREATE``; ``run_id`` unused)."""
    manager: RunManager = app.state.manager
    liveness: Liveness = app.state.liveness
    creates: Creates = app.state.creates
    request = body.model_dump()

    def create() -> Made:  # a job's ranks join at once: a join of a loaded run is a read, on the loop
        record, created = manager.create_run(request, actor=identity.name)
        return record, created, run_public(manager, liveness, record)

    def join(record: RunRecord) -> Made | None:  # on the loop: nothing to wait for
        if not manager.asks_for(record, request):  # RunConflict: stored with another spec
            return None
        state = manager.loaded(record.run_id)
        if state is None:
            return None
        return record, False, run_public(manager, liveness, record, state)

    record, created, answer = await creates.answer(manager, request.get("run_id"), create, join)
    liveness.seen(record.run_id)  # a rank asked
    return FastJSONResponse(answer, status_code=201 if created else 200)


CREATE = FastWrite("/v1/runs", RunCreate, "write", answer_create)


@router.post(
    "",
    response_model=RunPublic,
    status_code=201,
    responses={200: {"model": RunPublic, "description": "The run already exists with this spec."}},
)
async def create_run(
    body: RunCreate, request: Request, identity: Annotated[Identity, access(CREATE.role)]
) -> Response:
    """Create a run (idempotent: every rank may call it)."""
    return await CREATE.answer(request.app, "", body, identity)


def _parse_labels(labels: list[str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:  # a run has at most this many labels: more filters match nothing
        raise InvalidInput.at("label", f"at most {MAX_LABELS} filters; got {len(labels)}")
    parsed = {}
    for item in labels:
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise InvalidInput.at("label", f"expected key:value, got {item[:64]!r}")
        if len(key) > MAX_LABEL_LENGTH or len(value) > MAX_LABEL_LENGTH:
            raise InvalidInput.at("label", f"keys and values have at most {MAX_LABEL_LENGTH} characters")
        parsed[key] = value
    return parsed


@router.get("", response_model=RunsPublic, dependencies=[ReadAccess])
def list_runs(
    manager: ManagerDep,
    liveness: LivenessDep,
    label: Annotated[
        list[str], Query(description=f"key:value; repeat to require several (at most {MAX_LABELS})")
    ] = [],  # noqa: B006
    status: Status | None = None,
    limit: Annotated[QueryInt, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
    stale: Annotated[
        bool | None, Query(description="true: only active runs not heard from for LRSERVE_STALE_AFTER_S")
    ] = None,
) -> Response:
    """List runs, filtered by labels, status and staleness, a page at a time."""
    if stale is False:
        raise InvalidInput.at("stale", "only stale=true filters; leave it out to list every run")
    records = manager.store.list_runs(
        labels=_parse_labels(label), status=status, limit=limit + 1, after=cursor,
        stale_before=liveness.stale_before() if stale else None,
    )
    page = records[:limit]
    next_cursor = page[-1].run_id if len(records) > limit else None
    if stale:  # heard by this process since its last flush: not stale after all
        page = [r for r in page if not liveness.heard_recently(r.run_id)]
    data = [run_public(manager, liveness, r) for r in page]
    return FastJSONResponse(runs_body(data, next_cursor))


@router.get("/{run_id}", response_model=RunPublic, dependencies=[ReadAccess])
async def read_run(run_id: RunId, manager: ManagerDep, liveness: LivenessDep) -> Response:
    """Read one run, with its values at the horizon, when it was last heard from and whether it is stale."""
    def read() -> Response:
        return FastJSONResponse(read_run_body(manager, liveness, run_id))  # caught up with other replicas

    return await small_or_in_thread(manager, read)


@router.delete("/{run_id}", status_code=204, dependencies=[AdminAccess])
def delete_run(run_id: RunId, manager: ManagerDep) -> Response:
    """Delete a run and its whole log (admin)."""
    manager.delete_run(run_id)
    return Response(status_code=204)


async def answer_control(app: Starlette, run_id: str, body: ControlRequest, identity: Identity) -> Response:
    """``POST .../control``'s answer (the route's, and the fast path's: ``CONTROL``)."""
    manager: RunManager = app.state.manager
    action = body.given()

    def control() -> Response:
        _, event = manager.control(run_id, action, body.at_step, actor=identity.name, reason=body.reason)
        return FastJSONResponse(control_body(run_id, event))

    return await small_or_in_thread(manager, control)


CONTROL = FastWrite("/v1/runs/{run_id}/control", ControlRequest, "admin", answer_control)


@router.post("/{run_id}/control", response_model=ControlResult)
async def control_run(
    run_id: RunId, body: ControlRequest, request: Request, identity: Annotated[Identity, access(CONTROL.role)]
) -> Response:
    """Apply an operator action at the first free step (or at `at_step`); `reason` goes on its event."""
    return await CONTROL.answer(request.app, run_id, body, identity)


@router.get("/{run_id}/lr-finder", response_model=LRFinderPublic, dependencies=[ReadAccess])
def read_lr_finder(run_id: RunId, manager: ManagerDep) -> Response:
    """The range test's loss curve, its suggestions and the chosen LR (409 if the run has none)."""
    return FastJSONResponse(lr_finder_body(manager.lr_finder(run_id)))


@router.get("/{run_id}/history", response_model=HistoryPublic, dependencies=[ReadAccess])
async def read_history(
    run_id: RunId, manager: ManagerDep, answers: HistoryAnswersDep, request: Request,
    max_points: Annotated[QueryInt, Query(
        ge=1, le=MAX_POINTS, description="Most points of each series: the LRs' and each metric's "
        "(downsampled), and the run's events (its latest)")] = DEFAULT_POINTS,
) -> Response:
    """LR and metric series (downsampled), the run's latest events and how many it has."""
    found = await run_in_threadpool(history_or_kept, manager, answers, run_id, max_points)
    if not isinstance(found, bytes):  # a big one: written at a low CPU priority (service/background.py)
        background: Background = request.app.state.background
        found = await big_history(background, manager, answers, run_id, max_points, found)
    return Response(found, media_type="application/json")
