"""Actions by selector (API.md, Fleet control): one operator action on every matching run.

Each run takes the action exactly as ``POST /v1/runs/{run_id}/control`` would, at its
own first free step, under its own lock: runs never wait for each other, and a run that
refuses (stopped meanwhile, a ``set_lr`` with the wrong number of groups, deleted) is
reported in its result while the others still take it. The selector is read once, from
the store (so every replica selects alike); a run created after that is not touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import InvalidInput, LRServeError
from lrserve.service.runs.manager import RunManager
from lrserve.service.store.base import BaseStore, RunRecord

_PAGE = 1000


@dataclass(frozen=True)
class Selector:
    """Runs carrying every one of ``labels`` whose status is among ``statuses`` (None: any)."""

    labels: Mapping[str, str]
    statuses: Sequence[RunStatus] | None = None

    def matches(self, record: RunRecord) -> bool:
        return self.statuses is None or record.status in self.statuses


@dataclass(frozen=True)
class FleetResult:
    """What one matching run made of the action: ``applied_at``, or the ``error`` it refused
    with; for a dry run, its ``status`` and ``horizon``."""

    run_id: str
    applied_at: int | None = None
    error: LRServeError | None = None
    status: RunStatus | None = None
    horizon: int | None = None


@dataclass(frozen=True)
class FleetOutcome:
    results: list[FleetResult]
    dry_run: bool

    @property
    def matched(self) -> int:
        return len(self.results)


def select_runs(store: BaseStore, selector: Selector, *, most: int) -> list[RunRecord]:
    """The matching runs in ``run_id`` order.

    Raises:
        InvalidInput: more than ``most`` runs match (``selector``): narrow it.
    """
    found = []
    for record in _all_runs(store, selector.labels):
        if selector.matches(record):
            found.append(record)
            if len(found) > most:
                raise InvalidInput.at(
                    "selector", f"matches more than {most} runs (the server's max_fleet_runs); narrow it"
                )
    return found


def _all_runs(store: BaseStore, labels: Mapping[str, str]) -> Iterator[RunRecord]:
    after = None
    while True:
        page = store.list_runs(labels=labels, limit=_PAGE, after=after)
        yield from page
        if len(page) < _PAGE:
            return
        after = page[-1].run_id


def control_fleet(
    manager: RunManager,
    selector: Selector,
    action: Mapping[str, Any],
    *,
    actor: str,
    reason: str | None,
    dry_run: bool = False,
) -> FleetOutcome:
    """Apply ``action`` to every run ``selector`` matches; one result per run, in ``run_id`` order
    (the error a run refused with is the one a per-run request would have had).

    Raises:
        InvalidInput: the selector matches more runs than ``max_fleet_runs``.
    """
    records = select_runs(manager.store, selector, most=manager.settings.max_fleet_runs)
    results: list[FleetResult] = []
    for record in records:
        if dry_run:
            results.append(FleetResult(record.run_id, status=record.status, horizon=record.horizon))
            continue
        try:
            applied_at, _ = manager.control(record.run_id, dict(action), None, actor=actor, reason=reason)
        except LRServeError as exc:  # this run refuses; the others still take the action
            results.append(FleetResult(record.run_id, error=exc))
        else:
            results.append(FleetResult(record.run_id, applied_at=applied_at))
    return FleetOutcome(results, dry_run)
