"""``LRSERVE_MODE=disabled``: ``RemoteScheduler`` becomes torch's own scheduler of the same spec.

For tests of training code and machines without a server: the spec (the same JSON tree
the server takes) is built into ``torch.optim.lr_scheduler`` objects in process, and no
request is ever made. The values are torch's, which by API.md's rule 3 are the server's.
What only a server does is absent: operator actions, ``should_stop`` (always False),
history (``log()`` keeps nothing), the metric barrier. Specs only lrserve understands are
refused with a ``ValueError`` that says so, rather than run differently.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from typing import Any

from lrserve.client._env import run_id_from_env

__all__ = ["LocalScheduler"]

_LRSERVE_ONLY = {
    "LRRangeTest": "a range test needs a server to choose the LR",
    "SpikeGuard": "the spike guard decides on a server",
    "LambdaLR": "its factor is an lrserve expression",
    "MultiplicativeLR": "its factor is an lrserve expression",
}
_DEFAULT_MONITOR = "val_loss"


def _build(spec: Mapping[str, Any], optimizer: Any, *, nested: bool = False) -> Any:
    from torch.optim import lr_scheduler

    kind = spec.get("type")
    if kind in _LRSERVE_ONLY:
        raise ValueError(f"LRSERVE_MODE=disabled cannot run {kind} without a server ({_LRSERVE_ONLY[kind]})")
    cls = getattr(lr_scheduler, str(kind), None)
    known = (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)
    if not isinstance(cls, type) or not issubclass(cls, known):
        raise ValueError(f"LRSERVE_MODE=disabled: unknown schedule type {kind!r}")
    kwargs = {k: v for k, v in spec.items() if k not in ("type", "monitor")}
    if cls is lr_scheduler.ReduceLROnPlateau and nested:
        raise ValueError("LRSERVE_MODE=disabled cannot run a plateau stage inside a composite "
                         "(lrserve allows it; torch does not)")
    if "schedulers" in kwargs:
        kwargs["schedulers"] = [_build(child, optimizer, nested=True) for child in kwargs["schedulers"]]
        if cls is lr_scheduler.SequentialLR:
            return cls(optimizer, **kwargs)
        return cls(kwargs["schedulers"], **{k: v for k, v in kwargs.items() if k != "schedulers"})
    return cls(optimizer, **kwargs)


class LocalScheduler:
    """What ``RemoteScheduler(...)`` returns under ``LRSERVE_MODE=disabled``: the same
    methods, torch's values, no server. Arguments only a server uses are accepted and ignored.
    It is also a ``torch.optim.lr_scheduler.LRScheduler`` (frameworks check), without
    torch's ``__init__`` (which would wrap ``optimizer.step``), as ``RemoteScheduler`` is.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> LocalScheduler:
        if cls is LocalScheduler:
            cls = _torch_flavour()
        return super().__new__(cls)

    def __init__(
        self,
        optimizer: Any,
        schedule: Mapping[str, Any],
        run_id: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        from torch.optim import lr_scheduler

        self.optimizer = optimizer
        self.schedule = dict(schedule)
        self.run_id = run_id or run_id_from_env() or "local"
        self.scheduler = _build(self.schedule, optimizer)
        self._plateau = isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau)
        self.monitor = str(self.schedule.get("monitor", _DEFAULT_MONITOR))
        self.last_epoch = 0
        self._reported: dict[str, float] = {}
        self.reports_after_step = False  # the framework callbacks set it, as on RemoteScheduler
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]

    def step(self, metrics: float | Mapping[str, float] | None = None, epoch: None = None) -> None:
        """Advance one step; a plateau schedule takes its watched metric (a number, or by name)."""
        self.last_epoch += 1
        reported, self._reported = self._reported, {}
        if not self._plateau:
            self.scheduler.step()
            return
        value = reported.get(self.monitor)
        if isinstance(metrics, Mapping):
            value = metrics.get(self.monitor, value)
        elif isinstance(metrics, numbers.Real):
            value = float(metrics)
        if value is not None:  # plateau stages count reports, not steps (as on a server)
            self.scheduler.step(value)

    def report(self, **metrics: float) -> None:
        """The watched metric feeds a plateau schedule: at the next ``step()``, or at once
        when reports come after the step that ends an epoch (``reports_after_step``, what
        frameworks do: torch's plateau then decides the next batch's LR)."""
        values = {k: float(v) for k, v in metrics.items()}
        if self.reports_after_step and self._plateau and self.monitor in values:
            self.scheduler.step(values.pop(self.monitor))
        self._reported.update(values)

    def log(self, *args: Any, **kwargs: Any) -> None:
        """Metrics for history: there is no server to keep them."""

    def get_last_lr(self) -> list[float]:
        if self._plateau:
            return [float(g["lr"]) for g in self.optimizer.param_groups]
        return [float(v) for v in self.scheduler.get_last_lr()]

    get_lr = get_last_lr

    @property
    def should_stop(self) -> bool:
        return False  # no operator can stop a run without a server

    @property
    def watched(self) -> frozenset[str]:
        return frozenset({self.monitor}) if self._plateau else frozenset()

    @property
    def status(self) -> str:
        return "active"

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "local": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self.scheduler.load_state_dict(state_dict["local"])

    def close(self, timeout: float | None = None) -> None:
        pass

    def __enter__(self) -> LocalScheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = self.schedule.get("type")
        return f"LocalScheduler(run_id={self.run_id!r}, type={kind!r}, LRSERVE_MODE=disabled)"


@functools.cache
def _torch_flavour() -> type[LocalScheduler]:
    from torch.optim.lr_scheduler import LRScheduler

    return type("LocalScheduler", (LocalScheduler, LRScheduler), {"__module__": __name__,
                                                                  "__doc__": LocalScheduler.__doc__})
