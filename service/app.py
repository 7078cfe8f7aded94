"""``create_app(settings)``: the FastAPI application, built by a factory (no import-time state)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from lrserve.service import dashboard
from lrserve.service.api.fast_path import FastPath
from lrserve.service.api.fast_reads import FastReads, HistoryAnswers
from lrserve.service.api.handlers import install_error_handlers
from lrserve.service.api.query import SingleQueryValues, repeatable_parameters
from lrserve.service.api.routes import (
    events,
    fleet,
    health,
    runs,
    schedules,
    spike_guard,
    steps,
    webhooks,
    whoami,
)
from lrserve.service.api.schemas import ERROR_RESPONSES
from lrserve.service.auth import Authenticator, load_tokens
from lrserve.service.background import Background
from lrserve.service.engine.engine import warm_up_torch
from lrserve.service.errors import StoreUnavailable
from lrserve.service.events.hub import EventHub
from lrserve.service.events.webhooks import WebhookSender, load_webhooks
from lrserve.service.health import HealthListener
from lrserve.service.limits import BodySizeLimit
from lrserve.service.liveness import Liveness
from lrserve.service.offload import BigWork
from lrserve.service.runs.barrier import Barriers
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import open_store
from lrserve.service.store.webhook_queue import WebhookQueue
from lrserve.service.telemetry import Telemetry, TelemetryMiddleware, fastapi_options
from starlette.concurrency import run_in_threadpool

DESCRIPTION = """Learning-rate schedules served over HTTP, computed by torch's own schedulers.

The contract (paths, fields, finality, decisions on the first free step, parity) is API.md;
limits and lrserve's own choices are in the README.
"""


SWITCH_INTERVAL_S = 0.0005
"""How long a thread computing values may hold the GIL while another waits (Python's default:
5 ms). A request's path hands the GIL back and forth dozens of times; behind a worker thread
that computes a big window, each handoff waited up to 5 ms (bench figure 7, budgets)."""


GC_THRESHOLDS = (20_000, 20, 10)
"""The collector's thresholds once the server is up (Python's: 700, 10, 10). Every collection
stops every thread, and a full one scans every live object: 4,096 half-sent connections are
~120,000 (uvicorn's protocol, parser, transport, timer and request cycle each). At 700 a
connection's objects reached the oldest generation within a second of its 10 s, and a flood
made a full collection every 2-5 s, 0.2-0.9 s each on a loaded 2-core machine: the slowest
``/healthz`` answers. Collecting the young every 20,000 allocations instead lets most of a
short-lived connection's objects go by reference counting before they are promoted; the
oldest generation is scanned about 50 times less often (docs/hardening.md, "Garbage of
closed connections")."""


def _warm_up_torch() -> None:
    warm_up_torch()
    gc.freeze()  # start-up objects (torch's, most of all) stay out of later collections: shorter pauses
    gc.set_threshold(*GC_THRESHOLDS)
    gc.enable()  # ``lrserve serve`` starts up without it (``cli.serve_command``); on from here


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the store opens in the lifespan and closes with it.

    Args:
        settings: Defaults to ``Settings()``: the ``LRSERVE_*`` variables (``uvicorn
            service.app:create_app --factory``).
    """
    settings = settings or Settings()
    endpoints = load_webhooks(settings.webhooks, settings.webhooks_file)
    telemetry = Telemetry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings.db, sqlite_synchronous=settings.sqlite_synchronous,
                           create_db=settings.create_db)
        # its process starts with the first big request
        big_work = BigWork(settings.offload_workers, settings.offload_nice, settings.offload_slice_ms)
        app.state.big_work = big_work
        manager = RunManager(store, settings, big_work)
        manager.on_outcome.append(telemetry.record_outcome)
        app.state.manager = manager
        app.state.creates = runs.Creates()
        app.state.history_answers = HistoryAnswers()  # kept with the store they were read from
        background = app.state.background = Background(nice=settings.background_nice)  # big answers
        barriers = app.state.barriers = Barriers(manager, settings.barrier_timeout_s)
        telemetry.runs_loaded.set_function(lambda: len(manager.runs))

        def count_runs() -> None:
            counts = store.count_by_status(stale_before=liveness.stale_before())
            for status, count in counts.items():
                telemetry.runs_by_status.labels(status).set(count)

        await run_in_threadpool(count_runs)
        flusher = asyncio.create_task(liveness.flush_every(store, settings.last_seen_flush_s, count_runs))
        # one LISTEN connection per process: the hub's, which also wakes the barriers' waiters
        hub = EventHub(store, buffer=settings.events_buffer, listen=store.run_listener())
        hub.notices.append(barriers.notified)
        await hub.start()
        app.state.events = hub
        telemetry.event_streams.set_function(lambda: hub.streams)
        sender = WebhookSender(WebhookQueue(store), endpoints, telemetry)
        await sender.start()
        app.state.webhooks = sender
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # Before readiness: torch imports parts of itself on the first engine built. A server that
        # said ready before that made its first requests wait on the import lock (a create took
        # 14.7 s under load, when that import was torch._dynamo's) while a proxy sent it traffic.
        await run_in_threadpool(_warm_up_torch)
        probes = None
        if settings.health_port is not None:  # once ready, as the API's /readyz
            probes = HealthListener(settings.host, settings.health_port, store.ping)
            await probes.start()
        try:
            yield
        finally:
            if probes is not None:
                await probes.close()
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            with contextlib.suppress(StoreUnavailable):
                await run_in_threadpool(liveness.flush, store)  # what this process saw last
            await sender.close()
            await hub.close()
            await run_in_threadpool(manager.close)  # its commits in progress may still need big_work
            await run_in_threadpool(big_work.close)
            await run_in_threadpool(background.close)
            store.close()

    app = FastAPI(title="lrserve", version="1.0", description=DESCRIPTION, lifespan=lifespan,
                  **fastapi_options())
    app.state.settings = settings
    app.state.auth = Authenticator(load_tokens(settings.tokens, settings.tokens_file))
    app.state.telemetry = telemetry
    liveness = app.state.liveness = Liveness(settings.stale_after_s)
    for module in (runs, steps, schedules, fleet, spike_guard, whoami):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.include_router(events.router)
    app.include_router(webhooks.router, responses=ERROR_RESPONSES)
    app.include_router(health.router, responses={503: ERROR_RESPONSES[503]})
    app.include_router(dashboard.router)
    install_error_handlers(app)
    # innermost: limits and telemetry still see their answers; the hot path first
    app.add_middleware(FastReads)
    app.add_middleware(FastPath, writes=[runs.CREATE, steps.STEP, steps.METRICS, runs.CONTROL])
    app.add_middleware(SingleQueryValues, repeatable=lambda: repeatable_parameters(app))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(TelemetryMiddleware, telemetry=telemetry, observers=[liveness.observe])
    return app
