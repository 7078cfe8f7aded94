"""Fixtures of the API tests: every test that uses ``settings`` runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from lrserve.service.app import create_app
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """The store backend of this test: ``sqlite`` or ``postgres`` (skipped, with the reason, if absent)."""
    return request.param


@pytest.fixture
def settings(backend, database_url) -> Settings:
    """Settings on a fresh, empty database of the test's backend.

    Tests that need other settings derive them with ``settings.model_copy(update=...)``,
    so they too run on both backends.
    """
    return Settings(db=database_url(backend), snapshot_every=50)


@pytest.fixture(scope="module", params=BACKENDS)
def module_settings(request, module_database_url) -> Settings:
    """``settings`` shared by a module's tests (one database per backend): for tests that
    only read, or whose writes the next test does not mind (one app per module, not per test)."""
    return Settings(db=module_database_url(request.param), snapshot_every=50)


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def api(app):
    with TestClient(app) as client:
        yield client


def make_run(api, run_id="r1", schedule=None, base_lrs=(0.1,), **extra):
    body = {"run_id": run_id, "schedule": schedule or {"type": "StepLR", "step_size": 3, "gamma": 0.5},
            "base_lrs": list(base_lrs), **extra}
    response = api.post("/v1/runs", json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()


class CallsAtOnce:
    """Replaces ``owner.name`` (a method of the app's manager) by one that counts its calls running
    at once (``most``) and the threads they run in (``threads``). The first ``limit`` calls wait
    until ``limit`` run together, so that a test sees whether more than that ever could."""

    def __init__(self, monkeypatch, owner, name: str, limit: int) -> None:
        self.most, self.threads = 0, set()
        self._busy, self._limit, self._full, self._lock = 0, limit, threading.Event(), threading.Lock()
        self._call = getattr(owner, name)
        monkeypatch.setattr(owner, name, self._counted)

    def _counted(self, *args, **kwargs):
        with self._lock:
            self._busy += 1
            self.most = max(self.most, self._busy)
            self.threads.add(threading.current_thread().name)
            if self._busy >= self._limit:
                self._full.set()
        try:
            self._full.wait(timeout=60)  # the first ones wait until the threads are all busy
            return self._call(*args, **kwargs)
        finally:
            with self._lock:
                self._busy -= 1
