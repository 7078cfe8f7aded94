"""What ``lrserve serve`` hands each uvicorn worker process: the app factory, with the one
``Settings`` it read (pickled to each worker, not passed through the environment).

Kept light on purpose: a worker unpickles this before it answers uvicorn's health check,
so the app (FastAPI, torch) is imported only when the worker builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI


@dataclass(frozen=True)
class AppFactory:
    """``create_app(settings)`` as uvicorn's app factory (``factory=True``)."""

    settings: Settings

    def __call__(self) -> FastAPI:
        from service.app import create_app

        return create_app(self.settings)
