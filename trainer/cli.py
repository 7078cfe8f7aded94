"""``python -m lrserve.trainer``: the command line. Every option is documented in ``--help``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from lrserve.trainer.schedules import describe_examples

__all__ = ["build_parser", "main"]

EPILOG = """\
Two ranks on the CPU (gloo), every rank on the same run:
  torchrun --standalone --nproc_per_node=2 -m lrserve.trainer --url http://127.0.0.1:8000 \\
      --run-id digits-1 --schedule warmup-plateau --epochs 10 --checkpoint ckpt.pt
On a GPU machine the same command uses NCCL and mixed precision.
An operator's stop (lrserve control RUN stop) ends the job at the next epoch end, on every
rank together, after the checkpoint is saved. The last line rank 0 prints is a summary:
final val accuracy, mean step time (step_ms), the share of step time spent in
scheduler.step() (scheduler_share), the mean plain scheduler.step() (scheduler_us) and the
mean epoch-end step that reports the metric (report_ms: a request, maybe a barrier wait).
With an LR range test (--schedule range-test, or a JSON LRRangeTest spec) every step reports
the training loss until the run switches to its `then` schedule; the weights of before the
test are restored then, rank 0 prints the lr-finder's suggestions, and the summary adds
chosen_lr and switched_at.
With --spike-guard the schedule is wrapped in a SpikeGuard: every rank logs its batch loss
at every step, a spike on any rank backs the LR off on every rank from the same step, and
every rank rolls back to its newest in-memory snapshot at or before the spike event's
last_good_step. --inject-spike 150:1:50 (or 150:1:nan) spoils rank 1's loss of step 150 to
try it; the summary adds spikes, rollbacks and applied_at.
"""


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m lrserve.trainer",
        description="Reference trainer: an MLP on scikit-learn's digits, its LR schedule served by "
        "lrserve through RemoteScheduler. Runs plainly or under torchrun (DDP).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server = p.add_argument_group("server")
    server.add_argument("--url", default=env("LRSERVE_URL", "http://127.0.0.1:8000"),
                        help="lrserve base URL (env LRSERVE_URL; default http://127.0.0.1:8000)")
    server.add_argument("--token", default=env("LRSERVE_TOKEN"),
                        help="bearer token with the write role (env LRSERVE_TOKEN)")
    server.add_argument("--run-id", default=env("LRSERVE_RUN_ID"),
                        help="run id shared by every rank (env LRSERVE_RUN_ID; default: the "
                        "checkpoint's, else one rank 0 makes up and broadcasts)")
    server.add_argument("--schedule", default="warmup-plateau",
                        help="a JSON spec file or a named example (default warmup-plateau). "
                        f"Examples, sized in epochs: {describe_examples()}")
    server.add_argument("--step-per", choices=["batch", "epoch"], default="batch",
                        help="call scheduler.step() after every batch (default) or once per "
                        "epoch; either way the val metric goes with the epoch's last step")
    server.add_argument("--metric-mode", choices=["barrier", "allreduce"], default="barrier",
                        help="barrier (default): each rank reports its own val loss and the "
                        "server's metric barrier decides on their mean; allreduce: ranks "
                        "all_reduce a global val loss and report that (run world_size 1)")
    server.add_argument("--world-size", type=int, default=_env_int("WORLD_SIZE", 1),
                        help="number of ranks; read from torchrun's WORLD_SIZE (default 1 "
                        "when run plainly); given, it must match")

    guard = p.add_argument_group("spike guard")
    guard.add_argument("--spike-guard", nargs="?", const="{}", default=None, metavar="JSON",
                       help="wrap the schedule in a SpikeGuard (the server's defaults; a JSON object "
                       "overrides some, e.g. '{\"max_spikes\": 0}') and roll back on a spike")
    guard.add_argument("--inject-spike", action="append", default=[], metavar="STEP:RANK:FACTOR",
                       help="multiply RANK's loss of the batch reported with STEP by FACTOR before "
                       "the backward pass, or make it NaN (FACTOR 'nan'); repeatable")
    guard.add_argument("--snapshot-every", type=int, default=10, metavar="STEPS",
                       help="keep an in-memory rollback snapshot every STEPS steps (default 10)")

    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10, help="epochs to train in total (default 10)")
    train.add_argument("--batch-size", type=int, default=32, help="batch size per rank (default 32)")
    train.add_argument("--lr", type=float, default=0.1, help="base learning rate (default 0.1)")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the split, weights and data order (default 0)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="auto (default): CUDA when present, else the CPU")
    train.add_argument("--threads", type=int, default=None,
                       help="CPU threads per rank (default: torch's own; torchrun sets 1); this "
                       "small model trains fastest on 1")
    train.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                       help="mixed precision on CUDA: auto (default) = bf16 where supported, else "
                       "fp16 with a GradScaler; always off on the CPU")

    files = p.add_argument_group("files and output")
    files.add_argument("--checkpoint", metavar="PATH",
                       help="save model, optimizer and scheduler after every epoch; resume from "
                       "PATH when it exists (the resumed run replays identical values)")
    files.add_argument("--trace", metavar="PATH",
                       help="write per-rank JSON lines (the LR and momentum applied at every "
                       "step, per-epoch metrics); '{rank}' in PATH is replaced by the rank, "
                       "else '.RANK' is added for ranks above 0")
    files.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="tqdm progress bar on rank 0 (default on)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise SystemExit("trainer: --epochs and --batch-size must be at least 1, --lr above 0")
    if (args.spike_guard is not None or args.inject_spike) and args.step_per != "batch":
        raise SystemExit("trainer: --spike-guard and --inject-spike need --step-per batch (a loss per step)")
    if args.snapshot_every < 1:
        raise SystemExit("trainer: --snapshot-every must be at least 1")
    from lrserve.trainer.run import run

    run(args)
    return 0
