"""``LRClient``: the lrserve HTTP API (``docs/api.md``) over keep-alive connections (``_transport``)."""

from __future__ import annotations

import json as _json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import httpx

try:  # parses a window's floats 4-5x faster than the standard library (same values)
    import orjson as _orjson
except ImportError:  # pragma: no cover - a client-only install without it
    _orjson = None  # type: ignore[assignment]  # the module or None: callers check which

from lrserve.client._exceptions import (
    ClientClosed,
    ServerError,
    ServerUnreachable,
    TransportError,
    error_from_response,
)
from lrserve.client._transport import (
    Answer,
    HttpxSender,
    KeepAliveSender,
    Sender,
    map_transport_errors,
    plain_http_route,
)

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_MAX_BACKOFF",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "ENV_TOKEN",
    "ENV_URL",
    "LRClient",
    "loads",
    "map_transport_errors",
]

#: Where the server is looked for when neither ``base_url`` nor ``$LRSERVE_URL`` says.
DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "LRSERVE_URL"
ENV_TOKEN = "LRSERVE_TOKEN"
#: Per-request timeouts: connecting fails fast, answers may take a while (metric barriers).
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
#: Retries after the first try, for transport errors and retryable answers (5xx, 408, 429).
DEFAULT_MAX_RETRIES = 3
#: First retry delay in seconds; it doubles with each retry, up to ``DEFAULT_MAX_BACKOFF``.
DEFAULT_BACKOFF = 0.1
DEFAULT_MAX_BACKOFF = 5.0
USER_AGENT = "lrserve-client/0.1"

_Sleep = Callable[[float], None]


def backoff_delay(
    attempt: int,
    *,
    base: float = DEFAULT_BACKOFF,
    cap: float = DEFAULT_MAX_BACKOFF,
    rand: Callable[[], float] = random.random,
) -> float:
    """The delay before retry number ``attempt`` (0-based): exponential, capped, with jitter.

    "Equal jitter": half the exponential delay is fixed, the other half random, so retries
    from many ranks spread out but none retries immediately.
    """
    ceiling = min(cap, base * (2.0 ** min(attempt, 32)))
    return ceiling * (0.5 + 0.5 * rand())


class LRClient:
    """A client for the lrserve API: every route of ``docs/api.md``, as Python methods.

    Requests travel over keep-alive connections: the client's own HTTP/1.1 exchange to a
    plain ``http://`` server with no proxy in between (a sixth of httpx's CPU per request, on
    the thread the training loop shares), else an ``httpx.Client`` (``https://``, proxies from
    the environment, or the one given as ``http_client``); see ``_transport``. Transport errors and retryable
    answers (5xx, 408, 429) are retried with exponential backoff and jitter; requests that
    are not idempotent (``control_run``) are retried only when the connection failed
    before anything was sent. Errors come out as the ``LRServiceError`` tree.

    Args:
        base_url: The server, e.g. ``"http://lrserve:8000"``; default ``$LRSERVE_URL``, else
            ``DEFAULT_URL``. With an injected ``http_client`` and no ``base_url``, paths are
            relative to that client's own base URL.
        token: Bearer token; default ``$LRSERVE_TOKEN``.
        timeout: Per-request timeout (seconds or ``httpx.Timeout``); default ``DEFAULT_TIMEOUT``,
            or the injected ``http_client``'s own.
        max_retries: Retries after the first try.
        backoff: First retry delay in seconds (doubles each retry).
        max_backoff: Longest retry delay.
        http_client: An ``httpx.Client`` to use instead of a new one (the test seam:
            ``httpx.Client(transport=httpx.MockTransport(...))`` or Starlette's ``TestClient``).
            It is not closed by ``close()`` and keeps its own timeouts unless ``timeout`` is given.
        sleep: The function that waits between retries (tests pass a fake).
        rand: Random numbers in ``[0, 1)`` for the jitter.

    Example:
        >>> with LRClient("http://127.0.0.1:8000") as api:  # doctest: +SKIP
        ...     api.preview_schedule({"type": "StepLR", "step_size": 2}, [0.1], steps=4)["lrs"]
        [[0.1], [0.1], [0.010000000000000002], [0.010000000000000002]]
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        http_client: httpx.Client | None = None,
        sleep: _Sleep = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if base_url is None and http_client is None:
            base_url = os.environ.get(ENV_URL) or DEFAULT_URL
        self.base_url = (base_url or "").rstrip("/")
        self.max_retries = max_retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._rand = rand
        token = token if token is not None else os.environ.get(ENV_TOKEN)
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._owns_http = http_client is None
        self._sender: Sender
        route = plain_http_route(self.base_url) if http_client is None else None
        if route is not None:
            self._sender = KeepAliveSender(*route, timeout=DEFAULT_TIMEOUT if timeout is None else timeout)
            timeout = None
        elif http_client is None:  # https, or a proxy from the environment: httpx's own way
            client = httpx.Client(timeout=DEFAULT_TIMEOUT if timeout is None else timeout)
            self._sender = HttpxSender(client, owned=True)
            timeout = None
        else:
            self._sender = HttpxSender(http_client, owned=False)
        self._timeout = timeout  # per request, only to override an injected client's own
        self._closed = False
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def close(self) -> None:
        """Close the connection pool (not an injected ``http_client``). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._sender.close()

    def __enter__(self) -> LRClient:
        if self._closed:
            raise ClientClosed("this LRClient is closed; make a new one")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- runs ---------------------------------------------------------------------------

    def create_run(
        self,
        schedule: Mapping[str, Any],
        base_lrs: Sequence[float],
        *,
        base_momentums: Sequence[float] | None = None,
        run_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        world_size: int | None = None,
    ) -> dict[str, Any]:
        """Create a run, or join it when it exists with the identical spec.

        Returns:
            The run (``run_id``, ``horizon``, ``lrs``, ``momentums``, ``status`` ...).

        Raises:
            InvalidSchedule: the spec is invalid (``errors`` names the field).
            RunConflict: the run exists with a different spec.
        """
        body: dict[str, Any] = {
            "schedule": dict(schedule),
            "base_lrs": [float(x) for x in base_lrs],
        }
        if base_momentums is not None:
            body["base_momentums"] = [float(x) for x in base_momentums]
        if run_id is not None:
            body["run_id"] = run_id
        if labels:
            body["labels"] = {str(k): str(v) for k, v in labels.items()}
        if world_size is not None:
            body["world_size"] = int(world_size)
        return self._object("POST", "/v1/runs", json=body)

    def read_run(self, run_id: str) -> dict[str, Any]:
        """The run, with its values at the horizon."""
        return self._object("GET", f"/v1/runs/{_quote(run_id)}")

    def list_runs(
        self,
        *,
        labels: Mapping[str, str] | Sequence[str] | None = None,
        status: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        stale: bool = False,
    ) -> dict[str, Any]:
        """One page of runs; ``labels`` as ``{"key": "value"}`` or ``["key:value"]``; ``stale``:
        only active runs no rank has asked about for the server's ``LRSERVE_STALE_AFTER_S``."""
        params: list[tuple[str, str]] = []
        if isinstance(labels, Mapping):
            params += [("label", f"{k}:{v}") for k, v in labels.items()]
        elif labels:
            params += [("label", str(item)) for item in labels]
        for key, value in (("status", status), ("limit", limit), ("cursor", cursor)):
            if value is not None:
                params.append((key, str(value)))
        if stale:
            params.append(("stale", "true"))
        return self._object("GET", "/v1/runs", params=params)

    def delete_run(self, run_id: str) -> None:
        """Delete a run (admin)."""
        self.request("DELETE", f"/v1/runs/{_quote(run_id)}")

    # -- stepping -----------------------------------------------------------------------

    def read_lr(
        self,
        run_id: str,
        step: int,
        *,
        ahead: int = 0,
        max_retries: int | None = None,
        tail: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """The final values of ``step .. step + m`` (``m <= ahead``); commits them.

        ``tail``: the provisional-tail fields (``provisional``, ``provisional_from``,
        ``provisional_id``, ``rank``; API.md, "Outages: the provisional tail").
        """
        params = {"step": str(int(step)), "ahead": str(int(ahead))}
        params.update({k: str(int(v)) for k, v in (tail or {}).items()})
        return self._object("GET", f"/v1/runs/{_quote(run_id)}/lr", params=params, max_retries=max_retries)

    def step_run(
        self,
        run_id: str,
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        rank: int = 0,
        ahead: int = 0,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        tail: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """Commit ``step`` with the metrics passed to the ``step``-th ``step()``; as ``read_lr``.

        Retrying is safe: a step already final answers its final value.
        """
        body = {
            "step": int(step),
            "metrics": dict(metrics or {}),
            "rank": int(rank),
            "ahead": int(ahead),
            **{k: int(v) for k, v in (tail or {}).items() if k != "rank"},
        }
        path = f"/v1/runs/{_quote(run_id)}/step"
        return self._object("POST", path, json=body, timeout=timeout, max_retries=max_retries)

    def send_metrics(
        self, run_id: str, records: Sequence[Mapping[str, Any]], *, max_retries: int | None = None
    ) -> int:
        """Store records ``{"step", "name", "value", "rank"}``; returns how many were accepted.

        Idempotent per ``(name, step, rank)``: re-sending never doubles a record.
        """
        path = f"/v1/runs/{_quote(run_id)}/metrics"
        answer = self.request("POST", path, json={"records": list(records)}, max_retries=max_retries)
        return int(answer.get("accepted", len(records))) if isinstance(answer, dict) else len(records)

    def read_history(self, run_id: str, *, max_points: int | None = None) -> dict[str, Any]:
        """LRs, metrics and events of a run, downsampled to ``max_points`` per series (the
        events: the latest ``max_points``, and ``events_total``)."""
        params = {} if max_points is None else {"max_points": str(int(max_points))}
        return self._object("GET", f"/v1/runs/{_quote(run_id)}/history", params=params)

    def read_lr_finder(self, run_id: str) -> dict[str, Any]:
        """The LR range test's curve and suggestions."""
        return self._object("GET", f"/v1/runs/{_quote(run_id)}/lr-finder")

    # -- operators ----------------------------------------------------------------------

    def control_run(
        self, run_id: str, action: str, *, at_step: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Apply one operator action (``set_lr``, ``scale``, ``hold``, ``resume``,
        ``replace_schedule``, ``stop``). Not retried once sent: actions are not idempotent.
        """
        body: dict[str, Any] = {"action": action, **fields}
        if at_step is not None:
            body["at_step"] = int(at_step)
        return self._object("POST", f"/v1/runs/{_quote(run_id)}/control", json=body, idempotent=False)

    def control_fleet(
        self,
        labels: Mapping[str, str],
        action: Mapping[str, Any],
        *,
        statuses: Sequence[str] | None = None,
        reason: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Apply one action (``{"action": "scale", "factor": 0.5}``) to every run carrying
        ``labels`` (and one of ``statuses``): ``POST /v1/control``. Not retried once sent."""
        selector: dict[str, Any] = {"labels": dict(labels)}
        if statuses:
            selector["status"] = list(statuses)
        body: dict[str, Any] = {"selector": selector, "action": dict(action), "dry_run": bool(dry_run)}
        if reason is not None:
            body["reason"] = reason
        return self._object("POST", "/v1/control", json=body, idempotent=dry_run)

    def preview_schedule(
        self,
        schedule: Mapping[str, Any],
        base_lrs: Sequence[float],
        *,
        steps: int,
        base_momentums: Sequence[float] | None = None,
        metrics: Mapping[str, Sequence[float | None]] | None = None,
    ) -> dict[str, Any]:
        """The values at steps ``0 .. steps - 1`` of a schedule, without creating a run."""
        body: dict[str, Any] = {
            "schedule": dict(schedule),
            "base_lrs": [float(x) for x in base_lrs],
            "steps": int(steps),
        }
        if base_momentums is not None:
            body["base_momentums"] = [float(x) for x in base_momentums]
        if metrics:
            body["metrics"] = {k: list(v) for k, v in metrics.items()}
        return self._object("POST", "/v1/schedules/preview", json=body)

    def read_catalog(self) -> dict[str, Any]:
        """Every accepted schedule ``type`` with its arguments, types and defaults."""
        return self._object("GET", "/v1/schedules/catalog")

    # -- the one request path -----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        idempotent: bool = True,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> Any:
        """Send one request with retries; return the decoded JSON answer (``None`` for 204).

        Raises:
            ClientClosed: after ``close()``.
            TransportError: the server could not be reached, after every retry.
            ServerError: the server answered an error (a retryable one after every retry).
        """
        retries = self.max_retries if max_retries is None else max_retries
        attempt = 0
        while True:
            try:
                return self._send_once(method, path, json=json, params=params, timeout=timeout)
            except (TransportError, ServerError) as exc:
                if attempt >= retries or not _should_retry(exc, idempotent):
                    raise
                self._sleep(self._retry_delay(attempt, exc))
                attempt += 1

    def _object(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        idempotent: bool = True,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> dict[str, Any]:
        """``request`` to a route whose answer is a JSON object (every route but a delete's)."""
        answer: dict[str, Any] = self.request(
            method, path, json=json, params=params, idempotent=idempotent, timeout=timeout,
            max_retries=max_retries,
        )
        return answer

    def _send_once(self, method: str, path: str, *, json: Any, params: Any, timeout: Any) -> Any:
        if self._closed:
            raise ClientClosed("this LRClient is closed; make a new one")
        url = self.base_url + path
        if params:
            url += "?" + urlencode(params, doseq=True)
        headers, body = self._headers, None
        if json is not None:
            body = _encode(json).encode()
            headers = self._json_headers
        # a per-call timeout tunes our own connections; an injected client keeps the timeouts it
        # was given (or the one passed to LRClient): Starlette's TestClient refuses per-call ones
        if timeout is None or not self._owns_http:
            timeout = self._timeout
        answer = self._sender.send(method, url, headers, body, timeout)
        if answer.status >= 400:
            raise _error_for(answer)
        if answer.status == 204 or not answer.content:
            return None
        return loads(answer.content)

    def _retry_delay(self, attempt: int, exc: Exception) -> float:
        delay = backoff_delay(attempt, base=self._backoff, cap=self._max_backoff, rand=self._rand)
        retry_after = exc.retry_after if isinstance(exc, ServerError) else None
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max_backoff))
        return delay


#: A request body's JSON: Python's encoder, not httpx's or orjson's: a diverged loss (NaN,
#: inf) is real data, and the server reads the NaN / Infinity tokens (httpx refuses to write
#: them, orjson writes null). Made once: ``json.dumps`` with ``separators`` makes an encoder
#: per call.
_encode = _json.JSONEncoder(separators=(",", ":")).encode


def loads(content: bytes) -> Any:
    """An answer's JSON as Python values: with orjson when it is installed, else the standard
    library (and for the ``NaN``/``Infinity`` tokens of a diverged loss, which orjson refuses).

    The answers of ``GET .../lr`` with a provisional tail hold tens of thousands of floats, parsed
    on the fetch thread: the standard library's parser holds the GIL for all of it (~60 ms for
    30,000 steps here), and the training loop's ``step()`` waits behind it; orjson takes ~12 ms.
    Both give every float64 bit for bit (shortest-repr text, correctly rounded).
    """
    if _orjson is not None:
        try:
            return _orjson.loads(content)
        except _orjson.JSONDecodeError:
            pass
    return _json.loads(content)


def _should_retry(exc: Exception, idempotent: bool) -> bool:
    if isinstance(exc, ServerUnreachable):
        return True  # nothing reached the server
    if not idempotent:
        return False
    if isinstance(exc, TransportError):
        return True
    return isinstance(exc, ServerError) and exc.retryable


def _error_for(answer: Answer) -> ServerError:
    try:
        body = loads(answer.content)
    except ValueError:
        body = {"detail": answer.content.decode("utf-8", "replace").strip()[:500]}
    error = error_from_response(answer.status, body)
    error.retry_after = _parse_retry_after(answer.retry_after)
    return error


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _quote(run_id: str) -> str:
    return quote(str(run_id), safe="")
