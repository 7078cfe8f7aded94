"""Fixtures of the store contract tests: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lrserve.service.store import BaseStore, open_store

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
