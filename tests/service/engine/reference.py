"""In-process torch, written the way a user would: the reference every parity test compares with.

It builds schedulers straight from a raw spec dict with torch's constructors, on a real
SGD optimizer, without any lrserve code, so a bug in the engine cannot hide in both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import lr_scheduler as S

# The Python lambdas a user would write for the expressions the tests use.
LAMBDAS = {
    "0.95 ** step": lambda e: 0.95**e,
    "1 / (step + 1)": lambda e: 1 / (e + 1),
    "min(1.0, (step + 1) / 10)": lambda e: min(1.0, (e + 1) / 10),
    "0.5 * (1 + cos(pi * step / 50))": lambda e: 0.5 * (1 + math.cos(math.pi * e / 50)),
    "0.99": lambda e: 0.99,
    "0.9 if step % 3 == 0 else 1.0": lambda e: 0.9 if e % 3 == 0 else 1.0,
}


def _lambda(source: str) -> Any:
    """A hand-written lambda where the test has one; else the expression (itself tested against lambdas)."""
    if source in LAMBDAS:
        return LAMBDAS[source]
    from lrserve.service.engine.expr import compile_expression

    return compile_expression(source, field="lr_lambda")


def make_optimizer(base_lrs: list[float], momentum: float = 0.9) -> torch.optim.SGD:
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": lr} for lr in base_lrs]
    return torch.optim.SGD(params, lr=base_lrs[0], momentum=momentum)


def build(spec: dict[str, Any], opt: torch.optim.Optimizer) -> Any:
    kwargs = {k: v for k, v in spec.items() if k not in ("type", "monitor")}
    kind = spec["type"]
    if kind == "SequentialLR":
        kwargs["schedulers"] = [build(c, opt) for c in spec["schedulers"]]
        return S.SequentialLR(opt, **kwargs)
    if kind == "ChainedScheduler":
        return S.ChainedScheduler([build(c, opt) for c in spec["schedulers"]], optimizer=opt)
    if kind in ("LambdaLR", "MultiplicativeLR"):
        fns = spec["lr_lambda"]
        kwargs["lr_lambda"] = [_lambda(f) for f in fns] if isinstance(fns, list) else _lambda(fns)
    return getattr(S, kind)(opt, **kwargs)


def trajectory(
    spec: dict[str, Any],
    base_lrs: list[float],
    steps: int,
    metrics: list[float | None] | None = None,
) -> list[tuple[list[float], list[float]]]:
    """Values at steps 0..steps-1 of the torch scheduler; ``metrics[k-1]`` goes with the k-th step()."""
    opt = make_optimizer(base_lrs)
    sched = build(spec, opt)
    out = [_read(opt)]
    for k in range(1, steps):
        opt.step()
        if isinstance(sched, S.ReduceLROnPlateau):
            if metrics and metrics[k - 1] is not None:
                sched.step(metrics[k - 1])
        else:
            sched.step()
        out.append(_read(opt))
    return out


def _read(opt: torch.optim.Optimizer) -> tuple[list[float], list[float]]:
    return [float(g["lr"]) for g in opt.param_groups], [float(g["momentum"]) for g in opt.param_groups]
