"""What ``lrserve serve`` hands each uvicorn worker process: the app factory and the HTTP
protocol factory, bound to the one ``Settings`` it read (pickled to each worker, not
passed through the environment).

Kept light on purpose: a worker unpickles these before it answers uvicorn's health check
(5 s), so what they build (the app: FastAPI, SQLAlchemy, torch; the protocol) is imported
only when the worker builds it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lrserve.service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from lrserve.service.connections import GuardedHttpProtocol


@dataclass(frozen=True)
class AppFactory:
    """``create_app(settings)`` as uvicorn's app factory (``factory=True``)."""

    settings: Settings

    def __call__(self) -> FastAPI:
        """The app, its modules imported without the cyclic collector, as ``lrserve serve``
        does (``cli.serve_command``): in a worker process that is torch's import. The app's
        warm-up, before it is ready, turns the collector back on."""
        gc.disable()
        try:
            from lrserve.service.app import create_app

            return create_app(self.settings)
        except BaseException:
            gc.enable()
            raise


@dataclass(frozen=True)
class GuardedProtocol:
    """uvicorn's ``http=``: a ``GuardedHttpProtocol`` per connection, with the server's request
    timeout and connection limit (``service/connections.py``)."""

    request_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> GuardedProtocol:
        return cls(settings.request_timeout_s, settings.max_connections)

    def __call__(self, *args: Any, **kwargs: Any) -> GuardedHttpProtocol:
        from lrserve.service.connections import GuardedHttpProtocol

        return GuardedHttpProtocol(*args, request_timeout_s=self.request_timeout_s,
                                   max_connections=self.max_connections, **kwargs)
