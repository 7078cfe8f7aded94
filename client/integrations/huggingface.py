"""``LRServeCallback`` for the Hugging Face ``Trainer``: plateau decisions from its evaluations.

The Trainer steps a scheduler it does not recognise as ``ReduceLROnPlateau`` after every
optimizer step and never hands it a metric. This callback does: at each evaluation during
training it reports ``eval_<metric_for_best_model>`` (the value the Trainer would pass to
torch's ``ReduceLROnPlateau``) to the ``RemoteScheduler``, so the decision sets the LR of
the next optimizer step, exactly where the Trainer's own plateau path puts it::

    sched = RemoteScheduler(opt, spec, run_id="job-1")
    trainer = Trainer(model, args, optimizers=(opt, sched), callbacks=[LRServeCallback()])

Distributed (``accelerate launch``/``torchrun``): every rank reports. The Trainer gathers
the evaluation over all ranks, so each rank holds the same metric; the run's metric barrier
(``world_size`` from ``$WORLD_SIZE``) waits for all of them and decides once, on their
mean, which is that value. Importing this module imports transformers.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # the client itself does not need transformers
    raise ImportError("client.integrations.huggingface needs transformers: pip install it") from exc

from lrserve.client.integrations._common import Steered, plateau_modes, remote_scheduler, reported_name

__all__ = ["LRServeCallback"]


class LRServeCallback(TrainerCallback):
    """Reports the Trainer's evaluation metric to the ``RemoteScheduler`` it trains with.

    Args:
        monitor: The schedule's metric name to report under; needed only when the schedule
            watches several. Default: the one it watches.

    Raises (at the start of training):
        TypeError: The Trainer's scheduler is not a ``RemoteScheduler``.
        ValueError: ``eval_strategy="no"`` (nothing would be reported), the schedule watches
            no metric, or a plateau stage's ``mode`` contradicts ``greater_is_better``.
    KeyError (at the next step): no evaluation at a step had ``eval_<metric_for_best_model>``
        (with several eval datasets, each is evaluated apart; one of them must have it).
    """

    def __init__(self, monitor: str | None = None) -> None:
        self.monitor = monitor
        self.scheduler: Steered | None = None
        self.key = "eval_loss"  # the Trainer's metric, as its own plateau path picks it
        self.name = ""  # the name the schedule watches it under
        self.reported_at: int | None = None  # the global step last reported
        self.missing: tuple[int, list[str]] | None = None  # (step, metrics) of an evaluation without it
        self.stepped = False  # a training step began since ``on_train_begin``

    def on_train_begin(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, **_: Any) -> None:
        scheduler = remote_scheduler(lr_scheduler)
        if scheduler is None:
            raise TypeError(
                "LRServeCallback needs the Trainer to train with a RemoteScheduler (Trainer("
                f"optimizers=(opt, RemoteScheduler(opt, spec, ...)))); it has {type(lr_scheduler).__name__}"
            )
        if args.eval_strategy == "no":
            raise ValueError("LRServeCallback reports evaluations: set eval_strategy to 'epoch' or 'steps'")
        metric = args.metric_for_best_model or "loss"
        self.key = metric if metric.startswith("eval_") else f"eval_{metric}"
        # the Trainer's own rule when greater_is_better is unset: losses are minimised
        greater = args.greater_is_better
        if greater is None:
            greater = not metric.endswith("loss")
        expected = "max" if greater else "min"
        wrong = sorted(set(plateau_modes(scheduler.schedule)) - {expected})
        if wrong:
            raise ValueError(
                f"the schedule's ReduceLROnPlateau mode is {wrong[0]!r} but the Trainer's "
                f"{self.key} is {'maximised' if greater else 'minimised'} (greater_is_better="
                f"{greater}): use mode {expected!r} in the spec or fix metric_for_best_model"
            )
        self.name = reported_name(scheduler, self.monitor)
        scheduler.reports_after_step = True
        self.scheduler = scheduler
        self.stepped, self.reported_at = False, None  # a train() of its own (the callback reused)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **_: Any) -> None:
        if self.scheduler is None or not self.stepped or self.reported_at == state.global_step:
            # outside training (trainer.evaluate()); before its first step (``eval_on_start``, which
            # the Trainer's own ReduceLROnPlateau is not stepped with); or this step is decided already
            return
        if metrics and self.key in metrics:
            self.scheduler.report(**{self.name: metrics[self.key]})
            self.reported_at, self.missing = state.global_step, None
        else:  # another eval dataset of the same evaluation may have it: judge at the next step
            self.missing = (state.global_step, sorted(metrics or {}))

    def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.stepped = True
        self._check_reported()

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.scheduler = None
        self._check_reported()

    def _check_reported(self) -> None:
        if self.missing is not None:
            step, names = self.missing
            self.missing = None
            raise KeyError(
                f"LRServeCallback reports {self.key!r} (metric_for_best_model), which the "
                f"evaluation at step {step} did not have: {names}"
            )
