"""lrserve's thin client: ``RemoteScheduler`` (a drop-in torch LR scheduler) and ``LRClient``.

Needs only httpx (and the job's own torch); imports nothing of the server.
"""

from __future__ import annotations

from lrserve.client._client import LRClient
from lrserve.client._exceptions import (
    AuthenticationError,
    CadenceWarning,
    ClientClosed,
    ClientMisuseError,
    InvalidRequest,
    InvalidSchedule,
    LimitExceeded,
    LRServiceError,
    LRServiceWarning,
    MetricsDroppedWarning,
    PermissionDenied,
    RunConflict,
    RunNotFound,
    ScheduleError,
    ServerAwayWarning,
    ServerError,
    ServerTimeout,
    ServerUnavailable,
    ServerUnreachable,
    TransportError,
)
from lrserve.client._scheduler import ClientState, RemoteScheduler

__all__ = [
    "AuthenticationError",
    "CadenceWarning",
    "ClientClosed",
    "ClientMisuseError",
    "ClientState",
    "InvalidRequest",
    "InvalidSchedule",
    "LimitExceeded",
    "LRClient",
    "LRServiceError",
    "LRServiceWarning",
    "MetricsDroppedWarning",
    "PermissionDenied",
    "RemoteScheduler",
    "RunConflict",
    "RunNotFound",
    "ScheduleError",
    "ServerAwayWarning",
    "ServerError",
    "ServerTimeout",
    "ServerUnavailable",
    "ServerUnreachable",
    "TransportError",
]

__locals = locals()
for __name in __all__:
    if not __name.startswith("__"):
        setattr(__locals[__name], "__module__", "lrserve.client")  # noqa
