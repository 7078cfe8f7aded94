"""An in-memory stand-in for the lrserve API, served through ``httpx.MockTransport``.

It keeps API.md's rules that the client relies on: values handed out are final, a report
sent with the request that commits step k is applied at k, and metrics are stored once per
``(name, step, rank)``. Its schedule is a toy ("halve every ``step_size`` steps; a reported
``val_loss`` that is not a new best divides by 10 at that step") so tests can predict every
value with ``expected_lrs``. Outages and error answers are scripted with ``down`` and
``fail``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx

BASE_URL = "http://lrserve.test"


@dataclass
class FakeRun:
    run_id: str
    body: dict[str, Any]
    values: list[list[float]]
    momentums: list[list[float]] | None
    status: str = "active"
    best: float = float("inf")
    metrics: dict[tuple[str, int, int], float] = field(default_factory=dict)
    metric_posts: int = 0
    reports: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def horizon(self) -> int:
        return len(self.values) - 1


class FakeServer:
    """The API's routes the client uses, with scripted failures.

    Attributes:
        requests: ``(method, path, params, body)`` of every request that reached it, except
            the provisional tail's.
        tail_requests: The same of the provisional tail's (``GET .../lr?provisional=n``),
            which the client sends from a thread of its own, at times of its own: kept apart
            (and spared ``fail``, ``on_request`` and ``after_request``), so that what a test
            scripts and reads of the windows and reports stays in their order.
        down: While true, every request fails with ``httpx.ConnectError``.
        fail: Answers to give instead of the real ones, consumed one per request: an
            ``int`` status (with a JSON error body), or an exception to raise.
    """

    def __init__(
        self, *, step_size: int = 10, gamma: float = 0.5, max_ahead: int = 10_000, cycle_momentum=False
    ) -> None:
        self.step_size = step_size
        self.gamma = gamma
        self.max_ahead = max_ahead
        self.max_provisional = 5_000  # its LRSERVE_MAX_PROVISIONAL: the toy schedule is Python
        self.cycle_momentum = cycle_momentum
        self.runs: dict[str, FakeRun] = {}
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.tail_requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.down = False
        self.fail: list[int | Exception] = []
        self.on_request: Callable[[httpx.Request], None] | None = None
        self.after_request: Callable[[httpx.Request, httpx.Response], None] | None = None
        self.end_at: int | None = None  # first step the toy schedule cannot produce

    # -- plumbing -------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle), base_url=BASE_URL, **kwargs)

    def handle(self, request: httpx.Request) -> httpx.Response:
        params = {k: v[-1] for k, v in parse_qs(request.url.query.decode()).items()}
        if request.method == "GET" and int(params.get("provisional", 0)):
            if self.down:
                raise httpx.ConnectError("connection refused", request=request)
            self.tail_requests.append((request.method, request.url.path, params, None))
            return self._route(request.method, request.url.path.split("/")[1:], params, None)
        if self.on_request is not None:
            self.on_request(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, params, body))
        if self.fail:
            failure = self.fail.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return error(failure, "scripted failure")
        response = self._route(request.method, request.url.path.split("/")[1:], params, body)
        if self.after_request is not None:
            self.after_request(request, response)
        return response

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _, _ in self.requests if method is None or m == method]

    def _route(self, method: str, parts: list[str], params: dict[str, str], body: Any) -> httpx.Response:
        if parts[:2] != ["v1", "runs"]:
            return error(404, "no such route")
        if len(parts) == 2 and method == "POST":
            return self._create(body)
        run = self.runs.get(parts[2])
        if run is None:
            return error(404, f"run {parts[2]!r} does not exist", "run_not_found")
        tail = parts[3] if len(parts) > 3 else ""
        if tail == "" and method == "GET":
            return httpx.Response(200, json=self._run_json(run))
        if tail == "lr" and method == "GET":
            return self._window(run, int(params["step"]), int(params.get("ahead", 0)), None, asked=params)
        if tail == "step" and method == "POST":
            return self._window(run, body["step"], body.get("ahead", 0), body, rank=body.get("rank", 0))
        if tail == "metrics" and method == "POST":
            run.metric_posts += 1
            for r in body["records"]:
                run.metrics[(r["name"], r["step"], r["rank"])] = r["value"]
            return httpx.Response(202, json={"accepted": len(body["records"])})
        return error(404, "no such route")

    # -- the API --------------------------------------------------------------------------

    def _create(self, body: Mapping[str, Any]) -> httpx.Response:
        if body["schedule"].get("type") == "Bogus":
            return error(422, "schedule.type: unknown", "invalid_spec", field="schedule.type")
        run_id = body.get("run_id") or f"run-{len(self.runs)}"
        existing = self.runs.get(run_id)
        if existing is not None:
            if existing.body["schedule"] != body["schedule"]:
                return error(409, "exists with a different spec", "run_conflict")
            return httpx.Response(200, json=self._run_json(existing))
        moms = [list(body["base_momentums"])] if self.cycle_momentum else None
        run = FakeRun(run_id, dict(body), [list(body["base_lrs"])], moms)
        self.runs[run_id] = run
        return httpx.Response(201, json=self._run_json(run))

    def _run_json(self, run: FakeRun) -> dict[str, Any]:
        return {
            "run_id": run.run_id,
            "schedule": run.body["schedule"],
            "base_lrs": run.body["base_lrs"],
            "status": run.status,
            "horizon": run.horizon,
            "lrs": run.values[-1],
            "momentums": run.momentums[-1] if run.momentums else None,
            "watched": sorted(watched(run.body["schedule"])),
            "max_ahead": self.max_ahead,
        }

    def _window(
        self,
        run: FakeRun,
        step: int,
        ahead: int,
        report: Mapping[str, Any] | None,
        rank: int = 0,
        asked: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        metrics = (report or {}).get("metrics") or {}
        if report is not None:
            for name, value in metrics.items():
                run.metrics[(name, step, rank)] = value
        if self.end_at is not None and step >= self.end_at:
            return error(422, f"step {step} is past the end", "schedule_error")
        last = step + min(ahead, self.max_ahead)
        if self.end_at is not None:
            last = min(last, self.end_at - 1)
        if step > run.horizon:
            self._commit(run, step - 1)
            self._commit(run, step, metrics if report is not None else None)
        self._commit(run, last)
        window = {
            "start": step,
            "lrs": run.values[step : last + 1],
            "momentums": run.momentums[step : last + 1] if run.momentums else None,
        }
        return httpx.Response(
            200,
            json={
                "run_id": run.run_id,
                "step": step,
                "lrs": run.values[step],
                "momentums": run.momentums[step] if run.momentums else None,
                "status": run.status,
                "window": window,
                "watched": sorted(watched(run.body["schedule"])),
                "max_ahead": self.max_ahead,
                **self._tail(run, last, asked if report is None else report),
            },
        )

    def _tail(self, run: FakeRun, last: int, asked: Mapping[str, Any] | None) -> dict[str, Any]:
        """The provisional tail: the toy schedule continued without reports (not committed),
        after ``last``, or after ``provisional_after`` when ``provisional_id`` is still valid."""
        asked = asked or {}
        size = min(self.max_provisional, int(asked.get("provisional") or 0))
        if not size and asked.get("provisional_from") is None:
            return {}
        tail_id = len(run.reports)
        first = last + 1
        if asked.get("provisional_after") is not None and int(asked.get("provisional_id", -1)) == tail_id:
            first = max(first, int(asked["provisional_after"]) + 1)
        lrs, best, values = run.values[last], run.best, []
        for k in range(last + 1, first + size):
            if self.end_at is not None and k >= self.end_at:
                break
            lrs, best = next_lrs(lrs, k, None, best, self.step_size, self.gamma)
            if k >= first:
                values.append(lrs)
        moms = None
        if run.momentums is not None:
            moms = [[0.9 - 0.001 * k for _ in run.values[0]] for k in range(first, first + len(values))]
        return {"provisional": {"id": tail_id, "start": first, "lrs": values, "momentums": moms}}

    def _commit(self, run: FakeRun, upto: int, metrics: Mapping[str, float] | None = None) -> None:
        while run.horizon < upto:
            k = run.horizon + 1
            used = metrics if k == upto else None
            lrs, run.best = next_lrs(run.values[-1], k, used, run.best, self.step_size, self.gamma)
            if run.momentums is not None:
                run.momentums.append([0.9 - 0.001 * k for _ in lrs])
            run.values.append(lrs)
            if used:  # last: a test that sees the report (from another thread) sees its step's values
                run.reports[k] = dict(used)


def watched(spec: Mapping[str, Any]) -> set[str]:
    """The metrics a spec decides on (what the real server says in ``watched``)."""
    names: set[str] = set()
    stack: list[Any] = [spec]
    while stack:
        node = stack.pop()
        if not isinstance(node, Mapping):
            continue
        default = {"ReduceLROnPlateau": "val_loss", "LRRangeTest": "loss"}.get(str(node.get("type")))
        if default is not None:
            names.add(str(node.get("monitor") or default))
        stack.extend(node.get("schedulers") or [])
        stack.append(node.get("then"))
    return names


def next_lrs(
    prev: list[float], k: int, metrics: Mapping[str, float] | None, best: float, step_size: int, gamma: float
) -> tuple[list[float], float]:
    """The toy schedule: one step of it."""
    lrs = [lr * gamma for lr in prev] if k % step_size == 0 else list(prev)
    if metrics and "val_loss" in metrics:
        if metrics["val_loss"] < best:
            best = metrics["val_loss"]
        else:
            lrs = [lr * 0.1 for lr in lrs]
    return lrs, best


def expected_lrs(
    base: list[float], steps: int, reports: Mapping[int, float] | None = None, *, step_size=10, gamma=0.5
) -> list[list[float]]:
    """The values of steps ``0 .. steps`` when ``val_loss`` is reported at the given steps."""
    values, best = [list(base)], float("inf")
    for k in range(1, steps + 1):
        metric = (reports or {}).get(k)
        lrs, best = next_lrs(
            values[-1], k, None if metric is None else {"val_loss": metric}, best, step_size, gamma
        )
        values.append(lrs)
    return values


def error(status: int, detail: str, code: str = "", field: str | None = None) -> httpx.Response:
    errors = [{"field": field, "message": detail}] if field else []
    return httpx.Response(status, json={"detail": detail, "code": code, "errors": errors})


class Optimizer:
    """Just ``param_groups``: the scheduler works with any such object."""

    def __init__(self, *groups: dict[str, Any]) -> None:
        self.param_groups = [dict(g) for g in groups] or [{"lr": 0.1}]
