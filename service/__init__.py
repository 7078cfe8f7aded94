"""lrserve's server: learning-rate schedules over HTTP, computed by torch's own schedulers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lrserve.service.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> object:  # lazy, so `python -m lrserve.service --help` stays fast
    if name == "create_app":
        from lrserve.service.app import create_app

        return create_app
    raise AttributeError(name)
