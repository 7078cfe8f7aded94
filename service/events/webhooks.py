"""Webhooks: configured endpoints receive matching events as signed JSON, from a durable queue.

Configuration (``LRSERVE_WEBHOOKS``, a JSON list, or ``--webhooks-file``/``LRSERVE_WEBHOOKS_FILE``,
a file holding one): ``[{"url": ..., "secret": ..., "kinds": [...], "labels": {...}}]``.

``WebhookSender`` is one background task per server process. It never runs on a request's
path: it fills each endpoint's queue from the global event log, claims what is due, POSTs
it with ``httpx.AsyncClient`` and records the outcome (``service.store.webhook_queue``).
Each POST's body is the event as ``GET /v1/events`` shows it, signed with
``X-LRServe-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>``. A 2xx
answer delivers it; anything else is retried after 1, 2, 4, ... seconds (at most
``MAX_BACKOFF_S``), for ever. A run's events reach an endpoint in order: its next event
waits until the one before is delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import orjson
from lrserve.service.api.responses import feed_message
from lrserve.service.errors import OutageLog, StoreUnavailable
from lrserve.service.events.hub import FeedFilter
from lrserve.service.store.events import EventKind, FeedEntry
from lrserve.service.store.webhook_queue import Delivery, EndpointStatus, WebhookQueue
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:
    import httpx
    from lrserve.service.telemetry import Telemetry

log = logging.getLogger("lrserve.webhooks")

SIGNATURE_HEADER = "X-LRServe-Signature"
SEND_TIMEOUT_S = 10.0
"""The whole POST (connect, send, answer) is cut off after this long: one failed attempt."""
LEASE_S = SEND_TIMEOUT_S + 5.0
"""A claimed delivery is another sender's to retry if this one has not recorded an outcome
by then: a send's bound, plus time to write it down. After a ``kill -9`` this is how long
what was in flight waits before it is sent again."""
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0
GAUGES_EVERY_S = 2.0
"""How often the queue gauges of /metrics are read from the database."""
IDLE_POLL_S = 0.5
"""Longest pause between two looks at the queues (a commit of this process wakes it at once)."""


class WebhookConfigError(ValueError):
    """The webhook configuration is unusable; the message names the entry and field."""


class WebhookEndpoint(BaseModel):
    """One configured endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: HttpUrl
    secret: str = Field(min_length=1, description="HMAC-SHA256 key of the signature")
    kinds: tuple[EventKind, ...] | None = Field(None, description="Only these event kinds")
    labels: dict[str, str] | None = Field(None, description="Only runs with all these labels")

    @property
    def key(self) -> str:
        """The endpoint as the queue knows it: its URL."""
        return str(self.url)

    @property
    def shown(self) -> str:
        """The URL as logs and status show it (``shown_url``)."""
        return shown_url(self.key)

    @property
    def filter(self) -> FeedFilter:
        return FeedFilter(labels=self.labels or None,
                          kinds=frozenset(k.value for k in self.kinds) if self.kinds else None)


_ENDPOINTS = TypeAdapter(list[WebhookEndpoint])


def shown_url(url: str) -> str:
    """``url`` without its query or user info (they may hold credentials): for logs and status."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def load_webhooks(text: str, file: Path | None) -> list[WebhookEndpoint]:
    """The endpoints ``LRSERVE_WEBHOOKS`` (JSON) and the webhooks file (JSON) list together.

    Raises:
        WebhookConfigError: unreadable file, not JSON, or an invalid entry (named, secret never shown).
    """
    sources = []
    if text.strip():
        sources.append(("LRSERVE_WEBHOOKS", text))
    if file is not None:
        try:
            sources.append((str(file), file.read_text()))
        except OSError as exc:
            raise WebhookConfigError(f"webhooks file {file}: cannot read it ({exc.strerror})") from exc
    endpoints: list[WebhookEndpoint] = []
    for source, raw in sources:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise WebhookConfigError(f"{source}: not JSON ({exc.msg} at line {exc.lineno})") from exc
        try:
            endpoints.extend(_ENDPOINTS.validate_python(data))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            raise WebhookConfigError(f"{source}: [{where}]: {error['msg']}") from exc
    urls = [e.key for e in endpoints]
    for url in urls:
        if urls.count(url) > 1:
            raise WebhookConfigError(f"webhook {shown_url(url)} "
                                     "is configured twice; give each URL once")
    return endpoints


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff_s(attempts: int) -> float:
    """Pause before the next attempt after ``attempts`` failed ones: 1, 2, 4, ... up to the cap."""
    # The exponent stops growing long after the cap is reached: 2.0 ** 1024 overflows a float
    # (an endpoint down for days of attempts made every send fail with OverflowError).
    doublings = min(max(0, attempts - 1), 64)
    return min(MAX_BACKOFF_S, math.ldexp(FIRST_BACKOFF_S, doublings))


class WebhookSender:
    """Delivers the queues of ``endpoints`` in the background of one server process.

    Args:
        queue: The durable queue (the store's database).
        endpoints: What to deliver where.
        telemetry: Where delivery counts go (``/metrics``); None in tests of the queue alone.
    """

    def __init__(
        self, queue: WebhookQueue, endpoints: Sequence[WebhookEndpoint], telemetry: Telemetry | None = None
    ) -> None:
        self.queue = queue
        self.endpoints = list(endpoints)
        self.telemetry = telemetry
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if not self.endpoints:
            return
        for endpoint in self.endpoints:
            await run_in_threadpool(self.queue.register, endpoint.key)
        loop = asyncio.get_running_loop()
        self.queue.store.watch_commits(lambda: loop.call_soon_threadsafe(self._wake.set))
        import httpx  # here, not at import: a server without webhooks starts without it

        self._client = httpx.AsyncClient(timeout=SEND_TIMEOUT_S, follow_redirects=False)
        self._task = asyncio.create_task(self._run(), name="lrserve-webhooks")

    async def close(self) -> None:
        """Stop after the round in flight (a POST cut short is sent again later: at least once)."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), SEND_TIMEOUT_S / 2)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def status(self) -> list[tuple[WebhookEndpoint, EndpointStatus]]:
        found = await run_in_threadpool(self.queue.status, [e.key for e in self.endpoints])
        return list(zip(self.endpoints, found, strict=True))

    async def _run(self) -> None:
        next_gauges = 0.0
        outage = OutageLog(log, "webhooks", "the queue is unreachable")
        while not self._closed:
            try:
                busy = await self._round()
                if self.telemetry is not None and time.monotonic() >= next_gauges:
                    next_gauges = time.monotonic() + GAUGES_EVERY_S
                    for endpoint, status in await self.status():
                        self.telemetry.webhook_pending.labels(endpoint.shown).set(status.pending)
                        self.telemetry.webhook_delivered.labels(endpoint.shown).set(status.delivered)
            except StoreUnavailable as exc:
                outage.failed(exc)
                busy = False
            else:
                outage.ok()
            if busy or self._closed:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
            except asyncio.TimeoutError:  # not yet TimeoutError on Python 3.10
                pass
            self._wake.clear()

    async def _round(self) -> bool:
        """Fill every queue, send what is due; True if there may be more to do right away."""
        busy = False
        sends: list[Awaitable[None]] = []
        for endpoint in self.endpoints:
            if self._closed:
                break
            flt = endpoint.filter

            def render(entry: FeedEntry, flt: FeedFilter = flt) -> str | None:
                return orjson.dumps(feed_message(entry)).decode() if flt.matches(entry) else None

            to_fill, due = await run_in_threadpool(self.queue.work, endpoint.key)
            if to_fill:
                busy |= await run_in_threadpool(self.queue.fill, endpoint.key, render) > 0
            if due or to_fill:
                claimed = await run_in_threadpool(self.queue.claim, endpoint.key, lease_s=LEASE_S)
                sends.extend(self._send(endpoint, d) for d in claimed)
        if sends:
            await asyncio.gather(*sends)
            busy = True
        return busy

    async def _send(self, endpoint: WebhookEndpoint, delivery: Delivery) -> None:
        import httpx  # imported by start() already

        assert self._client is not None
        body = delivery.body.encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(endpoint.secret, body),
                   "X-LRServe-Event-Id": str(delivery.gid), "X-LRServe-Attempt": str(delivery.attempts)}
        try:
            # httpx's timeout bounds each phase, not the sum
            response = await asyncio.wait_for(
                self._client.post(endpoint.key, content=body, headers=headers), SEND_TIMEOUT_S
            )
            error = None if response.is_success else f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {str(exc)[:200] or 'no answer'}"
        except asyncio.TimeoutError:
            error = f"no answer within {SEND_TIMEOUT_S:g} s"
        if error is None:
            await run_in_threadpool(self.queue.delivered, delivery)
        else:
            await run_in_threadpool(self.queue.failed, delivery, error, backoff_s(delivery.attempts))
        if self.telemetry is not None:
            self.telemetry.webhook_attempts.labels(endpoint.shown, "delivered" if error is None
                                                   else "failed").inc()
