"""``GET /v1/events``: every run's events as Server-Sent Events, resumable by global id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from service.api.deps import ReadAccess
from service.api.routes.runs import _parse_labels
from service.api.schemas import ERROR_RESPONSES
from service.errors import InvalidInput
from service.events.hub import EventHub, FeedFilter, Overflow
from service.events.wire import event_message, overflow_message
from service.store.events import EventKind

router = APIRouter(prefix="/v1/events", tags=["events"])

KINDS = sorted(k.value for k in EventKind)


async def _stream_request(
    request: Request,
    run_id: Annotated[str | None, Query(max_length=128, description="Only this run's events")] = None,
    label: Annotated[list[str], Query(description="key:value; repeat to require several")] = [],  # noqa: B006
    kind: Annotated[list[str], Query(description=f"Only these kinds (repeat): {', '.join(KINDS)}")] = [],  # noqa: B006
    since: Annotated[int | None, Query(ge=0, description="Resume after this id")] = None,
    last_event_id: Annotated[str | None, Header(description="Resume after this id (wins over since)")] = None,
) -> tuple[int, FeedFilter]:
    for value in kind:
        if value not in KINDS:
            raise InvalidInput.at("kind", f"unknown event kind {value!r}; one of {', '.join(KINDS)}")
    after = since
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise InvalidInput.at("Last-Event-ID", "must be an event id (a whole number >= 0)")
        after = int(text)
    feed_filter = FeedFilter(run_id=run_id, labels=_parse_labels(label) or None,
                             kinds=frozenset(kind) or None)
    if after is None:  # "from now": fixed before the answer starts, so a client that has its
        # headers back is sure to see every event written after that
        after = await run_in_threadpool(request.app.state.events.store.last_gid)
    return after, feed_filter


# Errors come before the stream starts, as JSON like every other error (not as events).
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": spec["description"],
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Message"}}}}
    for status, spec in ERROR_RESPONSES.items() if status in (401, 403, 422, 503)}


@router.get("", response_class=EventSourceResponse, dependencies=[ReadAccess], responses=_ERRORS)
async def stream_events(
    request: Request,
    params: Annotated[tuple[int, FeedFilter], Depends(_stream_request)],
) -> AsyncIterator[ServerSentEvent]:
    """Events of every run as they are written (`text/event-stream`); see docs/events.md.

    Each message's `id` is the event's global id; reconnecting with `Last-Event-ID` (or
    `?since=`) resumes right after it. Without either, the stream starts with the next event.
    """
    hub: EventHub = request.app.state.events
    after, feed_filter = params
    async for item in hub.follow(after, feed_filter):
        if isinstance(item, Overflow):
            yield ServerSentEvent(event="overflow", raw_data=orjson.dumps(overflow_message(item)).decode())
            return
        yield ServerSentEvent(id=str(item.event.gid), raw_data=orjson.dumps(event_message(item)).decode())
