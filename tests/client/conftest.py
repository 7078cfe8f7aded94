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


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    names = [t.name for t in threading.enumerate() if t.name.startswith("lrserve-")]
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
