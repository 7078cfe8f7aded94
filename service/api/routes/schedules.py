"""Schedules without a run: previews and the catalog of accepted types."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from lrserve.service.api import sliced_json
from lrserve.service.api.deps import ReadAccess, SettingsDep
from lrserve.service.api.responses import FastJSONResponse, catalog_body, preview_body
from lrserve.service.api.schemas import CatalogPublic, PreviewRequest, PreviewResult
from lrserve.service.engine import cost
from lrserve.service.engine.catalog import catalog
from lrserve.service.engine.preview import simulate
from lrserve.service.engine.spec import ScheduleSpec, parse_schedule
from lrserve.service.errors import InvalidInput
from lrserve.service.offload import is_big, over_budget_anyway

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])


@router.post("/preview", response_model=PreviewResult, dependencies=[ReadAccess])
def preview_schedule(body: PreviewRequest, settings: SettingsDep, request: Request) -> Response:
    """Values at steps 0..steps-1, simulating plateau decisions and spikes from `metrics`."""
    n_groups, schedule, budget = len(body.base_lrs), body.schedule, settings.work_budget
    big = is_big(n_groups=n_groups, steps=body.steps, schedule=schedule) and not over_budget_anyway(
        n_groups=n_groups, steps=_costed_steps(body), schedule=schedule, budget=budget)
    if big:
        answer = request.app.state.big_work.run(preview_answer, body, budget)
    else:  # small, or refused over the budget after a parse, before any work
        answer = preview_answer(body, budget)
    return Response(answer, media_type="application/json")


def preview_answer(body: PreviewRequest, work_budget: int) -> bytes:
    """The preview's answer, serialised (in a worker process when it is big work: ``service.offload``).

    Raises:
        InvalidInput: a bad field, or a preview over the work budget.
    """
    n_groups = len(body.base_lrs)
    if body.base_momentums is not None and len(body.base_momentums) != n_groups:
        raise InvalidInput.at("base_momentums", f"expected {n_groups} values, got {len(body.base_momentums)}")
    what = f"a preview of {body.steps} steps on {n_groups} param groups"

    def within_budget(schedule: ScheduleSpec) -> None:
        units = cost.cost(schedule, n_groups=n_groups, steps=_costed_steps(body))
        cost.check(what, "steps", units, work_budget)

    schedule = parse_schedule(body.schedule, n_groups=n_groups, before_checks=within_budget)
    result = simulate(schedule, body.base_lrs, body.base_momentums, body.steps, body.metrics)
    return sliced_json.dumps(preview_body(result.lrs, result.momentums, result.spikes))


def _costed_steps(body: PreviewRequest) -> int:
    """The steps a preview costs: its own, and at least a create's (its spec checked as a create's is)."""
    return max(body.steps, cost.CREATE_STEPS)


@router.get("/catalog", response_model=CatalogPublic, dependencies=[ReadAccess])
def read_catalog() -> Response:
    """Every accepted schedule type with its arguments, types and defaults."""
    return FastJSONResponse(catalog_body(catalog()))
