"""``GET /v1/events``: every run's events as Server-Sent Events, resumable by global id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from lrserve.service.api.deps import ReadAccess
from lrserve.service.api.responses import feed_message, overflow_message
from lrserve.service.api.routes.runs import _parse_labels
from lrserve.service.api.schemas import ERROR_RESPONSES, QueryInt
from lrserve.service.errors import InvalidInput
from lrserve.service.events.hub import EventHub, FeedFilter, Overflow
from lrserve.service.store.events import EventKind, FeedEntry
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

router = APIRouter(prefix="/v1/events", tags=["events"])

KINDS = sorted(k.value for k in EventKind)
MAX_EVENT_ID = 10**18 - 1
"""The largest id ``since`` and ``Last-Event-ID`` take (18 digits: within the databases' 64-bit
integers, which a larger one would overflow mid-stream)."""


async def _stream_request(
    request: Request,
    run_id: Annotated[str | None, Query(max_length=128, description="Only this run's events")] = None,
    label: Annotated[list[str], Query(description="key:value; repeat to require several")] = [],  # noqa: B006
    kind: Annotated[list[str], Query(description=f"Only these kinds (repeat): {', '.join(KINDS)}")] = [],  # noqa: B006
    since: Annotated[QueryInt | None,
                     Query(ge=0, le=MAX_EVENT_ID, description="Resume after this id")] = None,
    last_event_id: Annotated[str | None, Header(description="Resume after this id (wins over since)")] = None,
) -> tuple[int, FeedFilter]:
    for value in kind:
        if value not in KINDS:
            raise InvalidInput.at("kind", f"unknown event kind {value!r}; one of {', '.join(KINDS)}")
    after = since
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        if not text.isascii() or not text.isdigit() or len(text) > len(str(MAX_EVENT_ID)):
            raise InvalidInput.at("Last-Event-ID", "must be an event id (a whole number >= 0)")
        after = int(text)
    feed_filter = FeedFilter(run_id=run_id, labels=_parse_labels(label) or None,
                             kinds=frozenset(kind) or None)
    if after is None:  # "from now": fixed before the answer starts, so a client that has its
        # headers back is sure to see every event written after that
        hub: EventHub = request.app.state.events
        after = await run_in_threadpool(hub.store.last_gid)
    return after, feed_filter


# Errors come before the stream starts, as JSON like every other error (not as events).
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": spec["description"],
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Message"}}}}
    for status, spec in ERROR_RESPONSES.items() if status in (401, 403, 422, 503)}


class EventStream(StreamingResponse):
    """``text/event-stream``. (Not FastAPI's ``EventSourceResponse``: that one sends each event
    through two extra tasks and a pydantic model per stream, which 200 streams pay 200 times.)"""

    media_type = "text/event-stream"


ENCODED_KEEP = 4096
"""Encoded messages kept for reuse: every stream sends the same bytes for one event."""
HEARTBEAT = b": ping\n\n"


def _encoded(hub: EventHub, entry: FeedEntry) -> bytes:
    gid = entry.event.gid or 0
    found = hub.encoded.get(gid)
    if found is None:
        found = b"id: %d\ndata: %s\n\n" % (gid, orjson.dumps(feed_message(entry)))
        hub.encoded[gid] = found
        if len(hub.encoded) > ENCODED_KEEP:
            hub.encoded.popitem(last=False)
    return found


async def _messages(hub: EventHub, after: int, feed_filter: FeedFilter) -> AsyncIterator[bytes]:
    """The stream's bytes: each batch of events in one write (a burst costs one send per
    stream, not one per event), heartbeats, and the overflow message that ends it."""
    async for item in hub.follow(after, feed_filter):
        if isinstance(item, Overflow):
            yield b"event: overflow\ndata: %s\n\n" % orjson.dumps(overflow_message(item))
            return
        yield b"".join(_encoded(hub, entry) for entry in item) if item else HEARTBEAT


@router.get("", response_class=EventStream, dependencies=[ReadAccess], responses=_ERRORS)
async def stream_events(
    request: Request,
    params: Annotated[tuple[int, FeedFilter], Depends(_stream_request)],
) -> EventStream:
    """Events of every run as they are written (`text/event-stream`); see docs/events.md.

    Each message's `id` is the event's global id; reconnecting with `Last-Event-ID` (or
    `?since=`) resumes right after it. Without either, the stream starts with the next event.
    A stream that sent nothing for 15 s gets a `: ping` comment (within 18.75 s). A stream that
    falls 1000 events (`LRSERVE_EVENTS_BUFFER`) behind ends with an `overflow` message.
    """
    hub: EventHub = request.app.state.events
    after, feed_filter = params
    return EventStream(_messages(hub, after, feed_filter),
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
