"""Fixtures of the run tests: managers as processes hold them, closed as a server closes them;
``transactions``, the group transactions a manager's store opens."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from lrserve.service.offload import BigWork
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import BaseStore, open_store

OpenManager = Callable[..., RunManager]


@pytest.fixture
def open_manager() -> Iterator[OpenManager]:
    """Factory: ``open_manager(settings, big_work=None)`` -> a ``RunManager`` with its own store
    (its own connections, as another process has) on ``settings.db``. After the test each is
    closed as a server's lifespan closes it: the manager first (its commit threads), then its
    store."""
    made: list[tuple[RunManager, BaseStore]] = []  # its store as opened (a test may swap ``.store``)

    def make(settings: Settings, big_work: BigWork | None = None) -> RunManager:
        store = open_store(settings.db)
        made.append((RunManager(store, settings, big_work), store))
        return made[-1][0]

    yield make
    for manager, store in made:
        manager.close()
        store.close()


def transactions(manager: RunManager, monkeypatch) -> list[list[str]]:
    """The run ids of every ``lock_runs`` transaction the manager's store opens from now on."""
    opened: list[list[str]] = []
    original = manager.store.lock_runs

    def counted(run_ids, **how):
        opened.append(sorted(run_ids))
        return original(run_ids, **how)

    monkeypatch.setattr(manager.store, "lock_runs", counted)
    return opened
