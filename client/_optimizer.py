"""``OptimizerWriter``: the one place that writes a scheduler's values into an optimizer.

It writes LRs and momentums into ``param_groups`` (tensor LRs in place, as torch's
``fused``/``capturable`` optimizers need), hooks the optimizer so a value still on its way is
written before the optimizer next reads it, and says where lrserve cannot give torch's
values on an optimizer (a group added, another scheduler on it) with a clear error.
``RemoteScheduler.step()``'s fast path writes float LRs itself (the same loop, inlined).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "OptimizerWriter",
    "base_momentums",
    "check_not_composed",
    "check_optimizer",
    "driver_of",
    "innermost_optimizer",
    "is_tensor",
]

_NO_ATTRS: Mapping[str, Any] = {}
#: The scheduler driving each optimizer (torch composes schedulers sharing one; lrserve can't).
_DRIVERS: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


class OptimizerWriter:
    """Writes values into ``optimizer.param_groups``; holds the optimizer hooks it registered.

    Args:
        optimizer: Anything with a non-empty ``param_groups`` list (a torch optimizer).

    Raises:
        TypeError: ``optimizer`` has no param groups.
    """

    def __init__(self, optimizer: Any) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not groups:
            raise TypeError(f"{type(optimizer).__name__} is not an optimizer: it has no param_groups")
        self.optimizer = optimizer
        self.n_groups = len(groups)  # an lrserve run serves a fixed number of groups
        self.hooks: list[Any] = []  # handles of the hooks registered by hook()

    def base_lrs(self) -> list[float]:
        """Each group's ``initial_lr``, else ``lr``, noting it as ``initial_lr`` (as torch does)."""
        groups = self.optimizer.param_groups
        lrs = [float(g.get("initial_lr", g["lr"])) for g in groups]
        for group in groups:
            lr = group["lr"]
            group.setdefault("initial_lr", lr.clone() if hasattr(lr, "clone") else lr)
        return lrs

    def base_momentums(self) -> list[float] | None:
        """Each group's ``initial_momentum``, else its momentum (``momentum`` or ``betas[0]``),
        noting it as ``initial_momentum``. A momentum-cycling schedule moves the momentum, and
        a checkpoint's optimizer state, loaded before the scheduler is built, holds the moved
        one: the run's spec would differ from the one it joins. (torch keeps ``initial_lr``
        for the LR the same way; it needs none for the momentum, which its cycling schedulers
        take from their own arguments.)"""
        groups = self.optimizer.param_groups
        moms = base_momentums(groups)
        if moms is None:
            return None
        initial = [float(g.get("initial_momentum", m)) for g, m in zip(groups, moms, strict=True)]
        for group, mom in zip(groups, moms, strict=True):
            group.setdefault("initial_momentum", mom)
        return initial

    def write(self, row: Sequence[float], moms: Sequence[float] | None) -> None:
        """Write a step's LRs (and momentums, when it sets them) into every group."""
        groups = self.optimizer.param_groups
        if len(groups) != len(row):
            raise self.groups_changed()
        for group, lr in zip(groups, row, strict=False):
            current = group["lr"]
            if is_tensor(current):
                current.fill_(lr)
            else:
                group["lr"] = lr
        if moms is not None:
            self.write_momentums(moms)

    def write_momentums(self, moms: Sequence[float]) -> None:
        for group, m in zip(self.optimizer.param_groups, moms, strict=False):
            if "betas" in group:
                group["betas"] = (m, *tuple(group["betas"])[1:])
            else:
                group["momentum"] = m

    def has_tensor_lrs(self) -> bool:
        """Whether a group's LR is a tensor (written in place by ``write()``, not the fast path)."""
        for group in self.optimizer.param_groups:  # a loop, no generator: run at every report
            lr = group["lr"]
            if type(lr) is not float and is_tensor(lr):
                return True
        return False

    def check_groups(self) -> None:
        if len(self.optimizer.param_groups) != self.n_groups:
            raise self.groups_changed()

    def groups_changed(self) -> ValueError:
        return ValueError(
            f"the optimizer has {len(self.optimizer.param_groups)} param groups, it had "
            f"{self.n_groups} when this RemoteScheduler was built (optimizer.add_param_group()): "
            f"an lrserve run serves a fixed number of groups, so torch's handling of a new group "
            f"cannot be matched; build the optimizer with all its groups, or a new "
            f"RemoteScheduler (new run_id) after adding them"
        )

    def hook(self, before_reads: Callable[..., None]) -> bool:
        """Call ``before_reads`` before the optimizer next steps or saves its state.

        The hooks go on the innermost torch optimizer (wrappers such as accelerate's share
        its ``param_groups`` and call its ``step``). Returns ``False`` where torch does not
        hook ``step``: there is no such guarantee there.
        """
        opt = innermost_optimizer(self.optimizer)
        if not getattr(getattr(type(opt), "step", None), "hooked", False):
            return False
        try:
            for register in (opt.register_step_pre_hook, opt.register_state_dict_pre_hook):
                self.hooks.append(register(before_reads))
        except (AttributeError, TypeError):  # not a torch optimizer after all: undo what took
            self.unhook()
            return False
        return True

    def unhook(self) -> None:
        unhook(self.hooks)


def unhook(hooks: list[Any]) -> None:
    """Remove the hooks (a writer's ``hooks``; also run by a dropped scheduler's finalizer)."""
    for handle in hooks:
        handle.remove()
    hooks.clear()


def register_driver(optimizer: Any, scheduler: Any) -> None:
    """Note that ``scheduler`` steps ``optimizer`` (until it is closed or collected); the one
    that stepped it before is superseded (``check_optimizer`` let it: the LRs are its base)."""
    previous = driver_of(optimizer)
    if previous is not None and previous is not scheduler:
        previous._supersede()
    try:
        _DRIVERS[optimizer] = weakref.ref(scheduler)
    except TypeError:  # not weakly referenceable: not a torch optimizer, nothing to compose with
        pass


def release_driver(optimizer: Any, scheduler: Any) -> None:
    """``scheduler`` no longer steps ``optimizer`` (it was closed)."""
    if driver_of(optimizer) is scheduler:
        del _DRIVERS[optimizer]


def driver_of(optimizer: Any) -> Any:
    """The live scheduler that steps ``optimizer``, or ``None``."""
    try:
        ref = _DRIVERS.get(optimizer)
    except TypeError:  # not hashable: not a torch optimizer
        return None
    return ref() if ref is not None else None


def check_optimizer(optimizer: Any, schedule: Mapping[str, Any]) -> None:
    """Refuse, as torch does or where lrserve cannot give torch's values, before any run is made.

    Raises:
        ValueError: ``cycle_momentum`` on an optimizer without momentum (torch's own error);
            another scheduler moved this optimizer's LRs from their base (torch's chainable
            forms would continue from its LR, or compose with it). One that left them at
            their base is superseded instead (``register_driver``): a notebook cell run
            again, a scheduler built to load a checkpoint into.
    """
    if base_momentums(optimizer.param_groups) is None and _cycles_momentum(schedule):
        raise ValueError(
            "optimizer must support momentum or beta1 with `cycle_momentum` option enabled "
            "(torch's words; or set cycle_momentum: false)"
        )
    other = driver_of(optimizer)
    if other is not None and _moved(optimizer.param_groups):
        raise ValueError(
            f"another RemoteScheduler (run {other.run_id!r}) moved this optimizer's LRs from their "
            f"initial_lr: a torch scheduler built now would continue from the LR it left (its "
            f"chainable forms), or compose with it if both step (each scaling the LR the other "
            f"wrote); lrserve serves one schedule per optimizer, from its base LRs. Put both in one "
            f'spec ({{"type": "ChainedScheduler", "schedulers": [...]}}, or "SequentialLR" for a '
            f"hand-over), or close() the other and reset the LRs first"
        )
    check_not_composed(optimizer)


def check_not_composed(optimizer: Any) -> None:
    """A torch scheduler steps (or stepped) this optimizer: torch would compose it with this
    one, or continue from the LR it left (its chainable forms); lrserve does neither."""
    # torch marks the wrapper it puts on optimizer.step; read from the function's __dict__
    # (a bound method's attributes are its function's), as a failed getattr() costs an
    # AttributeError each time: this runs at every report and window
    step = getattr(optimizer, "step", None)
    if getattr(getattr(step, "__func__", step), "__dict__", _NO_ATTRS).get("_wrapped_by_lr_sched", False):
        raise ValueError(
            "a torch.optim.lr_scheduler scheduler was built on this optimizer: torch would "
            "compose the two (each scaling the LR the other wrote) or continue from the LR it "
            "left; lrserve serves one schedule per optimizer, from its base LRs. Put both in "
            'one spec ({"type": "ChainedScheduler", "schedulers": [...]}, or "SequentialLR" '
            "for a warm-up), on a fresh optimizer"
        )


def _moved(groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a group's LR is not its ``initial_lr`` (a scheduler scaled it)."""
    return any("initial_lr" in g and float(g["lr"]) != float(g["initial_lr"]) for g in groups)


def _cycles_momentum(spec: Any) -> bool:
    """Whether a CyclicLR/OneCycleLR in the spec cycles momentum (torch's default: it does)."""
    if not isinstance(spec, Mapping):
        return False
    if spec.get("type") in ("CyclicLR", "OneCycleLR") and spec.get("cycle_momentum", True):
        return True
    children = [*(spec.get("schedulers") or []), spec.get("then")]
    return any(_cycles_momentum(child) for child in children)


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer under wrappers that share its ``param_groups`` (accelerate, Lightning)."""
    while True:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        shares_groups = getattr(inner, "param_groups", None) is optimizer.param_groups
        if inner is None or inner is optimizer or not shares_groups:
            return optimizer
        optimizer = inner


def is_tensor(value: Any) -> bool:
    return not isinstance(value, (float, int)) and hasattr(value, "fill_")


def base_momentums(groups: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """Each group's ``momentum`` or ``betas[0]``; ``None`` unless every group has one."""
    moms = []
    for group in groups:
        if "betas" in group:
            moms.append(float(group["betas"][0]))
        elif "momentum" in group:
            moms.append(float(group["momentum"]))
        else:
            return None
    return moms
