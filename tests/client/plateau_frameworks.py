"""Training loops of ``test_frameworks_plateau.py``, shared with the two-process job it
launches (``python plateau_frameworks.py OUT URL RUN_ID`` under ``accelerate launch``).

A tiny regression net on random targets: its validation loss soon stops improving, so the
plateau stages do cut the LR within a few epochs.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.specs import plateau, warmup_then

BATCH = 4
EPOCH = 8  # optimizer steps per epoch (per rank: BATCH * EPOCH samples each)
EPOCHS = 6
STEPS = EPOCH * EPOCHS
BASE_LR = 0.05
PLATEAU = plateau(threshold=0.2)
MILESTONE = 12  # mid-epoch: the plateau stage first hears the evaluation at step 16
WARMUP_THEN_PLATEAU = warmup_then(PLATEAU, steps=MILESTONE)


def torch_plateau(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """``PLATEAU`` as torch's own scheduler, for the frameworks' own plateau path."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.2)


def dataset(n: int, seed: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=gen), torch.randn(n, 1, generator=gen))


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def record_lrs(opt: torch.optim.Optimizer) -> list[float]:
    """The LR each ``optimizer.step()`` applies (a pre-step hook registered after the scheduler's).

    ``lrs[i]`` is then the LR of the scheduler's step ``i``; the loops append the LR left
    after training (the last evaluation's decision) as ``lrs[STEPS]``.
    """
    lrs: list[float] = []
    opt.register_step_pre_hook(lambda *_: lrs.append(float(opt.param_groups[0]["lr"])))
    return lrs


# -- Hugging Face Trainer ------------------------------------------------------------------------


class HFModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}


def _collate(rows: list[Any]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}


def hf_train(out_dir: Path, make_scheduler: Callable[[torch.optim.Optimizer], Any], callbacks: list[Any],
             world_size: int = 1, **overrides: Any) -> tuple[torch.nn.Module, list[float], dict[int, float]]:
    """Train with the Trainer's evaluation every epoch; the LRs applied and ``{step: eval_loss}``.

    ``overrides`` replace ``TrainingArguments`` (and ``eval_dataset``, the Trainer's)."""
    eval_dataset = overrides.pop("eval_dataset", None) or dataset(32, 4)
    import transformers

    model = HFModel()
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9)
    sched = make_scheduler(opt)
    lrs = record_lrs(opt)
    args = transformers.TrainingArguments(**{
        "output_dir": str(out_dir),
        "num_train_epochs": EPOCHS,
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": 16,
        "eval_strategy": "epoch",
        "metric_for_best_model": "loss",
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        **overrides,
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation chatter
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=dataset(BATCH * EPOCH * world_size, 3),
            eval_dataset=eval_dataset, data_collator=_collate, optimizers=(opt, sched), callbacks=callbacks,
        )
        trainer.train()
    lrs.append(float(opt.param_groups[0]["lr"]))
    key = f"eval_{args.metric_for_best_model}"
    evals = {int(e["step"]): float(e[key]) for e in trainer.state.log_history if key in e}
    return model.net, lrs, evals


# -- PyTorch Lightning ---------------------------------------------------------------------------


def lightning_fit(out_dir: Path, make_config: Callable[[torch.optim.Optimizer], dict[str, Any]],
                  callbacks: list[Any]) -> tuple[torch.nn.Module, list[float], dict[int, float]]:
    """Fit with validation every epoch (Lightning's defaults, sanity check included)."""
    import lightning.pytorch as pl

    recorded: list[tuple[torch.optim.Optimizer, list[float]]] = []
    evals: dict[int, float] = {}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("val_loss", loss)
            if not self.trainer.sanity_checking:
                evals[self.trainer.global_step] = float(loss)

        def configure_optimizers(self) -> dict[str, Any]:
            opt = torch.optim.SGD(self.parameters(), lr=BASE_LR, momentum=0.9)
            config = make_config(opt)
            recorded.append((opt, record_lrs(opt)))
            return {"optimizer": opt, "lr_scheduler": config}

    module = Module()
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=callbacks,
    )
    train = torch.utils.data.DataLoader(dataset(BATCH * EPOCH, 3), batch_size=BATCH)
    val = torch.utils.data.DataLoader(dataset(32, 4), batch_size=32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")  # its advice about workers etc.
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(module, train, val)
    opt, lrs = recorded[-1]
    lrs.append(float(opt.param_groups[0]["lr"]))
    return module.net, lrs, evals


def _job(out: Path, url: str, run_id: str) -> None:
    """One rank of the two-process run: warm-up then plateau through the Trainer and the callback."""
    import torch.distributed as dist
    from lrserve.client import RemoteScheduler
    from lrserve.client.integrations.huggingface import LRServeCallback

    made: list[RemoteScheduler] = []

    def remote(opt: torch.optim.Optimizer) -> RemoteScheduler:
        made.append(RemoteScheduler(opt, WARMUP_THEN_PLATEAU, run_id=run_id, url=url))
        return made[0]

    model, lrs, evals = hf_train(out / "hf", remote, [LRServeCallback()], world_size=2)
    made[0].close()
    rank = dist.get_rank()
    weights = [p.detach().flatten().tolist() for p in model.parameters()]
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": made[0].world_size, "lrs": lrs, "evals": evals, "weights": weights}))
    # Torch asks for this before exit: a gloo group left to the interpreter's teardown aborted
    # rank 1 once ("terminate called without an active exception", SIGABRT) after training.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _job(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
