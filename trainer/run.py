"""The whole job: set up (ranks, data, model, served schedule), resume, train, summarise.

Every rank runs this. They share one run id, so the server hands all of them the same
values at every step; they leave the loop together (a stop is agreed by all_reduce at
epoch ends, because a rank that left alone would hang the others in DDP's all_reduce).
An ``LRRangeTest`` schedule adds the per-step loss reports and the restore at the switch
(``trainer.range_test``).
"""

from __future__ import annotations

import argparse
import json
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from lrserve.client import ClientState, RemoteScheduler
from lrserve.trainer import checkpoint, ddp
from lrserve.trainer.data import load_split, train_loader, val_shard
from lrserve.trainer.loop import EpochContext, Evaluation, Precision, evaluate, make_precision, train_epoch
from lrserve.trainer.model import make_model
from lrserve.trainer.range_test import (
    RangeTest,
    allreduce_mean,
    finder_line,
    read_finder,
    weights_fingerprint,
)
from lrserve.trainer.schedules import resolve_schedule
from lrserve.trainer.spike import SpikeHandler, guard_schedule, parse_injection
from lrserve.trainer.trace import Trace
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

__all__ = ["run"]


def run(args: argparse.Namespace) -> None:
    env = ddp.setup(args.device)
    try:
        _run(args, env)  # the DDP wrapper is gone when it returns: close() can free the group
    except BaseException:
        # the traceback keeps _run's frames, the DDP wrapper among them, so this close() leaves
        # the group alive (gloo's threads too): freed, its destructor would wait for any
        # collective in flight, which a failed peer may never join
        env.close(clean=False)
        raise
    env.close()


def _run(args: argparse.Namespace, env: ddp.Dist) -> None:
    job = _setup(args, env)
    with job.scheduler:
        done = _resume(job)
        trained = _epochs(job, done)
        summary = _summary(job, trained)
    if env.is_main:
        print("summary " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)


@dataclass
class Job:
    """One rank's job as set up: its data, model, optimizer and the served schedule's client."""

    args: argparse.Namespace
    env: ddp.Dist
    loader: Any
    x_val: torch.Tensor
    y_val: torch.Tensor
    steps_per_epoch: int
    saved: dict[str, Any] | None  # the checkpoint resumed from
    schedule: dict[str, Any]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    test: RangeTest
    guard: SpikeHandler
    scheduler: RemoteScheduler

    @property
    def barrier(self) -> bool:
        """Each rank reports its own metrics and the server's barrier averages them."""
        return self.args.metric_mode == "barrier"

    def validate(self) -> Evaluation:
        return evaluate(self.model, self.x_val, self.y_val, self.precision, self.env.all_sum)

    def report(self, ev: Evaluation) -> dict[str, float]:
        """The metrics this rank sends with the epoch's last step."""
        return ({"val_loss": ev.local_loss, "val_acc": ev.local_acc} if self.barrier
                else {"val_loss": ev.loss, "val_acc": ev.acc})


@dataclass
class Trained:
    """What the epochs left: how far they got, why they ended, the last evaluation."""

    epoch: int
    stopped: bool
    evaluation: Evaluation | None
    times: dict[str, float]
    finder: dict[str, Any] | None  # the range test's answer, read at the switch (rank 0)


def _setup(args: argparse.Namespace, env: ddp.Dist) -> Job:
    """Seeds, this rank's data, the checkpoint (if resuming), the schedule, model and client."""
    if args.world_size != env.world_size:
        raise SystemExit(
            f"trainer: --world-size {args.world_size}, but torchrun started {env.world_size} ranks"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cuda = env.device.type == "cuda"
    split = load_split(args.seed)
    loader = train_loader(split, args.batch_size, env.rank, env.world_size, args.seed, pin_memory=cuda)
    x_val, y_val = (t.pin_memory() if cuda else t for t in val_shard(split, env.rank, env.world_size))
    x_val, y_val = x_val.to(env.device, non_blocking=True), y_val.to(env.device, non_blocking=True)
    steps_per_epoch = len(loader) if args.step_per == "batch" else 1

    saved = checkpoint.load(args.checkpoint) if args.checkpoint else None
    if saved is not None and saved["steps_per_epoch"] != steps_per_epoch:
        raise SystemExit(
            f"trainer: {args.checkpoint} was taken at {saved['steps_per_epoch']} scheduler steps per "
            f"epoch, this job has {steps_per_epoch} (batch size, ranks or --step-per changed)"
        )
    run_id = args.run_id or (saved["run_id"] if saved else None)
    if run_id is None:
        run_id = env.broadcast(f"digits-{uuid.uuid4().hex[:12]}")
    schedule = _schedule(args, steps_per_epoch, saved, env.is_main)
    model = make_model(split.n_features, split.n_classes, seed=args.seed).to(env.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    precision = make_precision(env.device, args.amp)
    barrier = args.metric_mode == "barrier"
    test = RangeTest(schedule, model, optimizer, scaler=precision.scaler,
                     mean=float if barrier else allreduce_mean(env.all_sum, env.world_size))
    guard = SpikeHandler(model, optimizer, env.rank, enabled=schedule.get("type") == "SpikeGuard",
                         injections=[parse_injection(t) for t in args.inject_spike],
                         monitor=str(schedule.get("monitor", "loss")), snapshot_every=args.snapshot_every)
    scheduler = RemoteScheduler(
        optimizer, schedule, run_id=run_id, url=args.url, token=args.token,
        steps_per_epoch=steps_per_epoch, rank=env.rank, world_size=env.world_size if barrier else 1,
        labels={"trainer": "digits", "metric_mode": args.metric_mode},
        on_schedule_switch=test.on_switch if test.enabled else None,
        on_spike=guard.on_spike if guard.enabled else None,
    )
    return Job(args, env, loader, x_val, y_val, steps_per_epoch, saved, schedule, model, optimizer,
               precision, test, guard, scheduler)


def _resume(job: Job) -> int:
    """Load the checkpoint's states (model, optimizer, range test, scheduler, scaler); the
    epochs it had done (0 on a fresh start)."""
    saved = job.saved
    if saved is not None:
        job.model.load_state_dict(saved["model"])
        job.optimizer.load_state_dict(saved["optimizer"])
    job.test.start(saved)
    if saved is None:
        return 0
    job.scheduler.load_state_dict(saved["scheduler"])
    if job.precision.scaler is not None and saved.get("scaler"):
        job.precision.scaler.load_state_dict(saved["scaler"])
    return int(saved["epoch"])


def _epochs(job: Job, done: int) -> Trained:
    """Train from epoch ``done`` until ``--epochs`` or a stop every rank agrees on, tracing each
    step, checkpointing (rank 0) and printing each epoch."""
    args, env, model, optimizer, scheduler, test, guard = (
        job.args, job.env, job.model, job.optimizer, job.scheduler, job.test, job.guard)
    net: torch.nn.Module = model
    if env.enabled:
        cuda = env.device.type == "cuda"
        net = DistributedDataParallel(model, device_ids=[env.device.index] if cuda else None)
    trace = Trace(args.trace, env.rank)
    trace.step(scheduler.last_epoch, done, optimizer)
    batches = len(job.loader) * max(0, args.epochs - done)
    bar = tqdm(total=batches, disable=not (env.is_main and args.progress and batches),
               unit="step", desc=scheduler.run_id, leave=False)
    finder: dict[str, Any] | None = None

    def on_step(step: int, epoch: int) -> None:
        nonlocal finder
        trace.step(step, epoch, optimizer, away=scheduler.state is ClientState.AWAY)
        if test.just_switched():  # this step ended the range test; the weights are restored
            trace.record("switch", step=test.switched_at, epoch=epoch,
                         lrs=[float(g["lr"]) for g in optimizer.param_groups],
                         weights=weights_fingerprint(model))
            if env.is_main:
                finder = read_finder(args.url, args.token, scheduler.run_id)
                bar.write(finder_line(finder) if finder else f"range test over at step {step}")

    def after_step(loss: torch.Tensor, step: int) -> None:
        guard.after_step(scheduler, loss, step)
        for event, rollback in guard.take_new():  # on_spike ran in this step's scheduler.step()
            trace.record("spike", step=step, event=event, rollback=rollback,
                         weights=weights_fingerprint(model))
            if env.is_main:
                bar.write(f"loss spike on rank {event['rank']} at step {event['step']}: backed off "
                          f"from step {event['applied_at']}, rolled back to step {rollback}")

    ctx = EpochContext(net, optimizer, scheduler, job.loader, job.precision, args.step_per,
                       on_step=on_step, on_batch=lambda: bar.update(1),
                       step_metrics=test.step_metrics, shape_loss=guard.shape_loss,
                       after_step=after_step)
    stopped = env.any(scheduler.should_stop)
    evaluation: Evaluation | None = None
    epoch = done
    while epoch < args.epochs and not stopped:
        train_loss, evaluation = train_epoch(ctx, epoch, job.validate, job.report)
        epoch += 1
        trace.record("epoch", epoch=epoch, step=scheduler.last_epoch, train_loss=train_loss,
                     reported=job.report(evaluation), val_loss=evaluation.loss, val_acc=evaluation.acc)
        if args.checkpoint and env.is_main:
            checkpoint.save(args.checkpoint, epoch=epoch, model=model, optimizer=optimizer,
                            scheduler=scheduler, scaler=job.precision.scaler,
                            extra={"run_id": scheduler.run_id, "schedule": job.schedule,
                                   "steps_per_epoch": job.steps_per_epoch, **test.checkpoint_extra()})
        if env.is_main:
            bar.write(f"epoch {epoch}/{args.epochs}  lr {optimizer.param_groups[0]['lr']:.4g}  "
                      f"train_loss {train_loss:.4f}  val_loss {evaluation.loss:.4f}  "
                      f"val_acc {evaluation.acc:.4f}")
        stopped = env.any(scheduler.should_stop)
    bar.close()
    trace.close()
    return Trained(epoch, stopped, evaluation, ctx.times.summary(), finder)


def _summary(job: Job, trained: Trained) -> dict[str, Any]:
    """The job's one-line summary (rank 0 prints it): how far, how well, how fast, what happened."""
    args, env, scheduler = job.args, job.env, job.scheduler
    evaluation = trained.evaluation
    if evaluation is None:  # nothing left to train (resumed at the end, or stopped)
        evaluation = job.validate()
    summary: dict[str, Any] = {
        "run_id": scheduler.run_id, "epochs": trained.epoch, "steps": scheduler.last_epoch,
        "val_acc": round(evaluation.acc, 4), "val_loss": round(evaluation.loss, 4),
        **{k: round(v, 4) for k, v in trained.times.items()},
        "stopped": trained.stopped, "device": env.device.type, "amp": job.precision.name,
        "world_size": env.world_size, "metric_mode": args.metric_mode,
    }
    if job.test.enabled:
        summary.update(_range_test_summary(args, scheduler.run_id, job.test, trained.finder, env.is_main))
    if job.guard.enabled:
        guard = job.guard
        guard.flush_losses(scheduler)
        summary.update(spikes=len(guard.events),
                       applied_at=",".join(str(e["applied_at"]) for e in guard.events) or "-",
                       rollbacks=",".join(str(s) for s in guard.rollbacks) or "-")
    return summary


def _range_test_summary(args: argparse.Namespace, run_id: str, test: RangeTest,
                        finder: dict[str, Any] | None, is_main: bool) -> dict[str, Any]:
    """``chosen_lr`` and ``switched_at`` for rank 0's summary (read now if not at the switch)."""
    if not is_main:
        return {}
    if test.running:
        print("trainer: the range test was still running when training ended; give it more "
              "--epochs or fewer num_steps", flush=True)
    if finder is None:  # resumed after the switch, or the test never ended
        finder = read_finder(args.url, args.token, run_id)
    finder = finder or {}
    return {"chosen_lr": finder.get("chosen"), "switched_at": finder.get("switched_at")}


def _schedule(args: argparse.Namespace, steps_per_epoch: int, saved: dict[str, Any] | None,
              is_main: bool) -> dict[str, Any]:
    """``--schedule`` sized to this job; on resume the checkpoint's (the run exists with it)."""
    def resolve() -> dict[str, Any]:
        spec = resolve_schedule(args.schedule, steps_per_epoch=steps_per_epoch, epochs=args.epochs,
                                lr=args.lr)
        if getattr(args, "spike_guard", None) is None:
            return spec
        try:
            settings = json.loads(args.spike_guard)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"trainer: --spike-guard: not a JSON object: {exc}") from None
        if not isinstance(settings, dict):
            raise SystemExit("trainer: --spike-guard: expected a JSON object, e.g. '{\"max_spikes\": 0}'")
        return guard_schedule(spec, settings)

    if saved is None:
        return resolve()
    try:
        asked = resolve()
    except SystemExit:
        asked = None  # e.g. the JSON file is gone: the checkpoint has the spec
    if asked is not None and asked != saved["schedule"] and is_main:
        print(f"trainer: resuming with the checkpoint's schedule; --schedule {args.schedule!r} "
              "differs (e.g. through --epochs) and would conflict with the run", flush=True)
    return saved["schedule"]
