"""What both framework callbacks share: finding the ``RemoteScheduler`` and its metric."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from lrserve.client._disabled import LocalScheduler
from lrserve.client._scheduler import RemoteScheduler

Steered = RemoteScheduler | LocalScheduler
"""What a callback reports to: the ``RemoteScheduler``, or under ``LRSERVE_MODE=disabled`` the
``LocalScheduler`` it became (the same calls)."""


def remote_scheduler(scheduler: Any) -> Steered | None:
    """The ``RemoteScheduler`` behind ``scheduler`` (accelerate wraps it in ``.scheduler``);
    under ``LRSERVE_MODE=disabled`` the ``LocalScheduler`` it became."""
    while scheduler is not None and not isinstance(scheduler, (RemoteScheduler, LocalScheduler)):
        inner = getattr(scheduler, "scheduler", None)
        scheduler = None if inner is scheduler else inner
    return scheduler


def reported_name(scheduler: Steered, key: str | None) -> str:
    """The metric name the schedule watches, under which the framework's ``key`` is reported.

    A schedule watching one metric takes the framework's value under that name (the
    framework's ``eval_loss`` is the spec's ``val_loss``); one watching several needs
    ``key`` to be one of them.

    Raises:
        ValueError: The schedule watches no metric, or several and ``key`` is none of them.
    """
    watched = scheduler.watched
    if len(watched) == 1:
        return next(iter(watched))
    if key in watched:
        return str(key)
    if not watched:
        raise ValueError(
            f"the schedule of run {scheduler.run_id!r} ({scheduler.schedule['type']}) watches no "
            f"metric: LRServeCallback has nothing to report (it needs a ReduceLROnPlateau stage)"
        )
    raise ValueError(
        f"the schedule of run {scheduler.run_id!r} watches {sorted(watched)}; pass "
        f"LRServeCallback(monitor=...) naming which one the framework's metric is"
    )


def plateau_modes(spec: Mapping[str, Any]) -> Iterator[str]:
    """The ``mode`` of every ``ReduceLROnPlateau`` stage in ``spec`` (torch's default ``min``)."""
    stack: list[Any] = [spec]
    while stack:
        node = stack.pop()
        if not isinstance(node, Mapping):
            continue
        if node.get("type") == "ReduceLROnPlateau":
            yield str(node.get("mode", "min"))
        stack.extend(node.get("schedulers") or [])
        stack.append(node.get("then"))
