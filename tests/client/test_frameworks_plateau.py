"""Plateau decisions from the Hugging Face Trainer's and Lightning's own loops.

Each framework trains a tiny model with an evaluation every epoch against a real server
(uvicorn, SQLite). Plain plateau through lrserve must apply the same LRs and end on the
same weights, bit for bit, as the framework's own path with torch's ``ReduceLROnPlateau``;
warm-up then plateau must apply the LRs of an in-process torch reference fed the same
evaluations; the run's history must show the reductions at the steps those evaluations
imply. The two-process run (``accelerate launch``, gloo on CPU) checks the barrier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from lrserve.client import RemoteScheduler

from tests.client import plateau_frameworks as job
from tests.live_server import ServerProcess, free_port
from tests.trainer.harness import warmup_plateau_reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plateau-server")
    with ServerProcess(f"sqlite:///{tmp}/frameworks.db", tmp) as proc:
        yield proc


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def reductions(url: str, run_id: str) -> list[int]:
    history = httpx.get(f"{url}/v1/runs/{run_id}/history", timeout=30).json()
    return sorted(e["step"] for e in history["events"] if e["kind"] == "plateau_reduction")


def drops(lrs: list[float]) -> list[int]:
    """Steps whose LR is below the one before: ``lrs[i]`` is the LR of step ``i``."""
    return [k for k in range(1, len(lrs)) if lrs[k] < lrs[k - 1]]


def reference(evals: dict[int, float]) -> list[float]:
    """Warm-up then plateau in torch by hand, hearing each evaluation with its step: the
    LRs of steps ``0..STEPS`` (as ``job.record_lrs`` and the loops record them)."""
    return warmup_plateau_reference(job.WARMUP_THEN_PLATEAU, job.BASE_LR, job.STEPS, evals, {})


# -- Hugging Face Trainer ---------------------------------------------------------------------------


def hf_remote(server, run_id, spec, made):
    def make(opt):
        made.append(RemoteScheduler(opt, spec, run_id=run_id, url=server.url))
        return made[-1]

    return make


def test_hf_plain_plateau_matches_the_trainers_own_reduce_lr_on_plateau(server, tmp_path):
    from lrserve.client.integrations.huggingface import LRServeCallback

    local, local_lrs, evals = job.hf_train(tmp_path / "torch", job.torch_plateau, [])
    assert sorted(evals) == [job.EPOCH * e for e in range(1, job.EPOCHS + 1)]
    assert len(set(local_lrs)) >= 3  # the Trainer's own path did cut the LR twice or more

    made = []
    served, lrs, served_evals = job.hf_train(
        tmp_path / "lrserve", hf_remote(server, "hf-plain", job.PLATEAU, made), [LRServeCallback()])
    made[0].close()
    assert lrs == local_lrs
    assert served_evals == evals
    assert same_weights(served, local)
    # the i-th optimizer step applied the LR of step i-1: a cut at step k shows from lrs[k]
    assert reductions(server.url, "hf-plain") == drops(lrs)
    assert set(drops(lrs)) <= set(evals)


def test_hf_eval_on_start_is_not_reported_as_the_trainers_own_path_does_not_step_with_it(server, tmp_path):
    """``eval_on_start=True``: an evaluation before the first step, which the Trainer does not
    step its own ReduceLROnPlateau with (``skip_scheduler``); reported, it was one report too
    many and every cut came an epoch early."""
    from lrserve.client.integrations.huggingface import LRServeCallback

    local, local_lrs, evals = job.hf_train(tmp_path / "torch", job.torch_plateau, [], eval_on_start=True)
    assert 0 in evals and len(set(local_lrs)) >= 3
    made = []
    served, lrs, served_evals = job.hf_train(
        tmp_path / "lrserve", hf_remote(server, "hf-eval-on-start", job.PLATEAU, made), [LRServeCallback()],
        eval_on_start=True)
    made[0].close()
    assert served_evals == evals
    assert lrs == local_lrs
    assert same_weights(served, local)


def test_hf_several_eval_datasets_report_the_one_metric_for_best_model(server, tmp_path):
    """Each eval dataset is evaluated apart (one on_evaluate each); the Trainer's own path
    steps its plateau with ``eval_<metric_for_best_model>`` of the merged metrics."""
    from lrserve.client.integrations.huggingface import LRServeCallback

    evals = {"a": job.dataset(16, 5), "b": job.dataset(32, 4)}
    local, local_lrs, _ = job.hf_train(tmp_path / "torch", job.torch_plateau, [],
                                       eval_dataset=evals, metric_for_best_model="b_loss")
    assert len(set(local_lrs)) >= 3
    made = []
    served, lrs, _ = job.hf_train(tmp_path / "lrserve", hf_remote(server, "hf-two-sets", job.PLATEAU, made),
                                  [LRServeCallback()], eval_dataset=evals, metric_for_best_model="b_loss")
    made[0].close()
    assert lrs == local_lrs
    assert same_weights(served, local)


def test_hf_warmup_then_plateau_matches_torch_by_hand(server, tmp_path):
    from lrserve.client.integrations.huggingface import LRServeCallback

    made = []
    _, lrs, evals = job.hf_train(
        tmp_path, hf_remote(server, "hf-warm", job.WARMUP_THEN_PLATEAU, made), [LRServeCallback()])
    made[0].close()
    expected = reference(evals)
    assert lrs == expected
    assert len(set(expected[job.MILESTONE:])) >= 3  # the plateau stage did cut the LR
    assert reductions(server.url, "hf-warm") == [k for k in drops(expected) if k > job.MILESTONE]


@pytest.mark.parametrize(("spec", "overrides", "error", "message"), [
    ({**job.PLATEAU, "mode": "max"}, {}, ValueError, "mode is 'max'.*eval_loss is minimised"),
    (job.PLATEAU, {"metric_for_best_model": "accuracy"}, ValueError, "mode is 'min'.*maximised"),
    (job.PLATEAU, {"eval_strategy": "no", "metric_for_best_model": None}, ValueError, "set eval_strategy"),
    (job.PLATEAU, {"metric_for_best_model": "accuracy", "greater_is_better": False}, KeyError,
     "'eval_accuracy'.*\\['eval_loss'"),  # the Trainer's own check comes first, as clear
    ({"type": "StepLR", "step_size": 3}, {}, ValueError, "watches no metric"),
])
def test_hf_callback_misconfigured_says_what_to_fix(server, tmp_path, spec, overrides, error, message):
    from lrserve.client.integrations.huggingface import LRServeCallback

    made = []
    with pytest.raises(error, match=message):
        job.hf_train(tmp_path, hf_remote(server, None, spec, made), [LRServeCallback()], **overrides)
    made[0].close()


def test_hf_callback_raises_when_no_evaluation_of_a_step_had_the_metric(server, tmp_path):
    """The Trainer checks metric_for_best_model itself when it is set; when it is not, the
    callback's key is eval_loss, which an evaluation without labels lacks."""
    import transformers
    from lrserve.client.integrations.huggingface import LRServeCallback

    args = transformers.TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", use_cpu=True,
                                          report_to=[])
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback = LRServeCallback()
    with RemoteScheduler(torch.optim.SGD(job.net().parameters(), lr=0.1), job.PLATEAU, run_id="hf-no-loss",
                         url=server.url) as sched:
        callback.on_train_begin(args, state, control, lr_scheduler=sched)
        callback.on_step_begin(args, state, control)  # training began
        state.global_step = 8
        callback.on_evaluate(args, state, control, metrics={"eval_a_loss": 1.0})  # eval set "a"
        callback.on_evaluate(args, state, control, metrics={"eval_b_acc": 0.5})  # eval set "b"
        with pytest.raises(KeyError, match="'eval_loss'.*at step 8 did not have: \\['eval_b_acc'\\]"):
            callback.on_step_begin(args, state, control)
    assert httpx.get(f"{server.url}/v1/runs/hf-no-loss/history", timeout=30).json()["metrics"] == {}


def test_hf_callback_reused_for_another_train_reports_its_evaluations(server, tmp_path):
    """The step last reported was kept from one ``train()`` to the next: a second training with
    the same callback skipped its evaluation at that step as decided already."""
    import transformers
    from lrserve.client.integrations.huggingface import LRServeCallback

    args = transformers.TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", use_cpu=True,
                                          report_to=[])
    callback = LRServeCallback()
    reported: list[tuple[str, dict]] = []
    for run_id in ("hf-reused-1", "hf-reused-2"):
        state, control = transformers.TrainerState(), transformers.TrainerControl()
        with RemoteScheduler(torch.optim.SGD(job.net().parameters(), lr=0.1), job.PLATEAU, run_id=run_id,
                             url=server.url) as sched:
            sched.report = lambda run_id=run_id, **values: reported.append((run_id, values))  # type: ignore[method-assign]
            callback.on_train_begin(args, state, control, lr_scheduler=sched)
            callback.on_step_begin(args, state, control)
            state.global_step = 8
            callback.on_evaluate(args, state, control, metrics={"eval_loss": 1.0})
            callback.on_train_end(args, state, control)
    assert reported == [("hf-reused-1", {"val_loss": 1.0}), ("hf-reused-2", {"val_loss": 1.0})]


def test_hf_callback_needs_a_remote_scheduler(tmp_path):
    from lrserve.client.integrations.huggingface import LRServeCallback

    with pytest.raises(TypeError, match="RemoteScheduler.*it has ReduceLROnPlateau"):
        job.hf_train(tmp_path, job.torch_plateau, [LRServeCallback()])


# -- PyTorch Lightning --------------------------------------------------------------------------


def test_lightning_plain_plateau_by_epoch_matches_its_own_reduce_lr_on_plateau(server, tmp_path):
    from lrserve.client.integrations.lightning import LRServeCallback

    local, local_lrs, evals = job.lightning_fit(
        tmp_path, lambda opt: {"scheduler": job.torch_plateau(opt), "monitor": "val_loss"}, [])
    assert sorted(evals) == [job.EPOCH * e for e in range(1, job.EPOCHS + 1)]
    assert len(set(local_lrs)) >= 3

    made = []

    def remote(run_id, **config):
        def make(opt):
            made.append(RemoteScheduler(opt, job.PLATEAU, run_id=run_id, url=server.url))
            return {"scheduler": made[-1], **config}

        return make

    # through the callback, at Lightning's default interval ("epoch")
    served, lrs, _ = job.lightning_fit(tmp_path, remote("pl-epoch"), [LRServeCallback()])
    assert lrs == local_lrs
    assert same_weights(served, local)
    # and through Lightning's own plateau path, which hands the metric to step() itself
    own, own_lrs, _ = job.lightning_fit(
        tmp_path, remote("pl-own", monitor="val_loss", reduce_on_plateau=True), [])
    assert own_lrs == local_lrs
    assert same_weights(own, local)
    for sched in made:
        sched.close()
    # one scheduler step per epoch: the cut decided with epoch e's validation is step e's
    by_epoch = [k // job.EPOCH for k in drops(local_lrs)]
    assert reductions(server.url, "pl-epoch") == by_epoch
    assert reductions(server.url, "pl-own") == by_epoch


def test_lightning_warmup_by_step_then_plateau_matches_torch_by_hand(server, tmp_path):
    from lrserve.client.integrations.lightning import LRServeCallback

    made = []

    def remote(opt):
        made.append(RemoteScheduler(opt, job.WARMUP_THEN_PLATEAU, run_id="pl-warm", url=server.url))
        return {"scheduler": made[-1], "interval": "step"}

    _, lrs, evals = job.lightning_fit(tmp_path, remote, [LRServeCallback()])
    made[0].close()
    assert sorted(evals) == [job.EPOCH * e for e in range(1, job.EPOCHS + 1)]
    expected = reference(evals)
    assert lrs == expected
    assert len(set(expected[job.MILESTONE:])) >= 3
    assert reductions(server.url, "pl-warm") == [k for k in drops(expected) if k > job.MILESTONE]


def test_lightning_callback_names_a_metric_validation_did_not_log(server, tmp_path):
    from lrserve.client.integrations.lightning import LRServeCallback

    made = []

    def remote(opt):
        made.append(RemoteScheduler(opt, job.PLATEAU, url=server.url))
        return {"scheduler": made[-1]}

    with pytest.raises(KeyError, match="'val_acc', which validation did not log; logged: \\['val_loss'\\]"):
        job.lightning_fit(tmp_path, remote, [LRServeCallback(monitor="val_acc")])
    made[0].close()


# -- two processes ------------------------------------------------------------------------------


@pytest.mark.slow  # two processes under accelerate launch, each importing torch and transformers
def test_two_ranks_under_accelerate_launch_share_every_lr_and_decide_once(server, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(Path(job.__file__)), str(tmp_path), server.url, "hf-ddp"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]  # the run's barrier waits for both
    assert ranks[0]["lrs"] == ranks[1]["lrs"]
    assert len(ranks[0]["lrs"]) == job.STEPS + 1
    assert ranks[0]["weights"] == ranks[1]["weights"]
    evals = {int(k): v for k, v in ranks[0]["evals"].items()}
    assert evals == {int(k): v for k, v in ranks[1]["evals"].items()}  # the Trainer gathers them
    expected = reference(evals)
    assert ranks[0]["lrs"] == expected
    assert len(set(expected[job.MILESTONE:])) >= 3
    history = httpx.get(f"{server.url}/v1/runs/hf-ddp/history", timeout=30).json()
    # each evaluation: both ranks reported at its step, and the server decided once
    watched = history["metrics"]["val_loss"]
    reports = sorted(zip(watched["steps"], watched["ranks"], strict=True))
    assert reports == [(k, r) for k in sorted(evals) for r in (0, 1)]
    assert reductions(server.url, "hf-ddp") == [k for k in drops(expected) if k > job.MILESTONE]
