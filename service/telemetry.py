"""Prometheus metrics: requests, latencies, runs, decisions (one registry per app); and
whether FastAPI's own OpenTelemetry runs (``fastapi_options``)."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from lrserve.service.engine.engine import ScheduleSwitch
from lrserve.service.runs.state import StepOutcome
from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OTEL_SWITCHES = ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER", "OTEL_PYTHON_LOGGER_PROVIDER")
"""The variables that name an OpenTelemetry provider for a process that sets none in code
(``lrserve serve``); ``FASTAPI_OTEL_AUTO_CONFIGURE=true`` makes FastAPI set them up too."""


def fastapi_options(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """``FastAPI(...)`` options for its native OpenTelemetry: off unless the environment
    configures OpenTelemetry.

    FastAPI (recent releases) asks on every request, the fast layer's included, whether a
    tracer, meter or logger provider has been configured: three ``os.environ`` lookups through
    OpenTelemetry's API, 10-20 us of the event loop per request here (a cached ``GET .../lr``
    costs the server ~170 us in all). lrserve's metrics are its ``/metrics``; where the
    environment names a provider or asks FastAPI to configure one, or the process has set one
    already, FastAPI's telemetry stays as FastAPI ships it. Decided once, when the app is built."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:  # a FastAPI without it
        return {}
    if any(name in environ for name in OTEL_SWITCHES) or \
            environ.get("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true" or _provider_set():
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


_UNSET_PROVIDERS = frozenset({  # what OpenTelemetry returns before a provider is set (as FastAPI checks)
    ("opentelemetry.trace", "ProxyTracerProvider"),
    ("opentelemetry.metrics._internal", "_ProxyMeterProvider"),
    ("opentelemetry._logs._internal", "ProxyLoggerProvider"),
})


def _provider_set() -> bool:
    """Whether the process has set an OpenTelemetry provider in code already (an embedding
    program, or ``opentelemetry-instrument``)."""
    from opentelemetry import _logs, metrics, trace

    providers = (trace.get_tracer_provider(), metrics.get_meter_provider(), _logs.get_logger_provider())
    return any((type(p).__module__, type(p).__name__) not in _UNSET_PROVIDERS for p in providers)


_KEPT_ANSWERS = 1024
"""At most this many (method, route, status) keys keep their metric children (``Telemetry.answered``)."""


class Telemetry:
    """The app's metrics. A registry per app keeps tests (many apps, one process) apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        GCCollector(registry=self.registry)  # python_gc_collections_total by generation (pauses)
        self.requests = Counter(
            "lrserve_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lrserve_request_seconds",
            "Time to answer a request",
            ["method", "route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=self.registry,
        )
        self.runs_loaded = Gauge("lrserve_runs_loaded", "Runs held in memory", registry=self.registry)
        self.runs_by_status = Gauge(
            "lrserve_runs",
            "Runs in the database by status; stale: active runs not heard from for LRSERVE_STALE_AFTER_S "
            "(every replica reports the same shared count: aggregate with max, not sum)",
            ["status"],
            registry=self.registry,
        )
        self.event_streams = Gauge("lrserve_event_streams", "Open GET /v1/events streams",
                                   registry=self.registry)
        self.webhook_attempts = Counter(
            "lrserve_webhook_attempts", "Webhook POSTs by this process, by endpoint and outcome",
            ["endpoint", "outcome"], registry=self.registry)
        self.webhook_pending = Gauge(
            "lrserve_webhook_pending", "Events queued for a webhook endpoint, undelivered (all replicas)",
            ["endpoint"], registry=self.registry)
        self.webhook_delivered = Gauge(
            "lrserve_webhook_delivered", "Events delivered to a webhook endpoint, all time (all replicas)",
            ["endpoint"], registry=self.registry)
        self._answered: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # ``answered``'s children
        self.steps = Counter("lrserve_steps_committed", "Steps made final", registry=self.registry)
        self.decisions = Counter(
            "lrserve_decisions", "Decisions applied to runs", ["kind"], registry=self.registry
        )

    def answered(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count and time one answered request. The labelled children are looked up once per
        (method, route, status) and kept: prometheus_client's ``labels()`` checks and locks on
        every call (~9 µs each for the two, loaded, ~2.5 % of a commit's server CPU), and the
        children it returns are the same ones until a metric is cleared, which nothing here
        does. Routes are templates and statuses few, and methods llhttp's fixed set (uvicorn's
        httptools protocol refuses any other method before the app sees it): the keys are
        bounded; past ``_KEPT_ANSWERS`` of them the rest are looked up each time."""
        key = (method, route, status)
        found = self._answered.get(key)
        if found is None:
            found = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            if len(self._answered) < _KEPT_ANSWERS:
                self._answered[key] = found
        found[0].inc()
        found[1].observe(seconds)

    def record_outcome(self, run_id: str, outcome: StepOutcome) -> None:
        self.steps.inc()
        for decision in outcome.reductions:
            kind = "schedule_switch" if isinstance(decision, ScheduleSwitch) else "plateau_reduction"
            self.decisions.labels(kind).inc()
        for control in outcome.actions:
            self.decisions.labels(control.action.kind).inc()


class TelemetryMiddleware:
    """Counts and times every HTTP request by its route template (not its raw path)."""

    def __init__(
        self, app: ASGIApp, telemetry: Telemetry, observers: Sequence[Callable[[str, Scope, int], None]] = ()
    ) -> None:
        self.app = app
        self.telemetry = telemetry
        # (route, scope, status) of every answer, told as its status line goes out: liveness.
        # Before, not after: a client may send its next request (to this process) the moment it
        # reads the answer, and that request must find what this one changed.
        self.observers = tuple(observers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                route = _route_of(scope)
                for observer in self.observers:
                    observer(route, scope, status[0])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.telemetry.answered(scope["method"], _route_of(scope), status[0], time.perf_counter() - start)


def _route_of(scope: Scope) -> str:
    if "lrserve.route" in scope:  # answered by the fast path, before routing
        fast: str = scope["lrserve.route"]
        return fast
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
