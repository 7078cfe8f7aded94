"""The client's exceptions and warnings.

Every exception the client raises on purpose derives from ``LRServiceError``::

    LRServiceError
    ├── TransportError ............ the server could not be talked to
    │   ├── ServerUnreachable ..... no connection (refused, DNS, reset)
    │   └── ServerTimeout ......... connected, but no answer in time
    ├── ServerError ............... the server answered an error: ``code``, ``detail``, ``errors``
    │   ├── InvalidRequest ........ 422 invalid_input: a bad field value (also a ``ValueError``)
    │   │   ├── InvalidSchedule ... 422 invalid_spec: the schedule spec is wrong
    │   │   └── ScheduleError ..... 422 schedule_error: torch itself would raise at that step
    │   ├── LimitExceeded ......... 413 limit_exceeded, 431 request_head_too_large
    │   ├── AuthenticationError ... 401 unauthorized: missing or unknown token
    │   ├── PermissionDenied ...... 403 forbidden: the token's role may not do this
    │   ├── RunNotFound ........... 404 run_not_found
    │   ├── RunConflict ........... 409 run_conflict: the run exists with a different spec
    │   └── ServerUnavailable ..... 503 store_unavailable, too_many_connections, server_stopping,
    │                               and any other 5xx
    └── ClientMisuseError ......... the program used the client wrongly (also a ``RuntimeError``)
        └── ClientClosed .......... used after ``close()``

Warnings (all ``LRServiceWarning``, a ``UserWarning``): ``ServerAwayWarning`` (training goes on
with the values held or the provisional tail, waits for the server, or holds the last LR),
``CadenceWarning`` (a watched metric came for a
step whose values were already fetched), ``MetricsDroppedWarning`` (logged metrics were lost).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

__all__ = [
    "CODE_TO_EXCEPTION",
    "AuthenticationError",
    "CadenceWarning",
    "ClientClosed",
    "ClientMisuseError",
    "InvalidRequest",
    "InvalidSchedule",
    "LRServiceError",
    "LRServiceWarning",
    "LimitExceeded",
    "MetricsDroppedWarning",
    "PermissionDenied",
    "RunConflict",
    "RunNotFound",
    "ScheduleError",
    "ServerAwayWarning",
    "ServerError",
    "ServerTimeout",
    "ServerUnavailable",
    "ServerUnreachable",
    "TransportError",
    "error_from_response",
]


class LRServiceError(Exception):
    """Root of every error the lrserve client raises on purpose."""


class TransportError(LRServiceError):
    """The server could not be talked to; retrying later may work."""


class ServerUnreachable(TransportError):
    """No connection could be made (refused, unknown host, reset)."""


class ServerTimeout(TransportError):
    """The server did not answer in time."""


class ServerError(LRServiceError):
    """The server answered with an error.

    Attributes:
        status_code: The HTTP status.
        code: The server's machine-readable code (``"invalid_spec"``, ...).
        detail: The server's message, in words.
        errors: ``[{"field": ..., "message": ...}]``, one per offending field.
        retry_after: Seconds the server asked to wait (``Retry-After``), if it said.
    """

    def __init__(
        self,
        detail: str,
        *,
        status_code: int = 0,
        code: str = "",
        errors: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code
        self.code = code
        self.errors = [dict(e) for e in errors]
        self.retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later unchanged."""
        return self.status_code >= 500 or self.status_code in (408, 429)


class InvalidRequest(ServerError, ValueError):
    """A field has a value the server does not accept (422); a ``ValueError``, as in torch."""


class InvalidSchedule(InvalidRequest):
    """The schedule spec is invalid; ``errors`` names each offending field path."""


class ScheduleError(InvalidRequest):
    """The schedule cannot produce a value at that step (torch itself would raise there)."""


class LimitExceeded(ServerError):
    """The request is larger than a server limit (413)."""


class AuthenticationError(ServerError):
    """The token is missing or unknown (401)."""


class PermissionDenied(ServerError):
    """The token's role may not do this (403)."""


class RunNotFound(ServerError):
    """No run has this id (404)."""


class RunConflict(ServerError):
    """The run exists with a different spec, or the request contradicts its state (409)."""


class ServerUnavailable(ServerError):
    """The server cannot serve now (503, or another 5xx); retrying later may work."""


class ClientMisuseError(LRServiceError, RuntimeError):
    """The program used the client in a way it does not support."""


class ClientClosed(ClientMisuseError):
    """The client or scheduler was used after ``close()``."""


class LRServiceWarning(UserWarning):
    """Root of the client's warnings."""


class ServerAwayWarning(LRServiceWarning):
    """The server is away: training goes on with the values held or the provisional tail, waits
    for the server (a step past the tail, or whose report decides its values), or keeps the
    last LR: each once per outage (a wait once per reason)."""


class CadenceWarning(LRServiceWarning):
    """A watched metric arrived for a step whose values were already final."""


class MetricsDroppedWarning(LRServiceWarning):
    """Logged metrics were dropped (buffer full, or the server refused them)."""


#: The server's error ``code`` -> the exception raised for it.
CODE_TO_EXCEPTION: dict[str, type[ServerError]] = {
    "invalid_input": InvalidRequest,
    "invalid_spec": InvalidSchedule,
    "schedule_error": ScheduleError,
    "limit_exceeded": LimitExceeded,
    "request_head_too_large": LimitExceeded,  # 431: the request's line and headers over 64 KiB
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDenied,
    "run_not_found": RunNotFound,
    "run_conflict": RunConflict,
    "store_unavailable": ServerUnavailable,
    "too_many_connections": ServerUnavailable,
    "server_stopping": ServerUnavailable,  # this replica is stopping: retry (another one, or once it is up)
    "request_timeout": ServerError,  # 408: the request came too slowly; retryable as it is
}

_STATUS_TO_EXCEPTION: dict[int, type[ServerError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: RunNotFound,
    409: RunConflict,
    413: LimitExceeded,
    422: InvalidRequest,
}


def error_from_response(status_code: int, body: Any) -> ServerError:
    """Build the exception for an error answer.

    Args:
        status_code: The HTTP status (400 or more).
        body: The decoded JSON body, or anything else when it was not JSON.

    Returns:
        The ``ServerError`` subclass chosen by the body's ``code``, else by the status.
    """
    data = body if isinstance(body, Mapping) else {}
    code, errors = data.get("code"), data.get("errors")
    code = code if isinstance(code, str) else ""
    detail = _detail_text(data.get("detail"), status_code)
    errors = errors if isinstance(errors, list) else []
    cls = CODE_TO_EXCEPTION.get(code) or _class_for_status(status_code)
    return cls(
        detail,
        status_code=status_code,
        code=code,
        errors=[e for e in errors if isinstance(e, Mapping)],
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first caller outside this package."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and _in_package(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _in_package(filename: str) -> bool:
    return os.path.dirname(os.path.abspath(filename)) == _PACKAGE_DIR


def _class_for_status(status_code: int) -> type[ServerError]:
    if status_code >= 500:
        return ServerUnavailable
    return _STATUS_TO_EXCEPTION.get(status_code, ServerError)


def _detail_text(detail: Any, status_code: int) -> str:
    if isinstance(detail, str) and detail:
        return detail
    if detail:  # e.g. a list of pydantic errors from a server that kept FastAPI's default shape
        return str(detail)
    return f"the server answered HTTP {status_code}"
