"""Every body the API sends, built here from the lower layers' typed values: JSON at the edge.

Each ``*_body`` function is the one definition of a response shape (its pydantic model in
``schemas.py`` documents it; tests/service/api/test_response_shapes.py checks the two agree
on real answers). Error bodies (``error_body``) and the event shape shared by history, the
event stream and webhooks (``event_body``, ``feed_message``) live here too.

Non-finite numbers are spelled "NaN" / "Infinity" / "-Infinity" here
(``service.engine.codec.public_float``); orjson would write ``null``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from lrserve.service.api import sliced_json
from lrserve.service.engine.codec import legacy_float_text, public_float, public_json, public_rows
from lrserve.service.errors import LRServeError
from lrserve.service.store.events import Event, EventKind, FeedEntry, NewEvent
from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from lrserve.service.engine.catalog import CatalogArg, CatalogEntry
    from lrserve.service.engine.engine import Values
    from lrserve.service.engine.range_test import RangeTestReport
    from lrserve.service.engine.spike_guard import Band, Spike
    from lrserve.service.events.hub import Overflow
    from lrserve.service.events.webhooks import WebhookEndpoint
    from lrserve.service.fleet import FleetOutcome
    from lrserve.service.runs.manager import Window
    from lrserve.service.runs.provisional import Tail
    from lrserve.service.runs.read_models import History, LRFinder, SpikeGuardView
    from lrserve.service.runs.state import RunState
    from lrserve.service.store.base import RunRecord
    from lrserve.service.store.webhook_queue import EndpointStatus

Body = dict[str, Any]


class FastJSONResponse(JSONResponse):
    """A JSON response rendered by orjson: fast, exact floats; big tables a slice at a time
    (``sliced_json``: the event loop is not kept waiting for the GIL)."""

    def render(self, content: Any) -> bytes:
        return sliced_json.dumps(content)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# -- errors ---------------------------------------------------------------------------------


def error_body(error: LRServeError) -> Body:
    """The one error shape: ``detail`` (every problem in one line), ``code``, ``errors``
    (each ``{"field": dotted path, "message": words}``)."""
    return {
        "detail": error.message,
        "code": error.code,
        "errors": [{"field": e.field, "message": e.message} for e in error.errors],
    }


def error_response(error: LRServeError, headers: Mapping[str, str] | None = None) -> FastJSONResponse:
    return FastJSONResponse(error_body(error), status_code=error.status_code, headers=headers)


# -- runs -----------------------------------------------------------------------------------


def run_body(record: RunRecord, state: RunState, *, max_ahead: int, last_seen: datetime | None,
             stale: bool) -> Body:
    """``RunPublic``: the stored run with its values at the horizon."""
    lrs, moms = state.values[-1]
    return {
        "run_id": record.run_id,
        "schedule": record.spec["schedule"],
        "base_lrs": record.spec["base_lrs"],
        "base_momentums": record.spec["base_momentums"],
        "labels": record.labels,
        "world_size": record.spec["world_size"],
        "status": state.status,
        "horizon": state.horizon,
        "lrs": list(lrs),
        "momentums": list(moms) if moms is not None else None,
        "stopped_at": state.stopped_at,
        "switched_at": state.switched_at,
        "watched": list(state.watching),
        "max_ahead": max_ahead,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
        "last_seen": _iso(last_seen),
        "stale": stale,
    }


def runs_body(runs: list[Body], next_cursor: str | None) -> Body:
    """``RunsPublic``: a page of ``run_body``."""
    return {"data": runs, "count": len(runs), "next_cursor": next_cursor}


def control_body(run_id: str, event: NewEvent) -> Body:
    """``ControlResult``: where the action landed, and its event (without ``at``)."""
    return {"run_id": run_id, "applied_at": event.step, "event": event_body(event)}


def fleet_body(outcome: FleetOutcome) -> Body:
    """``FleetControlResult``: one result per run; only the fields that say something."""
    results = []
    for r in outcome.results:
        shown: Body = {"run_id": r.run_id}
        if r.error is not None:
            shown["error"] = error_body(r.error)
        if r.applied_at is not None:
            shown["applied_at"] = r.applied_at
        if r.status is not None:
            shown["status"] = r.status
            shown["horizon"] = r.horizon
        results.append(shown)
    return {"matched": outcome.matched, "dry_run": outcome.dry_run, "results": results}


# -- steps ----------------------------------------------------------------------------------


def _columns(values: Sequence[Values]) -> tuple[list[list[float]], list[list[float]] | None]:
    lrs = [list(v[0]) for v in values]
    # a run's steps all have momentums or none do
    moms = None if not values or values[0][1] is None else [list(v[1]) for v in values]  # type: ignore[arg-type]
    return lrs, moms


def window_body(window: Window) -> Body:
    """``StepResult`` without a provisional tail: the hot path's answer (``fast_path`` too). A
    big window's values come packed (``ValueLog``): its table is a 2-D numpy view of them,
    which orjson writes exactly as the lists (``sliced_json`` does; a plain ``orjson.dumps``
    needs ``OPT_SERIALIZE_NUMPY``)."""
    values = window.values
    lrs: Any
    moms: Any
    if not isinstance(values, list):  # a ValueLog (its module imports torch: not asked by name here)
        first_lrs, first_moms = values[0]
        lrs, moms = values.table()
        first: tuple[Any, Any] = (list(first_lrs), None if first_moms is None else list(first_moms))
    else:
        lrs, moms = _columns(values)
        first = (lrs[0], moms[0] if moms is not None else None)
    body = {
        "run_id": window.run_id,
        "step": window.start,
        "lrs": first[0],
        "momentums": first[1],
        "status": window.status,
        "stopped_at": window.stopped_at,
        "switched_at": window.switched_at,
        "window": {"start": window.start, "lrs": lrs, "momentums": moms},
        "watched": list(window.watched),
        "max_ahead": window.max_ahead,
    }
    if window.spikes:  # a spike guard's backoffs that take effect in this window
        body["spikes"] = [spike_body(s) for s in window.spikes]
    return body


def window_response(window: Window) -> FastJSONResponse:
    """The answer for ``window``, built and serialised (in a worker thread when it is big)."""
    return FastJSONResponse(window_body(window))


def tail_body(tail: Tail) -> Body:
    """``ProvisionalPublic``."""
    lrs, moms = _columns(tail.values)
    return {"id": tail.id, "start": tail.start, "lrs": lrs, "momentums": moms}


def metrics_accepted_body(accepted: int, new: int) -> Body:
    """``MetricsAccepted``."""
    return {"accepted": accepted, "new": new}


# -- events ---------------------------------------------------------------------------------


def event_body(event: Event | NewEvent) -> Body:
    """An event as the API shows it: ``kind``, ``step``, ``at`` (once stored), ``actor``, then
    the payload's fields; ``reason`` too on actions and on what an action caused.

    Non-finite numbers (a NaN loss in a metric event or a decision) are spelled
    "NaN", "Infinity", "-Infinity" (``codec.public_json``).
    """
    payload = public_json(event.payload)
    if event.kind is EventKind.PLATEAU_REDUCTION and isinstance(payload.get("value"), str):
        payload["value"] = legacy_float_text(payload["value"])  # stored as repr() before 1.1
    shown: Body = {"kind": event.kind.value, "step": event.step}
    if isinstance(event, Event):
        shown["at"] = event.at.isoformat()
    shown["actor"] = event.actor
    shown.update(payload)
    if event.reason is not None or event.kind is EventKind.CONTROL:
        shown["reason"] = event.reason
    return shown


def feed_message(entry: FeedEntry) -> Body:
    """An event as the stream (and webhooks) show it: its global ``id``, its run, then as in history."""
    event = entry.event
    return {"id": event.gid, "run_id": entry.run_id, "seq": event.seq, **event_body(event)}


def overflow_message(overflow: Overflow) -> Body:
    """The stream's last message when its consumer fell too far behind."""
    return {
        "code": "slow_consumer",
        "detail": f"this stream fell {overflow.buffer} events behind and was cut off; "
                  f"reconnect with Last-Event-ID: {overflow.last_id} to resume",
        "last_id": overflow.last_id,
    }


# -- read models ----------------------------------------------------------------------------


def history_body(history: History) -> Body:
    """``HistoryPublic``. The LRs are a numpy view of their packed doubles (``history_json``
    writes it as rows of numbers; LRs are always finite)."""
    metrics = {
        name: {"steps": [r[0] for r in rows], "values": [public_float(r[2]) for r in rows],
               "ranks": [r[1] for r in rows]}
        for name, rows in history.metrics.items()
    }
    lrs = np.frombuffer(history.packed_lrs, dtype=np.float64).reshape(len(history.steps), history.n_groups)
    return {
        "run_id": history.run_id,
        "lrs": {"steps": list(history.steps), "values": lrs},
        "metrics": metrics,
        "events": [event_body(e) for e in history.events],
        "events_total": history.events_total,
    }


def history_json(history: History) -> bytes:
    """``HistoryPublic`` as JSON bytes (big LR tables a slice at a time: ``sliced_json``)."""
    return sliced_json.dumps(history_body(history))


def lr_finder_body(finder: LRFinder) -> Body:
    """``LRFinderPublic``."""
    test: RangeTestReport = finder.test
    return {
        "min_lr": test.min_lr,
        "max_lr": test.max_lr,
        "num_steps": test.num_steps,
        "mode": test.mode,
        "monitor": test.monitor,
        "lrs": list(test.lrs),
        "losses": [public_float(v) for v in test.losses],
        "suggestions": {"steepest": test.steepest, "min_over_10": test.min_over_10},
        "chosen": test.chosen,
        "done": test.done,
        "switched_at": finder.switched_at,
    }


def spike_body(spike: Spike) -> Body:
    """``SpikePublic``: a spike as the ``loss_spike`` event shows it (without ``at``)."""
    payload = spike.payload()
    payload["value"] = public_float(payload["value"])
    return {"kind": "loss_spike", **payload}


def _band_body(band: Band) -> Body:
    return {"steps": band.steps, "values": [public_float(v) for v in band.values],  # NaN: a spike, plotted
            "baseline": band.baseline, "upper": band.upper}


def spike_guard_json(view: SpikeGuardView) -> bytes:
    """``SpikeGuardPublic`` as JSON bytes (big bands a slice at a time: ``sliced_json``)."""
    return sliced_json.dumps(spike_guard_body(view))


def spike_guard_body(view: SpikeGuardView) -> Body:
    """``SpikeGuardPublic``."""
    return {
        "run_id": view.run_id,
        "settings": {name: getattr(view.settings, name) for name in view.settings.__dataclass_fields__},
        "horizon": view.horizon,
        "multiplier": view.multiplier,
        "count": len(view.spikes),
        "spikes": [spike_body(s) for s in view.spikes],
        "band": {str(rank): _band_body(band) for rank, band in view.bands.items()},
        "bands_through": view.bands_through,
    }


# -- schedules, operations ------------------------------------------------------------------


def preview_body(
    lrs: list[list[float]], momentums: list[list[float]] | None, spikes: Iterable[Spike]
) -> Body:
    """``PreviewResult``."""
    return {"lrs": public_rows(lrs), "momentums": momentums and public_rows(momentums),
            "spikes": [spike_body(s) for s in spikes]}


def catalog_body(entries: Iterable[CatalogEntry]) -> Body:
    """``CatalogPublic``: each type's arguments; ``default`` only when not required, ``choices``
    only for a fixed set of values."""
    def arg_body(arg: CatalogArg) -> Body:
        shown: Body = {"name": arg.name, "type": arg.type}
        if arg.choices:
            shown["choices"] = list(arg.choices)
        if not arg.required:
            shown["default"] = arg.default
        shown.update(required=arg.required, description=arg.description)
        return shown

    return {"types": [{"type": e.type, "description": e.description, "args": [arg_body(a) for a in e.args]}
                      for e in entries]}


def status_body(status: str) -> Body:
    """``HealthPublic``: ``/healthz`` and ``/readyz``."""
    return {"status": status}


def webhooks_body(found: Iterable[tuple[WebhookEndpoint, EndpointStatus]]) -> Body:
    """``WebhooksPublic``: each endpoint (URL shown without query or user info, never the secret)."""
    return {"data": [{
        "url": endpoint.shown,
        "kinds": [k.value for k in endpoint.kinds] if endpoint.kinds else None,
        "labels": endpoint.labels,
        "pending": status.pending,
        "retrying": status.retrying,
        "oldest_pending_id": status.oldest_pending_gid,
        "queued_through_id": status.queued_after,
        "delivered": status.delivered,
        "failed_attempts": status.failures,
        "last_error": status.last_error,
        "last_error_at": _iso(status.last_error_at),
        "last_delivered_at": _iso(status.last_delivered_at),
    } for endpoint, status in found]}


def whoami_body(name: str, role: str) -> Body:
    """``WhoAmI``."""
    return {"name": name, "role": role}
