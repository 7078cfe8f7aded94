"""Request and response bodies of API v1 (API.md), named by role: XCreate, XPublic, ...

Requests are validated here (types, ranges, lengths); the spec itself is validated by
``service.engine.spec.parse_schedule`` because its rules depend on the run's groups.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from lrserve.service.engine.actions import ARGUMENTS, ActionKind
from lrserve.service.engine.spec import MAX_GROUPS
from lrserve.service.engine.status import RunStatus
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

RUN_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
"""A run id: also what the fast path (``fast_path.py``) matches in ``/v1/runs/{run_id}/lr``."""
MAX_STEP = 2**53
"""The highest step accepted (the last integer a JSON double holds exactly)."""
NAME_PATTERN = r"^[A-Za-z0-9._/:-]{1,64}$"
MAX_LABELS = 32
NON_FINITE = 'Non-finite numbers are the strings "NaN", "Infinity", "-Infinity".'

RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN, description="1-128 chars of [A-Za-z0-9._-]")]
MetricName = Annotated[str, Field(pattern=NAME_PATTERN)]
LearningRate = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Momentum = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Step = Annotated[int, Field(ge=0, le=MAX_STEP)]
_DECIMAL = re.compile(r"[0-9]+|-0*[1-9][0-9]*")


def _decimal_digits(value: object) -> object:
    """A query's integer as API.md writes it: the digits 0-9 (a ``-`` first, for the range's own
    message; ``-0``, which no range refuses, is not an integer so written). pydantic's lax
    parsing would also take ``1_0``, ``+5``, `` 5``, ``5.0`` and other scripts' digits, which
    the fast path (``fast_path.py``, ``fast_reads.py``) never does."""
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise ValueError(f"expected an integer in decimal digits (0-9), got {shown!r}")
    return value


QueryInt = Annotated[int, BeforeValidator(_decimal_digits)]
"""An integer in a query string: decimal digits only (``_decimal_digits``)."""
QueryStep = Annotated[Step, BeforeValidator(_decimal_digits)]
Rank = Annotated[int, Field(ge=0, lt=1 << 16)]
MAX_LABEL_LENGTH = 128
LabelText = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_LENGTH)]
Schedule = Annotated[
    dict[str, Any],
    Field(
        description="A schedule spec: {\"type\": <torch class name>, <its arguments>}; "
        "GET /v1/schedules/catalog lists every type.",
        examples=[{"type": "StepLR", "step_size": 30, "gamma": 0.1}],
    ),
]
Status = Annotated[RunStatus, Field(strict=False)]
"""A run's status (``engine/status.py``), given by its value: a request's JSON has strings, not
enum members, so this field alone is not strict (any other string is still refused)."""
Reason = Annotated[
    str, Field(min_length=1, max_length=1000, description="Why: recorded on the action's events.")
]


AHEAD_DOC = (
    "Steps wanted after `step`. Cut, not refused, to LRSERVE_MAX_AHEAD and to the work budget "
    "(LRSERVE_WORK_BUDGET: steps x (param groups + 6) x per-step cost; a 1024-group StepLR run gets "
    "485): the answer's `max_ahead` says the cap."
)

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _not_a_dot_segment(run_id: str) -> str:
    if run_id in (".", ".."):  # a URL path cannot address them: /v1/runs/.. is /v1
        raise ValueError(f"{run_id!r} is a path segment of its own; use letters or digits too")
    return run_id


class RunCreate(_Strict):
    run_id: Annotated[RunId, AfterValidator(_not_a_dot_segment)] | None = None
    schedule: Schedule
    base_lrs: list[LearningRate] = Field(min_length=1, max_length=MAX_GROUPS)
    base_momentums: list[Momentum] | None = Field(None, min_length=1, max_length=MAX_GROUPS)
    labels: dict[LabelText, LabelText] = Field(default_factory=dict, max_length=MAX_LABELS)
    world_size: int = Field(1, ge=1, le=65536)


class RunPublic(BaseModel):
    run_id: str
    schedule: dict[str, Any]
    base_lrs: list[float]
    base_momentums: list[float] | None
    labels: dict[str, str]
    world_size: int
    status: Status
    horizon: int
    lrs: list[float]
    momentums: list[float] | None
    stopped_at: int | None = Field(None, description="The step from which the run is stopped.")
    switched_at: int | None = Field(None, description="Step where a range test switched schedules.")
    watched: list[str] = Field(
        default_factory=list, description="Metrics the run decides on now: a job reports these with step()."
    )
    max_ahead: int = Field(0, description="The server's cap on `ahead`.")
    created_at: str
    updated_at: str
    last_seen: str | None = Field(
        None, description="Last request of any rank about this run (written in batches, seconds behind)."
    )
    stale: bool = Field(
        False, description="Active, and not heard from for LRSERVE_STALE_AFTER_S (default 300 s)."
    )


class RunsPublic(BaseModel):
    data: list[RunPublic]
    count: int
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class WindowPublic(BaseModel):
    start: int
    lrs: list[list[float]]
    momentums: list[list[float]] | None


class ProvisionalPublic(BaseModel):
    id: int = Field(description="Valid until the run's next event; sent back as `provisional_id`.")
    start: int
    lrs: list[list[float]]
    momentums: list[list[float]] | None


class StepResult(BaseModel):
    run_id: str
    step: int
    lrs: list[float]
    momentums: list[float] | None
    status: Status
    stopped_at: int | None = Field(
        None, description="Step at which the run stops (clients report should_stop from it)."
    )
    switched_at: int | None = Field(
        None, description="Step at which a range test ended and the run switched schedules."
    )
    window: WindowPublic
    watched: list[str] = Field(
        default_factory=list, description="Metrics the run decides on now: a job reports these with step()."
    )
    max_ahead: int = Field(0, description="The server's cap on `ahead`.")
    provisional: ProvisionalPublic | None = Field(
        None, description="Values after the window as if no input arrived: not committed, not final."
    )
    provisional_divergence: dict[str, Any] | None = Field(
        None, description="The event recorded when the steps ridden on a tail were changed by an input."
    )
    spikes: list[SpikePublic] | None = Field(
        None, description="Spike-guard backoffs taking effect in this window (absent: none)."
    )


class StepRequest(_Strict):
    step: Step
    metrics: dict[MetricName, float] = Field(default_factory=dict, max_length=64)
    rank: Rank = 0
    ahead: int = Field(0, ge=0, description=AHEAD_DOC)
    provisional: int = Field(
        0, ge=0, description="Steps of provisional values wanted after the window (see GET .../lr)."
    )
    provisional_from: int | None = Field(
        None, ge=0, description="The first step this job took on provisional values (an outage now over)."
    )
    provisional_id: int | None = Field(None, ge=0, description="The `provisional.id` of the tail it holds.")
    provisional_after: int | None = Field(
        None, ge=0, description="The last step of the tail it holds: a valid one is continued, not repeated."
    )


class MetricRecordIn(_Strict):
    step: Step
    name: MetricName
    value: float
    rank: Rank = 0


class MetricsCreate(_Strict):
    records: list[MetricRecordIn] = Field(min_length=1, max_length=10_000)


class MetricsAccepted(BaseModel):
    accepted: int
    new: int


# Which action takes which field, and what it does: engine/actions.py (ARGUMENTS); here, the
# bounds of each field as a request gives it.
class ActionSpec(_Strict):
    """One operator action and its arguments (API.md, Operator control)."""

    action: ActionKind
    lr: LearningRate | None = None
    lrs: list[LearningRate] | None = Field(None, min_length=1, max_length=MAX_GROUPS)
    factor: float | None = Field(None, gt=0, allow_inf_nan=False)
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _fields_match_action(self) -> ActionSpec:
        wanted = ARGUMENTS[self.action]
        given = [f for f in _ACTION_ARGUMENTS if getattr(self, f) is not None]
        if self.action == "set_lr" and len(given) != 1:
            raise ValueError("set_lr takes exactly one of `lr` or `lrs`")
        if wanted and not given:
            raise ValueError(f"{self.action} needs `{wanted[0]}`")
        extra = [f for f in given if f not in wanted]
        if extra:
            raise ValueError(f"{self.action} does not take `{extra[0]}`")
        return self

    def given(self) -> dict[str, Any]:
        """``action`` and the arguments given (``action_for_run``'s request): ``model_dump`` of
        ``ActionSpec``'s own fields without the None ones, the values themselves (plain JSON
        values, validated) rather than copies."""
        given: dict[str, Any] = {"action": self.action}
        for name in _ACTION_ARGUMENTS:
            value = getattr(self, name)
            if value is not None:
                given[name] = value
        return given


_ACTION_ARGUMENTS = tuple(f for f in ActionSpec.model_fields if f != "action")
"""``ActionSpec``'s fields but ``action``, in order: looked up once (``model_fields`` is a
property that costs more than the rest of the check)."""


class ControlRequest(ActionSpec):
    at_step: Step | None = Field(None, description="Must be above the horizon; default: the first free step.")
    reason: Reason | None = None


class ControlResult(BaseModel):
    run_id: str
    applied_at: int
    event: dict[str, Any] = Field(description=f"The event recorded. {NON_FINITE}")


class FleetSelector(_Strict):
    labels: dict[LabelText, LabelText] = Field(
        default_factory=dict, max_length=MAX_LABELS, description="Every pair must be among the run's labels."
    )
    status: list[Status] | None = Field(
        None, min_length=1, max_length=3, description="Only runs with one of these statuses."
    )

    @model_validator(mode="after")
    def _selects_something(self) -> FleetSelector:
        if not self.labels and self.status is None:
            raise ValueError(
                'give labels and/or status (to act on every run, say so: "status": ["active", "held"])'
            )
        return self


class FleetControlRequest(_Strict):
    selector: FleetSelector
    action: ActionSpec = Field(description="As `POST /v1/runs/{run_id}/control`, without `at_step`.")
    reason: Reason | None = None
    dry_run: bool = Field(False, description="Only list the matching runs; change nothing.")


class FleetRunResult(BaseModel):
    run_id: str
    applied_at: int | None = Field(None, description="The step the action landed on (this run's first free).")
    error: Message | None = Field(None, description="Why this run refused the action (the others took it).")
    status: Status | None = Field(None, description="Dry run: the run's status.")
    horizon: int | None = Field(None, description="Dry run: the run's horizon (the action would land after).")


class FleetControlResult(BaseModel):
    matched: int
    dry_run: bool
    results: list[FleetRunResult]


class Series(BaseModel):
    steps: list[int]
    values: list[Any]


class HistoryPublic(BaseModel):
    run_id: str
    lrs: Series
    metrics: dict[str, dict[str, list[Any]]] = Field(
        description="Per metric name: `steps`, `values`, `ranks`, by step then rank. A metric of at "
        "most `max_points` rows is shown whole; a longer one shows the rows of its ranks at "
        "`max_points // ranks` steps spread evenly from its first logged step to its last (each the "
        f"first logged step at or after an even point), so its cost follows `max_points`. {NON_FINITE}"
    )
    events: list[dict[str, Any]] = Field(
        description="The run's latest events, at most `max_points` of them, oldest first (kind, step, "
        "at, payload fields; every event is in the event stream, `GET /v1/events?run_id=...&since=0`). "
        f"{NON_FINITE}"
    )
    events_total: int = Field(
        description="How many events the run has (those shown in `events` are the latest of them)."
    )


class Suggestions(BaseModel):
    steepest: float | None = Field(description="Lightning's rule: steepest fall of the smoothed loss.")
    min_over_10: float | None = Field(description="LR at the lowest smoothed loss, divided by 10.")


class LRFinderPublic(BaseModel):
    min_lr: float
    max_lr: float
    num_steps: int
    mode: str
    monitor: str
    lrs: list[float] = Field(description="LR of each reported loss (the step before the report).")
    losses: list[float | str] = Field(description=f"Smoothed losses. {NON_FINITE}")
    suggestions: Suggestions
    chosen: float | None
    done: bool
    switched_at: int | None


class PreviewRequest(_Strict):
    schedule: Schedule
    base_lrs: list[LearningRate] = Field(min_length=1, max_length=MAX_GROUPS)
    base_momentums: list[Momentum] | None = Field(None, min_length=1, max_length=MAX_GROUPS)
    steps: int = Field(ge=1, le=100_000)
    metrics: dict[MetricName, list[float | None]] = Field(default_factory=dict, max_length=16)


class PreviewResult(BaseModel):
    lrs: list[list[float | str]] = Field(description=f"One row per step. {NON_FINITE}")
    momentums: list[list[float | str]] | None = Field(description=f"One row per step, or null. {NON_FINITE}")
    spikes: list[SpikePublic] = Field(
        default_factory=list, description="What a SpikeGuard found in `metrics` (rank 0's reports)."
    )


class SpikePublic(BaseModel):
    kind: Literal["loss_spike"] = "loss_spike"
    step: int = Field(description="The step the spiking report was sent with.")
    rank: int
    value: float | str = Field(description="The value reported (\"NaN\", \"Infinity\" when not finite).")
    baseline: float | None = Field(description="The rank's baseline (median) when it was judged.")
    applied_at: int = Field(description="The first step the backoff applies at (the same on every rank).")
    last_good_step: int = Field(
        description="The last step this rank reported without a spike: roll back at or before it."
    )
    count: int = Field(description="How many spikes the guard has counted, this one included.")


class BandPublic(BaseModel):
    steps: list[int]
    values: list[float | str]
    baseline: list[float | None]
    upper: list[float | None] = Field(description="Above this a value is a spike (null during warm-up).")


class SpikeGuardPublic(BaseModel):
    run_id: str
    settings: dict[str, Any]
    horizon: int
    multiplier: float = Field(description="The backoff multiplier at the horizon (1.0: none).")
    count: int
    spikes: list[SpikePublic]
    band: dict[str, BandPublic] = Field(
        description="Per rank, as the detector met each report applied up to `bands_through`: "
        "`max_points` points each, spread evenly, or fewer where every rank's would cost more than the "
        "work budget (4 units a point: each rank shows `LRSERVE_WORK_BUDGET // (4 x ranks)`, at least 2), "
        "or than the server keeps of a long run (~50,000 points over its ranks, spread evenly, the "
        "latest kept)."
    )
    bands_through: int | None = Field(
        description="The horizon the bands are judged up to: `horizon`, or null (and `band` empty) while "
        "the server replays a long run's reports in the background, one run at a time (a view whose "
        "reports to read cost more than the work budget: the first in a server process of a long run): "
        "ask again."
    )


class CatalogArg(BaseModel):
    name: str
    type: str = Field(description="As a user writes it: int, float, list[int], schedule, expression, ...")
    choices: list[Any] | None = Field(None, description="The accepted values, when there are few.")
    default: Any = Field(None, description="Absent when `required`.")
    required: bool
    description: str


class CatalogType(BaseModel):
    type: str
    description: str
    args: list[CatalogArg]


class CatalogPublic(BaseModel):
    types: list[CatalogType]


class HealthPublic(BaseModel):
    status: Literal["ok", "ready"]


class WhoAmI(BaseModel):
    name: str = Field(description="The token's name: the actor recorded on what it does.")
    role: Literal["read", "write", "admin"] = Field(
        description="What the token may do (roles nest: admin > write > read); "
        "admin on a server without tokens."
    )


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


class Message(BaseModel):
    detail: str
    code: str
    errors: list[dict[str, str]] = []


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Message, "description": text}
    for status, text in {
        400: "The body could not be decoded (not UTF-8 JSON).",
        401: "Missing or unknown bearer token.",
        403: "The token's role may not use this route.",
        404: "No such run.",
        409: "The run exists with another spec, or is stopped.",
        413: "The body is larger than the server accepts.",
        422: "A field is invalid; `errors` names it.",
        503: "The database is unreachable.",
    }.items()
}
"""Every error answer has the same body (``Message``); documented on every API route."""
