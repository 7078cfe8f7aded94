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
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from client import RemoteScheduler
from trainer import checkpoint, ddp
from trainer.data import load_split, train_loader, val_shard
from trainer.loop import EpochContext, Evaluation, evaluate, make_precision, train_epoch
from trainer.model import make_model
from trainer.range_test import RangeTest, allreduce_mean, finder_line, read_finder, weights_fingerprint
from trainer.schedules import resolve_schedule
from trainer.spike import SpikeHandler, guard_schedule, parse_injection
from trainer.trace import Trace

__all__ = ["run"]


def run(args: argparse.Namespace) -> None:
    env = ddp.setup(args.device)
    try:
        _run(args, env)
    finally:
        env.close()


def _run(args: argparse.Namespace, env: ddp.Dist) -> None:
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
    with scheduler:
        done = 0
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        test.start(saved)
        if saved is not None:
            scheduler.load_state_dict(saved["scheduler"])
            if precision.scaler is not None and saved.get("scaler"):
                precision.scaler.load_state_dict(saved["scaler"])
            done = int(saved["epoch"])
        net: torch.nn.Module = model
        if env.enabled:
            net = DistributedDataParallel(model, device_ids=[env.device.index] if cuda else None)
        trace = Trace(args.trace, env.rank)
        trace.step(scheduler.last_epoch, done, optimizer)
        batches = len(loader) * max(0, args.epochs - done)
        bar = tqdm(total=batches, disable=not (env.is_main and args.progress and batches),
                   unit="step", desc=run_id, leave=False)

        def validate() -> Evaluation:
            return evaluate(model, x_val, y_val, precision, env.all_sum)

        def report(ev: Evaluation) -> dict[str, float]:
            return ({"val_loss": ev.local_loss, "val_acc": ev.local_acc} if barrier
                    else {"val_loss": ev.loss, "val_acc": ev.acc})

        finder: dict[str, Any] | None = None

        def on_step(step: int, epoch: int) -> None:
            nonlocal finder
            trace.step(step, epoch, optimizer)
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

        ctx = EpochContext(net, optimizer, scheduler, loader, precision, args.step_per,
                           on_step=on_step, on_batch=lambda: bar.update(1),
                           step_metrics=test.step_metrics, shape_loss=guard.shape_loss,
                           after_step=after_step)
        stopped = env.any(scheduler.should_stop)
        evaluation: Evaluation | None = None
        epoch = done
        while epoch < args.epochs and not stopped:
            train_loss, evaluation = train_epoch(ctx, epoch, validate, report)
            epoch += 1
            trace.record("epoch", epoch=epoch, step=scheduler.last_epoch, train_loss=train_loss,
                         reported=report(evaluation), val_loss=evaluation.loss, val_acc=evaluation.acc)
            if args.checkpoint and env.is_main:
                checkpoint.save(args.checkpoint, epoch=epoch, model=model, optimizer=optimizer,
                                scheduler=scheduler, scaler=precision.scaler,
                                extra={"run_id": scheduler.run_id, "schedule": schedule,
                                       "steps_per_epoch": steps_per_epoch, **test.checkpoint_extra()})
            if env.is_main:
                bar.write(f"epoch {epoch}/{args.epochs}  lr {optimizer.param_groups[0]['lr']:.4g}  "
                          f"train_loss {train_loss:.4f}  val_loss {evaluation.loss:.4f}  "
                          f"val_acc {evaluation.acc:.4f}")
            stopped = env.any(scheduler.should_stop)
        bar.close()
        trace.close()
        if evaluation is None:  # nothing left to train (resumed at the end, or stopped)
            evaluation = validate()
        summary: dict[str, Any] = {
            "run_id": scheduler.run_id, "epochs": epoch, "steps": scheduler.last_epoch,
            "val_acc": round(evaluation.acc, 4), "val_loss": round(evaluation.loss, 4),
            **{k: round(v, 4) for k, v in ctx.times.summary().items()},
            "stopped": stopped, "device": env.device.type, "amp": precision.name,
            "world_size": env.world_size, "metric_mode": args.metric_mode,
        }
        if test.enabled:
            summary.update(_range_test_summary(args, scheduler.run_id, test, finder, env.is_main))
        if guard.enabled:
            guard.flush_losses(scheduler)
            summary.update(spikes=len(guard.events),
                           applied_at=",".join(str(e["applied_at"]) for e in guard.events) or "-",
                           rollbacks=",".join(str(s) for s in guard.rollbacks) or "-")
    if env.is_main:
        print("summary " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)


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
