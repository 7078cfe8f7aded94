from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from lrserve.client import RemoteScheduler

from tests.client.fake_server import FakeServer, Optimizer
from tests.specs import plateau

STEP_LR = {"type": "StepLR", "step_size": 10, "gamma": 0.5}
PLATEAU = plateau(factor=0.1)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LRSERVE_URL", "LRSERVE_TOKEN", "LRSERVE_RUN_ID", "LRSERVE_LABELS",
                 "LRSERVE_MODE"):
        monkeypatch.delenv(name, raising=False)


CLIENT_THREADS = frozenset({"lrserve-fetch", "lrserve-tail", "lrserve-metrics", "lrserve-release"})
"""The client's threads (client/_fetcher.py, _buffer.py, _scheduler.py)."""


def client_threads() -> list[threading.Thread]:
    """The client's threads alive now. Not the service's (``lrserve-commit``, ``-wal-checkpoint``,
    ``-health``): a module-scoped app of a service test keeps them while the module runs, and a
    pytest-xdist worker may run client tests in between (a fresh-clone CI failed 29 client tests
    so, on threads of tests/service/api/test_auth.py's app)."""
    return [t for t in threading.enumerate() if t.name in CLIENT_THREADS]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    names = [t.name for t in client_threads()]
    assert not names, f"threads left running: {names}"


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture
def http(fake: FakeServer) -> Iterator[httpx.Client]:
    with fake.client() as client:
        yield client


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_scheduler(http: httpx.Client, clock: FakeClock) -> Iterator[Callable[..., RemoteScheduler]]:
    made: list[RemoteScheduler] = []

    def make(optimizer: Any = None, schedule: dict[str, Any] | None = None, **kwargs: Any) -> RemoteScheduler:
        kwargs.setdefault("http_client", http)
        kwargs.setdefault("sleep", lambda seconds: None)
        kwargs.setdefault("clock", clock)
        sched = RemoteScheduler(optimizer or Optimizer({"lr": 0.1}), schedule or STEP_LR, **kwargs)
        made.append(sched)
        return sched

    yield make
    for sched in made:
        sched.close()
