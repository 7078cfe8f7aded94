"""The trainer's parts without a server: data, schedules, traces, timing, checkpoints, ranks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from lrserve.trainer import checkpoint, ddp
from lrserve.trainer.data import load_split, train_loader, val_shard
from lrserve.trainer.loop import StepTimes, evaluate, make_precision
from lrserve.trainer.model import make_model
from lrserve.trainer.schedules import EXAMPLES, resolve_schedule
from lrserve.trainer.trace import Trace, trace_path

from tests.trainer.harness import ROOT


def test_split_is_stratified_standardised_and_seeded():
    split = load_split(0)
    assert split.n_features == 64 and split.n_classes == 10
    assert len(split.y_train) + len(split.y_val) == 1797
    assert torch.bincount(split.y_val).min() >= 30  # every class in validation
    mean, std = split.x_train.mean(0), split.x_train.std(0)
    assert mean.abs().max() < 1e-5
    assert ((std - 1).abs() < 1e-2).logical_or(std == 0).all()
    assert torch.equal(load_split(0).x_val, split.x_val)
    assert not torch.equal(load_split(1).x_val, split.x_val)


def test_ranks_take_equal_steps_and_disjoint_validation_shards():
    split = load_split(0)
    loaders = [train_loader(split, 32, r, 3, seed=0, pin_memory=False) for r in range(3)]
    assert len({len(loader) for loader in loaders}) == 1
    shards = [val_shard(split, r, 3) for r in range(3)]
    assert sum(len(y) for _, y in shards) == len(split.y_val)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_named_example_is_a_spec_the_server_accepts(name):
    from lrserve.service.engine import spec as spec_module
    spec = resolve_schedule(name, steps_per_epoch=23, epochs=8, lr=0.1)
    spec_module.parse_schedule(spec, n_groups=1)


def test_schedule_from_a_json_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"type": "StepLR", "step_size": 5}))
    spec = resolve_schedule(str(path), steps_per_epoch=1, epochs=1, lr=0.1)
    assert spec == {"type": "StepLR", "step_size": 5}
    path.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="spec object"):
        resolve_schedule(str(path), steps_per_epoch=1, epochs=1, lr=0.1)
    with pytest.raises(SystemExit, match="named example"):
        resolve_schedule("no-such-thing", steps_per_epoch=1, epochs=1, lr=0.1)


def test_trace_paths_and_records(tmp_path):
    assert trace_path("t.{rank}.jsonl", 3).name == "t.3.jsonl"
    assert trace_path("t.jsonl", 0).name == "t.jsonl" and trace_path("t.jsonl", 1).name == "t.jsonl.1"
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.5)
    trace = Trace(str(tmp_path / "x.{rank}.jsonl"), 0)
    trace.step(7, 1, opt)
    trace.record("epoch", epoch=1)
    trace.close()
    lines = [json.loads(s) for s in (tmp_path / "x.0.jsonl").read_text().splitlines()]
    assert lines == [{"kind": "step", "step": 7, "epoch": 1, "lrs": [0.5], "momentums": [0.9]},
                     {"kind": "epoch", "epoch": 1}]
    Trace(None, 0).step(1, 1, opt)  # no path: nothing written, nothing raised


def test_step_times_share():
    times = StepTimes()
    times.add(0.010, 0.001)
    times.add(0.030, 0.019, report=True)
    s = times.summary()
    assert s["step_ms"] == pytest.approx(20.0) and s["scheduler_share"] == pytest.approx(0.5)
    assert s["scheduler_us"] == pytest.approx(1000.0) and s["report_ms"] == pytest.approx(19.0)


def test_single_process_collectives_are_identities():
    env = ddp.Dist(0, 0, 1, torch.device("cpu"))
    assert env.all_sum([1.0, 2.0]) == [1.0, 2.0] and env.any(True) and env.broadcast("x") == "x"
    env.close()
    assert ddp.pick_device("cpu", 0).type == "cpu"


def test_cpu_trains_in_full_precision_and_evaluates():
    precision = make_precision(torch.device("cpu"), "auto")
    assert precision.name == "off" and precision.scaler is None
    split = load_split(0)
    model = make_model(split.n_features, split.n_classes)
    ev = evaluate(model, split.x_val, split.y_val, precision, lambda v: v)
    assert ev.loss == ev.local_loss and 0.0 <= ev.acc <= 1.0
    assert model.training


def test_checkpoint_round_trip(tmp_path):
    assert checkpoint.load(tmp_path / "none.pt") is None
    model = make_model(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Sched:
        def state_dict(self):
            return {"run_id": "r", "last_epoch": 3}

    path = tmp_path / "c.pt"
    checkpoint.save(path, epoch=2, model=model, optimizer=opt, scheduler=Sched(), scaler=None,
                    extra={"run_id": "r"})
    state = checkpoint.load(path)
    assert state["epoch"] == 2 and state["scheduler"]["last_epoch"] == 3 and state["run_id"] == "r"
    assert not (tmp_path / "c.pt.tmp").exists()
    torch.save({"format": 99}, path)
    with pytest.raises(SystemExit, match="not a checkpoint"):
        checkpoint.load(path)


def test_a_torn_trace_line_is_ended_before_new_records(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"kind": "step", "st')  # a job killed mid-write
    trace = Trace(str(path), 0)
    trace.record("epoch", epoch=3)
    trace.close()
    assert path.read_text().splitlines()[1] == '{"kind": "epoch", "epoch": 3}'


def test_resume_keeps_the_checkpoints_schedule(capsys):
    import argparse

    from lrserve.trainer.run import _schedule

    args = argparse.Namespace(schedule="warmup-cosine", epochs=20, lr=0.1)
    saved = {"schedule": resolve_schedule("warmup-cosine", steps_per_epoch=10, epochs=10, lr=0.1)}
    assert _schedule(args, 10, saved, is_main=True) == saved["schedule"]
    assert "checkpoint's schedule" in capsys.readouterr().out
    args.schedule = "/no/such/file.json"
    assert _schedule(args, 10, saved, is_main=True) == saved["schedule"]


@pytest.mark.skipif(sys.platform != "linux", reason="torch's fatal-signal handler is Linux only")
@pytest.mark.parametrize("faulthandler", [True, False])
def test_a_rank_that_aborts_prints_its_native_stacks_when_faulthandler_is_on(tmp_path, faulthandler):
    """What a rank killed by std::terminate leaves to read: each thread's C++ stack (torch's
    handler, installed by ``ddp.setup``), then faulthandler's Python stacks; neither without
    faulthandler (the handler is opt-in, as faulthandler is)."""
    code = "import os\nfrom lrserve.trainer import ddp\nddp.setup('cpu')\nos.abort()\n"
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONFAULTHANDLER"}}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if faulthandler:
        env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    native = re.findall(r"^SIGABRT\(6\), PID: \d+, Thread (\d+):", proc.stderr, re.MULTILINE)
    if faulthandler:
        assert len(native) >= 1 and "abort" in proc.stderr, proc.stderr  # the main thread's, in abort()
        assert "Fatal Python error: Aborted" in proc.stderr  # faulthandler's still follows
        assert proc.stderr.index("SIGABRT(6)") < proc.stderr.index("Fatal Python error")
    else:
        assert native == [] and "Fatal Python error" not in proc.stderr, proc.stderr
