"""The events as they go out: SSE messages and webhook bodies share one shape."""

from __future__ import annotations

from typing import Any

from service.events.hub import Overflow
from service.store.events import FeedEntry


def event_message(entry: FeedEntry) -> dict[str, Any]:
    """An event as the stream (and webhooks) show it: its global ``id``, its run, then as in history."""
    event = entry.event
    return {"id": event.gid, "run_id": entry.run_id, "seq": event.seq, **event.public()}


def overflow_message(overflow: Overflow) -> dict[str, Any]:
    return {
        "code": "slow_consumer",
        "detail": f"this stream fell {overflow.buffer} events behind and was cut off; "
                  f"reconnect with Last-Event-ID: {overflow.last_id} to resume",
        "last_id": overflow.last_id,
    }
