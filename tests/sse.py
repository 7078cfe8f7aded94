"""A small Server-Sent Events reader over httpx, for tests against real servers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Message:
    event: str = "message"
    id: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


def read_stream(
    url: str,
    done: Callable[[list[Message]], bool],
    *,
    params: dict | None = None,
    headers: dict | None = None,
    timeout: float = 60.0,
    comments: list[str] | None = None,
) -> list[Message]:
    """Read ``GET url`` as SSE until ``done(messages)`` holds or the server ends the stream,
    then disconnect. Raises TimeoutError if neither happens within ``timeout`` seconds."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=httpx.Timeout(10.0, read=timeout)) as http:
        with http.stream("GET", url, params=params, headers=headers) as response:
            response.raise_for_status()
            assert response.headers["content-type"].startswith("text/event-stream")
            current = Message()
            for line in response.iter_lines():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stream not done after {timeout} s: {len(messages)} messages")
                if line == "":
                    if current.data or current.event != "message":
                        messages.append(current)
                        if done(messages):
                            return messages
                    current = Message()
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    if comments is not None:
                        comments.append(value)
                elif name == "data":
                    current.data = f"{current.data}\n{value}" if current.data else value
                elif name in ("event", "id"):
                    setattr(current, name, value)
    return messages
