"""``LRServeCallback`` for PyTorch Lightning: plateau decisions from its validation.

Lightning hands a scheduler its monitored metric only with ``"reduce_on_plateau": True``,
at the scheduler's own interval, and raises when the metric is missing at a step, so a
schedule stepped every batch (warm-up) that also waits on validation (plateau) has no
configuration of its own. This callback reports the monitored metric after each validation
during training, deciding the LR of the next optimizer step::

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = RemoteScheduler(opt, warmup_then_plateau, run_id="job-1")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trainer = Trainer(callbacks=[LRServeCallback()])

Schedulers configured with ``"reduce_on_plateau": True`` are left to Lightning (it passes
them the metric itself). Importing this module imports lightning.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # the client itself does not need lightning
    raise ImportError("client.integrations.lightning needs lightning (pip install lightning)") from exc

from lrserve.client.integrations._common import Steered, remote_scheduler, reported_name

__all__ = ["LRServeCallback"]


class LRServeCallback(Callback):
    """Reports the validation metric to each ``RemoteScheduler`` of the ``LightningModule``.

    Args:
        monitor: The logged metric to report (``self.log(monitor, ...)``). Default: the
            scheduler config's ``monitor``, else the name the schedule watches.

    Raises (at the start of training):
        TypeError: No scheduler of the module is a ``RemoteScheduler`` left to the callback.
        ValueError: Its schedule watches no metric (or several, and ``monitor`` is none).
    KeyError (after a validation): the monitored metric was not logged.
    """

    def __init__(self, monitor: str | None = None) -> None:
        self.monitor = monitor
        self.targets: list[tuple[Steered, str, str]] = []  # (scheduler, logged key, name)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.targets = []
        for config in trainer.lr_scheduler_configs:
            scheduler = remote_scheduler(config.scheduler)
            if scheduler is None or config.reduce_on_plateau:  # Lightning feeds those itself
                continue
            name = reported_name(scheduler, self.monitor or config.monitor)
            self.targets.append((scheduler, self.monitor or config.monitor or name, name))
            scheduler.reports_after_step = True
        if not self.targets:
            raise TypeError(
                "LRServeCallback found no RemoteScheduler to report to: return one from "
                "configure_optimizers (with \"reduce_on_plateau\": True Lightning reports itself)"
            )

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # the sanity check, trainer.validate(): no training step to decide
        for scheduler, key, name in self.targets:
            value = trainer.callback_metrics.get(key)
            if value is None:
                raise KeyError(
                    f"LRServeCallback reports {key!r}, which validation did not log; logged: "
                    f"{sorted(trainer.callback_metrics)}"
                )
            scheduler.report(**{name: float(value)})

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.targets = []
