"""A ``RemoteScheduler`` dropped without ``close()`` is collected with its optimizer and model.

Torch users never call ``close()``, and sweeps and notebooks build schedulers in loops: the
worker threads must not keep a dropped scheduler (and through it the optimizer and every
parameter) alive, and they must end. Against a real server.
"""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch
from lrserve.client import RemoteScheduler

from tests.client.conftest import client_threads
from tests.live_server import ServerProcess
from tests.specs import plateau

PLATEAU = plateau()
COSINE = {"type": "CosineAnnealingLR", "T_max": 100}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leak-server")
    with ServerProcess(f"sqlite:///{tmp}/leak.db", tmp) as proc:
        yield proc


def lrserve_threads():
    return client_threads()


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return condition()


def train_and_drop(url, spec, run_id):
    """Build a model, optimizer and scheduler, train a little, log, return weak references."""
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = RemoteScheduler(opt, spec, run_id=run_id, url=url, steps_per_epoch=5)
    for k in range(1, 21):
        opt.step()
        sched.log(train_loss=1.0 / k)
        sched.step(1.0) if (k % 5 == 0 and sched.watched) else sched.step()
    refs = [weakref.ref(x) for x in (sched, opt, model.weight)]
    assert lrserve_threads(), "the scheduler runs its worker threads"
    return refs


@pytest.mark.parametrize("spec", [COSINE, PLATEAU], ids=["time-based", "plateau"])
def test_a_dropped_scheduler_is_collected_and_its_threads_end(server, spec):
    assert wait_until(lambda: not lrserve_threads())  # none from earlier tests
    refs = [train_and_drop(server.url, spec, f"leak-{spec['type']}-{i}") for i in range(3)]
    gc.collect()
    assert [r() for group in refs for r in group] == [None] * 9  # scheduler, optimizer, weights
    assert wait_until(lambda: not lrserve_threads()), f"threads left running: {lrserve_threads()}"


def test_the_metrics_logged_before_the_drop_are_sent(server):
    import httpx

    train_and_drop(server.url, COSINE, "leak-metrics")
    gc.collect()
    assert wait_until(lambda: not lrserve_threads())
    history = httpx.get(f"{server.url}/v1/runs/leak-metrics/history", timeout=30).json()
    assert history["metrics"]["train_loss"]["steps"] == list(range(1, 21))
