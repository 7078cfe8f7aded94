"""The trainer's teardown under torchrun (gloo): no collective in flight and no gloo thread alive
when a rank's interpreter shuts down (``tests/trainer/teardown.py`` runs the job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from tests.trainer.harness import ROOT, torchrun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/task"),
]


@pytest.fixture(scope="module")
def job() -> subprocess.CompletedProcess[str]:
    """One job for both tests (two ranks import torch and build DDP: ~35 s at load 10 here)."""
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="error",
        PYTHONFAULTHANDLER="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    return subprocess.run(
        [*torchrun(), "--standalone", "--nproc_per_node=2", "-m", "tests.trainer.teardown"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_no_gloo_thread_outlives_close(job):
    """``Dist.close()`` frees the process group, so its destructor joins gloo's threads: each rank
    is back to the threads it had before ``setup``. (torch 2.13: ``destroy_process_group()``
    alone left all three, two ``pt_gloo_runloop`` and ``gloo_tcp_loop``, running into interpreter
    shutdown, because DDP's import of ``torch.distributed.nn.functional`` after
    ``init_process_group`` binds the group as default arguments.)"""
    proc = job
    ranks = [
        json.loads(line.removeprefix("threads "))
        for line in proc.stdout.splitlines()
        if line.startswith("threads ")
    ]
    assert len(ranks) == 2, proc.stdout
    for threads in ranks:
        assert not [name for name in threads["after"] if "gloo" in name], threads
        # nothing else new either, but autograd's device threads (a CUDA build starts one per
        # GPU at the first backward, for the process's life)
        new = Counter(threads["after"]) - Counter(threads["before"])
        assert not [name for name in new.elements() if not name.startswith("pt_autograd")], threads


def test_a_collective_left_at_close_does_not_abort_the_rank_at_exit(job):
    """The forced race (see ``teardown.py``): before, rank 1 died of SIGABRT, "terminate called
    without an active exception", in ``ProcessGroupGloo::runLoop`` -> ``decref_pyobject`` ->
    ``pthread_exit``; now ``close()`` waits for the collective (barrier) and joins the threads."""
    proc = job
    out = proc.stdout + proc.stderr[-20_000:]
    assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr, out
    assert proc.returncode == 0, out
    assert proc.stdout.count("threads ") == 2, out
