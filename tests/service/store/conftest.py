"""Fixtures of the store contract tests: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lrserve.service.store import BaseStore, EventKind, NewEvent, open_store
from lrserve.service.store.sql import SqlStore

from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(backend, database_url) -> str:
    """A fresh, empty database of the test's backend."""
    return database_url(backend)


@pytest.fixture
def store(store_url) -> Iterator[BaseStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


@pytest.fixture
def sqlite_store_with_run(database_url) -> Iterator[SqlStore]:
    """An SQLite store holding one run, ``r`` (the tests of SQLite's own statements and writer)."""
    opened = open_store(database_url("sqlite"))
    opened.create_run("r", {"schedule": {"type": "StepLR", "step_size": 3}}, {},
                      NewEvent(EventKind.CREATED, 0, {}))
    yield opened
    opened.close()
