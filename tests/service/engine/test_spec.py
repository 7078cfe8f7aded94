from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lrserve.service.engine import spec as spec_module
from lrserve.service.engine.expr import Expression
from lrserve.service.engine.spec import (
    MAX_DEPTH,
    SPEC_TYPES,
    ScheduleSpec,
    StepLRSpec,
    cycles_momentum,
    iter_nodes,
    parse_schedule,
    spec_to_json,
    watched_metrics,
)
from lrserve.service.errors import SpecError
from torch.optim import lr_scheduler as torch_schedulers

from tests.service.engine.strategies import SAFE_STEPS, valid_specs

TORCH_CLASSES = sorted(set(torch_schedulers.__all__) - {"LRScheduler"})
WARMUP = {"type": "LinearLR", "start_factor": 0.1, "total_iters": 5}
PLATEAU = {"type": "ReduceLROnPlateau", "monitor": "val_acc", "mode": "max"}

# Valid specs for a run with two param groups; every torch class appears at least once.
VALID = [
    pytest.param({"type": "LambdaLR", "lr_lambda": "0.95 ** step"}, id="lambda"),
    pytest.param(
        {"type": "LambdaLR", "lr_lambda": ["0.95 ** step", "1 / (step + 1)"]}, id="lambda-per-group"
    ),
    pytest.param(
        {"type": "MultiplicativeLR", "lr_lambda": "0.9 if step % 3 == 0 else 1.0"},
        id="multiplicative",
    ),
    pytest.param({"type": "StepLR", "step_size": 3}, id="step"),
    pytest.param({"type": "MultiStepLR", "milestones": [2, 5, 9], "gamma": 0.5}, id="multistep"),
    pytest.param({"type": "ConstantLR"}, id="constant-defaults"),
    pytest.param({"type": "ConstantLR", "factor": 1, "total_iters": 1}, id="constant-int-factor"),
    pytest.param(
        {"type": "LinearLR", "start_factor": 0.5, "end_factor": 0.0, "total_iters": 4}, id="linear"
    ),
    pytest.param({"type": "ExponentialLR", "gamma": 0.9}, id="exponential"),
    pytest.param(
        {
            "type": "SequentialLR",
            "schedulers": [WARMUP, {"type": "ExponentialLR", "gamma": 0.9}],
            "milestones": [5],
        },
        id="sequential",
    ),
    pytest.param({"type": "CosineAnnealingLR", "T_max": 10, "eta_min": 1e-4}, id="cosine"),
    pytest.param(
        {
            "type": "ChainedScheduler",
            "schedulers": [
                {"type": "ConstantLR", "factor": 0.5, "total_iters": 2},
                {"type": "ExponentialLR", "gamma": 0.9},
            ],
        },
        id="chained",
    ),
    pytest.param(
        {
            "type": "ChainedScheduler",
            "schedulers": [
                {
                    "type": "SequentialLR",
                    "schedulers": [WARMUP, {"type": "StepLR", "step_size": 2}],
                    "milestones": [5],
                },
                {
                    "type": "ChainedScheduler",
                    "schedulers": [{"type": "ExponentialLR", "gamma": 0.99}],
                },
            ],
        },
        id="chained-nested",
    ),
    pytest.param({"type": "ReduceLROnPlateau"}, id="plateau"),
    pytest.param(
        {
            "type": "ReduceLROnPlateau",
            "mode": "max",
            "min_lr": [0.0, 1e-5],
            "monitor": "acc",
            "threshold_mode": "abs",
            "threshold": 2.0,
        },
        id="plateau-per-group",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4}, id="cyclic"
    ),
    pytest.param(
        {
            "type": "CyclicLR",
            "base_lr": [0.01, 0.02],
            "max_lr": [0.1, 0.2],
            "mode": "exp_range",
            "gamma": 0.99,
            "step_size_down": 2,
            "base_momentum": [0.8, 0.7],
            "max_momentum": 0.9,
        },
        id="cyclic-per-group",
    ),
    pytest.param(
        {"type": "CosineAnnealingWarmRestarts", "T_0": 3, "T_mult": 2}, id="cosine-warm-restarts"
    ),
    pytest.param({"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 100}, id="one-cycle"),
    pytest.param(
        {
            "type": "OneCycleLR",
            "max_lr": [0.1, 0.2],
            "epochs": 5,
            "steps_per_epoch": 20,
            "three_phase": True,
            "anneal_strategy": "linear",
            "cycle_momentum": False,
        },
        id="one-cycle-epochs",
    ),
    pytest.param({"type": "PolynomialLR", "total_iters": 8, "power": 2.0}, id="polynomial"),
]

# (raw spec, expected field of the first error); the run has two param groups.
INVALID = [
    pytest.param(5, "schedule", id="not-an-object"),
    pytest.param({"step_size": 3}, "schedule.type", id="type-missing"),
    pytest.param({"type": "StepLRR", "step_size": 3}, "schedule.type", id="type-unknown"),
    pytest.param({"type": "LRScheduler"}, "schedule.type", id="type-base-class"),
    pytest.param({"type": 3}, "schedule.type", id="type-not-a-string"),
    pytest.param(
        {"type": "StepLR", "step_size": 3, "bogus": 1}, "schedule.bogus", id="unknown-key"
    ),
    pytest.param(
        {"type": "StepLR", "step_size": 3, "last_epoch": 5}, "schedule.last_epoch", id="last-epoch"
    ),
    pytest.param(
        {"type": "StepLR", "step_size": 3, "optimizer": "sgd"}, "schedule.optimizer", id="optimizer"
    ),
    pytest.param({"type": "StepLR"}, "schedule.step_size", id="step-size-missing"),
    pytest.param({"type": "StepLR", "step_size": 0}, "schedule.step_size", id="step-size-zero"),
    pytest.param({"type": "StepLR", "step_size": "5"}, "schedule.step_size", id="step-size-string"),
    pytest.param({"type": "StepLR", "step_size": 5.0}, "schedule.step_size", id="step-size-float"),
    pytest.param({"type": "StepLR", "step_size": True}, "schedule.step_size", id="step-size-bool"),
    pytest.param(
        {"type": "StepLR", "step_size": 10**13}, "schedule.step_size", id="step-size-huge"
    ),
    pytest.param({"type": "StepLR", "step_size": 3, "gamma": 0}, "schedule.gamma", id="gamma-zero"),
    pytest.param(
        {"type": "StepLR", "step_size": 3, "gamma": -0.5}, "schedule.gamma", id="gamma-negative"
    ),
    pytest.param(
        {"type": "StepLR", "step_size": 3, "gamma": math.nan}, "schedule.gamma", id="gamma-nan"
    ),
    pytest.param(
        {"type": "ExponentialLR", "gamma": math.inf}, "schedule.gamma", id="gamma-infinity"
    ),
    pytest.param({"type": "ExponentialLR", "gamma": "0.9"}, "schedule.gamma", id="gamma-string"),
    pytest.param({"type": "ExponentialLR"}, "schedule.gamma", id="exponential-gamma-missing"),
    pytest.param(
        {"type": "MultiStepLR", "milestones": []}, "schedule.milestones", id="milestones-empty"
    ),
    pytest.param(
        {"type": "MultiStepLR", "milestones": [30, 10]},
        "schedule.milestones",
        id="milestones-decreasing",
    ),
    pytest.param(
        {"type": "MultiStepLR", "milestones": [3, 3]},
        "schedule.milestones",
        id="milestones-repeated",
    ),
    pytest.param(
        {"type": "MultiStepLR", "milestones": [0, 3]}, "schedule.milestones", id="milestone-zero"
    ),
    pytest.param(
        {"type": "MultiStepLR", "milestones": [3, 10**13]},
        "schedule.milestones.1",
        id="milestone-huge",
    ),
    pytest.param(
        {"type": "MultiStepLR", "milestones": [1.5]}, "schedule.milestones.0", id="milestone-float"
    ),
    pytest.param(
        {"type": "MultiStepLR", "milestones": list(range(1, 10_002))},
        "schedule.milestones",
        id="milestones-too-many",
    ),
    pytest.param({"type": "ConstantLR", "factor": 0}, "schedule.factor", id="constant-factor-zero"),
    pytest.param(
        {"type": "ConstantLR", "factor": 1.5}, "schedule.factor", id="constant-factor-above-one"
    ),
    pytest.param(
        {"type": "ConstantLR", "total_iters": 0},
        "schedule.total_iters",
        id="constant-total-iters-zero",
    ),
    pytest.param(
        {"type": "ConstantLR", "total_iters": 2.0},
        "schedule.total_iters",
        id="constant-total-iters-float",
    ),
    pytest.param(
        {"type": "LinearLR", "start_factor": 0}, "schedule.start_factor", id="linear-start-zero"
    ),
    pytest.param(
        {"type": "LinearLR", "start_factor": 1.1},
        "schedule.start_factor",
        id="linear-start-above-one",
    ),
    pytest.param(
        {"type": "LinearLR", "end_factor": -0.1}, "schedule.end_factor", id="linear-end-negative"
    ),
    pytest.param(
        {"type": "LinearLR", "end_factor": 2}, "schedule.end_factor", id="linear-end-above-one"
    ),
    pytest.param(
        {"type": "LinearLR", "total_iters": 0}, "schedule.total_iters", id="linear-total-iters-zero"
    ),
    pytest.param(
        {"type": "CosineAnnealingLR", "T_max": 0}, "schedule.T_max", id="cosine-t-max-zero"
    ),
    pytest.param(
        {"type": "CosineAnnealingLR", "T_max": 2.5}, "schedule.T_max", id="cosine-t-max-float"
    ),
    pytest.param(
        {"type": "CosineAnnealingLR", "T_max": 5, "eta_min": -1e-3},
        "schedule.eta_min",
        id="cosine-eta-min-negative",
    ),
    pytest.param(
        {"type": "CosineAnnealingWarmRestarts", "T_0": 0},
        "schedule.T_0",
        id="warm-restarts-t0-zero",
    ),
    pytest.param(
        {"type": "CosineAnnealingWarmRestarts", "T_0": 5, "T_mult": 0},
        "schedule.T_mult",
        id="warm-restarts-t-mult-zero",
    ),
    pytest.param(
        {"type": "CosineAnnealingWarmRestarts", "T_0": 5, "T_mult": 1.5},
        "schedule.T_mult",
        id="warm-restarts-t-mult-float",
    ),
    pytest.param(
        {"type": "PolynomialLR", "total_iters": 0},
        "schedule.total_iters",
        id="polynomial-total-zero",
    ),
    pytest.param(
        {"type": "PolynomialLR", "power": -1.0}, "schedule.power", id="polynomial-power-negative"
    ),
    pytest.param({"type": "CyclicLR", "max_lr": 0.1}, "schedule.base_lr", id="cyclic-base-missing"),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "scale_fn": "lambda x: 1"},
        "schedule.scale_fn",
        id="cyclic-scale-fn",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "mode": "sawtooth"},
        "schedule.mode",
        id="cyclic-mode-unknown",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 0},
        "schedule.step_size_up",
        id="cyclic-step-up-zero",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "step_size_down": 0},
        "schedule.step_size_down",
        id="cyclic-step-down-zero",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "scale_mode": "epoch"},
        "schedule.scale_mode",
        id="cyclic-scale-mode-unknown",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "cycle_momentum": 1},
        "schedule.cycle_momentum",
        id="cyclic-cycle-momentum-int",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": [0.01, 0.02, 0.03], "max_lr": 0.1},
        "schedule.base_lr",
        id="cyclic-base-too-many-groups",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": [0.01], "max_lr": 0.1},
        "schedule.base_lr",
        id="cyclic-base-too-few-groups",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": [0.1, "x"]},
        "schedule.max_lr.1",
        id="cyclic-max-item-string",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": [0.1, math.nan]},
        "schedule.max_lr.1",
        id="cyclic-max-item-nan",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": []},
        "schedule.max_lr",
        id="cyclic-max-empty",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": "0.1"},
        "schedule.max_lr",
        id="cyclic-max-string",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": -0.01, "max_lr": 0.1},
        "schedule.base_lr",
        id="cyclic-base-negative",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": [0.01, 0.3], "max_lr": 0.1},
        "schedule.max_lr",
        id="cyclic-base-above-max",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "base_momentum": 0.95},
        "schedule.max_momentum",
        id="cyclic-momentum-inverted",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "max_momentum": [0.9, -0.5]},
        "schedule.max_momentum.1",
        id="cyclic-momentum-negative",
    ),
    pytest.param(
        {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "mode": "exp_range", "gamma": 1.5},
        "schedule.gamma",
        id="cyclic-exp-range-growing",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1}, "schedule.total_steps", id="one-cycle-no-length"
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "epochs": 3},
        "schedule.steps_per_epoch",
        id="one-cycle-epochs-only",
    ),
    pytest.param(
        {
            "type": "OneCycleLR",
            "max_lr": 0.1,
            "total_steps": 100,
            "epochs": 3,
            "steps_per_epoch": 10,
        },
        "schedule.total_steps",
        id="one-cycle-length-contradicts",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 0},
        "schedule.total_steps",
        id="one-cycle-total-zero",
    ),
    pytest.param({"type": "OneCycleLR"}, "schedule.max_lr", id="one-cycle-max-lr-missing"),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.0, "total_steps": 100},
        "schedule.max_lr",
        id="one-cycle-max-lr-zero",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "pct_start": 1.0},
        "schedule.pct_start",
        id="one-cycle-pct-one",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "pct_start": 0},
        "schedule.pct_start",
        id="one-cycle-pct-zero",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 10, "pct_start": 0.1},
        "schedule.pct_start",
        id="one-cycle-warmup-divides-by-zero",
    ),
    pytest.param(
        {
            "type": "OneCycleLR",
            "max_lr": 0.1,
            "total_steps": 100,
            "pct_start": 0.6,
            "three_phase": True,
        },
        "schedule.pct_start",
        id="one-cycle-three-phase-overlap",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "anneal_strategy": "exp"},
        "schedule.anneal_strategy",
        id="one-cycle-anneal-unknown",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "div_factor": 0},
        "schedule.div_factor",
        id="one-cycle-div-zero",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "final_div_factor": -1},
        "schedule.final_div_factor",
        id="one-cycle-final-div-negative",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "three_phase": "yes"},
        "schedule.three_phase",
        id="one-cycle-three-phase-string",
    ),
    pytest.param(
        {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 100, "base_momentum": [0.8]},
        "schedule.base_momentum",
        id="one-cycle-momentum-groups",
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "factor": 1.0}, "schedule.factor", id="plateau-factor-one"
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "factor": 0}, "schedule.factor", id="plateau-factor-zero"
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "mode": "lowest"}, "schedule.mode", id="plateau-mode-unknown"
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "patience": -1},
        "schedule.patience",
        id="plateau-patience-negative",
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "threshold": -0.1},
        "schedule.threshold",
        id="plateau-threshold-negative",
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "threshold": 1.0},
        "schedule.threshold",
        id="plateau-threshold-rel-min-one",
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "threshold_mode": "pct"},
        "schedule.threshold_mode",
        id="plateau-threshold-mode-unknown",
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "cooldown": -1},
        "schedule.cooldown",
        id="plateau-cooldown-negative",
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "min_lr": -1e-3},
        "schedule.min_lr",
        id="plateau-min-lr-negative",
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "min_lr": [0.0]},
        "schedule.min_lr",
        id="plateau-min-lr-groups",
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "eps": -1.0}, "schedule.eps", id="plateau-eps-negative"
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "monitor": ""}, "schedule.monitor", id="plateau-monitor-empty"
    ),
    pytest.param(
        {"type": "ReduceLROnPlateau", "monitor": "m" * 65},
        "schedule.monitor",
        id="plateau-monitor-long",
    ),
    pytest.param({"type": "LambdaLR"}, "schedule.lr_lambda", id="lambda-missing"),
    pytest.param({"type": "LambdaLR", "lr_lambda": 0.95}, "schedule.lr_lambda", id="lambda-number"),
    pytest.param(
        {"type": "LambdaLR", "lr_lambda": "step.real"}, "schedule.lr_lambda", id="lambda-attribute"
    ),
    pytest.param(
        {"type": "LambdaLR", "lr_lambda": ["0.9", "__import__('os')"]},
        "schedule.lr_lambda.1",
        id="lambda-import",
    ),
    pytest.param(
        {"type": "LambdaLR", "lr_lambda": ["0.9", "0.9", "0.9"]},
        "schedule.lr_lambda",
        id="lambda-too-many-groups",
    ),
    pytest.param(
        {"type": "MultiplicativeLR", "lr_lambda": "1 / (step - 5)"},
        "schedule.lr_lambda",
        id="multiplicative-divides-by-zero",
    ),
    pytest.param(
        {
            "type": "SequentialLR",
            "schedulers": [WARMUP, {"type": "StepLR", "step_size": 3}],
            "milestones": [],
        },
        "schedule.milestones",
        id="sequential-milestones-count",
    ),
    pytest.param(
        {
            "type": "SequentialLR",
            "schedulers": [WARMUP, {"type": "StepLR", "step_size": 3}],
            "milestones": [0],
        },
        "schedule.milestones",
        id="sequential-milestone-zero",
    ),
    pytest.param(
        {"type": "SequentialLR", "schedulers": [WARMUP, WARMUP, WARMUP], "milestones": [5, 5]},
        "schedule.milestones",
        id="sequential-milestones-repeated",
    ),
    pytest.param(
        {"type": "SequentialLR", "schedulers": [], "milestones": []},
        "schedule.schedulers",
        id="sequential-empty",
    ),
    pytest.param(
        {"type": "SequentialLR", "schedulers": [WARMUP]},
        "schedule.milestones",
        id="sequential-milestones-missing",
    ),
    pytest.param(
        {
            "type": "SequentialLR",
            "schedulers": [WARMUP, {"type": "CosineAnnealingLR", "T_max": 2.5}],
            "milestones": [5],
        },
        "schedule.schedulers.1.T_max",
        id="sequential-child-field",
    ),
    pytest.param(
        {"type": "SequentialLR", "schedulers": [WARMUP, {"type": "Nope"}], "milestones": [5]},
        "schedule.schedulers.1.type",
        id="sequential-child-type",
    ),
    pytest.param(
        {"type": "SequentialLR", "schedulers": [WARMUP, "StepLR"], "milestones": [5]},
        "schedule.schedulers.1",
        id="sequential-child-not-object",
    ),
    pytest.param(
        {
            "type": "SequentialLR",
            "milestones": [5],
            "schedulers": [
                WARMUP,
                {"type": "SequentialLR", "schedulers": [WARMUP], "milestones": []},
            ],
        },
        "schedule.schedulers.1",
        id="sequential-nested-sequential",
    ),
    pytest.param(
        {
            "type": "SequentialLR",
            "milestones": [5],
            "schedulers": [{"type": "ChainedScheduler", "schedulers": [WARMUP]}, WARMUP],
        },
        "schedule.schedulers.0",
        id="sequential-chained-stage",
    ),
    pytest.param(
        {"type": "SequentialLR", "schedulers": "StepLR", "milestones": []},
        "schedule.schedulers",
        id="sequential-schedulers-not-list",
    ),
    pytest.param(
        {"type": "ChainedScheduler", "schedulers": []}, "schedule.schedulers", id="chained-empty"
    ),
    pytest.param(
        {"type": "ChainedScheduler", "schedulers": [WARMUP] * 33},
        "schedule.schedulers",
        id="chained-too-many",
    ),
    pytest.param(
        {"type": "ChainedScheduler", "schedulers": [WARMUP, PLATEAU]},
        "schedule.schedulers.1",
        id="chained-plateau",
    ),
    pytest.param(
        {
            "type": "ChainedScheduler",
            "schedulers": [WARMUP, {"type": "StepLR", "step_size": 3, "gamma": -1}],
        },
        "schedule.schedulers.1.gamma",
        id="chained-child-field",
    ),
]


def make_optimizer(n_groups: int = 2) -> torch.optim.SGD:
    groups = [{"params": [torch.zeros(0)], "lr": 0.1 / (i + 1)} for i in range(n_groups)]
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def build_torch(spec: Any, optimizer: torch.optim.Optimizer) -> Any:
    """The torch scheduler a spec stands for, children built recursively (no plateau stages)."""
    if spec.type == "SequentialLR":
        children = [build_torch(child, optimizer) for child in spec.schedulers]
        return torch_schedulers.SequentialLR(optimizer, children, **spec.torch_kwargs())
    if spec.type == "ChainedScheduler":
        children = [build_torch(child, optimizer) for child in spec.schedulers]
        return torch_schedulers.ChainedScheduler(
            children, optimizer=optimizer, **spec.torch_kwargs()
        )
    return getattr(torch_schedulers, spec.type)(optimizer, **spec.torch_kwargs())


def step_torch(spec: Any, steps: int, n_groups: int = 2) -> list[list[float]]:
    optimizer = make_optimizer(n_groups)
    scheduler = build_torch(spec, optimizer)
    lrs = [list(scheduler.get_last_lr())]
    for k in range(steps):
        optimizer.step()
        if spec.type == "ReduceLROnPlateau":
            scheduler.step(1.0 / (k + 1))
        else:
            scheduler.step()
        lrs.append([float(lr) for lr in scheduler.get_last_lr()])
    return lrs


def first_error(raw: Any, n_groups: int = 2, field: str = "schedule") -> tuple[str, str]:
    with pytest.raises(SpecError) as info:
        parse_schedule(raw, n_groups=n_groups, field=field)
    assert info.value.errors, "a SpecError must list its field errors"
    return info.value.errors[0].field, info.value.errors[0].message


@pytest.mark.parametrize("raw", VALID)
def test_valid_spec_builds_and_steps_the_torch_scheduler(raw):
    spec = parse_schedule(raw, n_groups=2)
    lrs = step_torch(spec, 25)
    assert all(math.isfinite(lr) for row in lrs for lr in row)


@pytest.mark.parametrize("raw", VALID)
def test_spec_to_json_round_trips(raw):
    spec = parse_schedule(raw, n_groups=2)
    canonical = spec_to_json(spec)
    assert json.loads(json.dumps(canonical, allow_nan=False)) == canonical
    assert parse_schedule(canonical, n_groups=2) == spec
    assert spec_to_json(parse_schedule(canonical, n_groups=2)) == canonical


def test_every_torch_class_has_a_model_and_a_valid_example():
    examples = {p.values[0]["type"] for p in VALID}
    assert set(TORCH_CLASSES) <= set(SPEC_TYPES)
    assert set(TORCH_CLASSES) <= examples
    for name in TORCH_CLASSES:
        assert getattr(spec_module, f"{name}Spec").model_fields["type"].default == name


@pytest.mark.parametrize(("raw", "field"), INVALID)
def test_invalid_spec_names_the_field(raw, field):
    got, message = first_error(raw)
    assert got == field, message
    assert message


@pytest.mark.parametrize(("raw", "field"), INVALID)
def test_error_paths_carry_no_discriminator_tags(raw, field):
    with pytest.raises(SpecError) as info:
        parse_schedule(raw, n_groups=2)
    for error in info.value.errors:
        assert not set(error.field.split(".")) & set(SPEC_TYPES), error.field


def test_errors_start_with_the_given_field():
    field, _ = first_error({"type": "StepLR", "step_size": 0}, field="action.schedule")
    assert field == "action.schedule.step_size"


def test_message_says_what_was_expected_and_what_arrived():
    assert (
        first_error({"type": "StepLR", "step_size": "5"})[1]
        == "expected an integer, got the string '5'"
    )
    assert first_error({"type": "StepLR", "step_size": 5.0})[1] == "expected an integer, got 5.0"
    assert (
        first_error({"type": "ExponentialLR", "gamma": math.nan})[1]
        == "expected a finite number, got NaN"
    )
    assert first_error({"type": "ExponentialLR", "gamma": 0})[1] == "expected a value > 0, got 0"


def test_per_group_count_message():
    _, message = first_error({"type": "CyclicLR", "base_lr": [0.1, 0.2, 0.3], "max_lr": 1.0})
    assert message == "expected 2 values (one per param group), got 3"


def test_unknown_type_lists_the_accepted_types():
    _, message = first_error({"type": "StepLr"})
    assert "did you mean 'StepLR'" in message
    assert all(name in message for name in TORCH_CLASSES)


def test_unknown_key_lists_the_accepted_keys():
    _, message = first_error({"type": "StepLR", "step_size": 3, "gama": 0.5})
    assert message == "unknown argument for StepLR; accepted: step_size, gamma"


def test_scale_fn_refusal_explains_why():
    _, message = first_error({"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "scale_fn": "x"})
    assert "cannot travel over HTTP" in message and "mode" in message


def test_one_cycle_without_length_says_what_is_needed():
    _, message = first_error({"type": "OneCycleLR", "max_lr": 0.1})
    assert "total_steps, or both epochs and steps_per_epoch" in message


def test_milestone_zero_says_why():
    _, message = first_error({"type": "MultiStepLR", "milestones": [0, 5]})
    assert "take effect when the scheduler is built" in message


def test_plateau_in_chained_points_to_sequential():
    _, message = first_error({"type": "ChainedScheduler", "schedulers": [PLATEAU]})
    assert "SequentialLR" in message


def test_all_problems_are_reported():
    with pytest.raises(SpecError) as info:
        parse_schedule({"type": "StepLR", "step_size": 0, "gamma": -1, "x": 1}, n_groups=1)
    assert [e.field for e in info.value.errors] == [
        "schedule.step_size",
        "schedule.gamma",
        "schedule.x",
    ]


def test_plateau_is_accepted_as_a_sequential_stage():
    raw = {"type": "SequentialLR", "schedulers": [WARMUP, PLATEAU], "milestones": [5]}
    spec = parse_schedule(raw, n_groups=2)
    assert watched_metrics(spec) == {"val_acc"}


def test_depth_limit_points_at_the_first_node_too_deep():
    raw: dict[str, Any] = {"type": "StepLR", "step_size": 1}
    for _ in range(MAX_DEPTH):
        raw = {"type": "ChainedScheduler", "schedulers": [raw]}
    field, message = first_error(raw)
    assert field == "schedule" + ".schedulers.0" * MAX_DEPTH
    assert f"at most {MAX_DEPTH} levels" in message
    parse_schedule(raw["schedulers"][0], n_groups=2)  # one level less is fine


def test_very_deep_json_is_refused_without_recursing():
    raw: Any = {"type": "StepLR", "step_size": 1}
    for _ in range(10_000):
        raw = {"type": "ChainedScheduler", "schedulers": [raw]}
    started = time.perf_counter()
    field, _ = first_error(raw)
    assert field == "schedule" + ".schedulers.0" * MAX_DEPTH
    assert time.perf_counter() - started < 1.0


def test_torch_kwargs_leave_out_what_the_engine_builds():
    plateau = parse_schedule(PLATEAU, n_groups=1)
    assert "monitor" not in plateau.torch_kwargs()
    assert plateau.torch_kwargs()["mode"] == "max"
    sequential = parse_schedule(VALID[9].values[0], n_groups=2)
    assert sequential.torch_kwargs() == {"milestones": [5]}
    chained = parse_schedule(VALID[11].values[0], n_groups=2)
    assert chained.torch_kwargs() == {}


def test_lambda_kwargs_are_expressions_named_by_their_path():
    raw = {
        "type": "ChainedScheduler",
        "schedulers": [WARMUP, {"type": "LambdaLR", "lr_lambda": ["0.9 ** step", "1.0"]}],
    }
    spec = parse_schedule(raw, n_groups=2)
    expressions = spec.schedulers[1].torch_kwargs()["lr_lambda"]
    assert all(isinstance(e, Expression) for e in expressions)
    assert [e.field for e in expressions] == [
        "schedule.schedulers.1.lr_lambda.0",
        "schedule.schedulers.1.lr_lambda.1",
    ]
    assert expressions[0](2) == 0.9**2


def test_one_cycle_kwargs_are_what_torch_expects():
    kwargs = parse_schedule(
        {"type": "OneCycleLR", "max_lr": 1, "total_steps": 50}, n_groups=1
    ).torch_kwargs()
    assert type(kwargs["pct_start"]) is float and type(kwargs["max_lr"]) is float


def test_iter_nodes_is_depth_first_root_first():
    spec = parse_schedule(VALID[12].values[0], n_groups=2)
    assert [path for path, _ in iter_nodes(spec)] == [
        "schedule",
        "schedule.schedulers.0",
        "schedule.schedulers.0.schedulers.0",
        "schedule.schedulers.0.schedulers.1",
        "schedule.schedulers.1",
        "schedule.schedulers.1.schedulers.0",
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param({"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1}, True, id="cyclic"),
        pytest.param(
            {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "cycle_momentum": False},
            False,
            id="cyclic-off",
        ),
        pytest.param(
            {
                "type": "ChainedScheduler",
                "schedulers": [WARMUP, {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 50}],
            },
            True,
            id="nested-one-cycle",
        ),
        pytest.param({"type": "StepLR", "step_size": 2}, False, id="step"),
    ],
)
def test_cycles_momentum(raw, expected):
    assert cycles_momentum(parse_schedule(raw, n_groups=2)) is expected


def test_watched_metrics_collects_every_plateau():
    raw = {
        "type": "SequentialLR",
        "milestones": [5, 10],
        "schedulers": [WARMUP, {"type": "ReduceLROnPlateau"}, PLATEAU],
    }
    assert watched_metrics(parse_schedule(raw, n_groups=1)) == {"val_loss", "val_acc"}
    assert watched_metrics(parse_schedule(WARMUP, n_groups=1)) == set()


def test_equality_ignores_where_a_spec_was_found():
    parsed = parse_schedule({"type": "StepLR", "step_size": 3}, n_groups=1, field="body.schedule")
    assert parsed == StepLRSpec(step_size=3)
    assert parsed != StepLRSpec(step_size=4)


def test_schedule_spec_has_a_json_schema():
    from pydantic import TypeAdapter

    schema = TypeAdapter(ScheduleSpec).json_schema()
    assert set(SPEC_TYPES) <= {name.removesuffix("Spec") for name in schema["$defs"]}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=valid_specs(2, max_depth=3))
def test_generated_specs_are_accepted_and_round_trip(raw):
    spec = parse_schedule(raw, n_groups=2)
    assert parse_schedule(spec_to_json(spec), n_groups=2) == spec


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=valid_specs(2, max_depth=3, allow_plateau=False))
def test_generated_specs_step_in_torch_with_finite_values(raw):
    lrs = step_torch(parse_schedule(raw, n_groups=2), SAFE_STEPS)
    assert all(math.isfinite(lr) for row in lrs for lr in row)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec with one key of one node set to an arbitrary JSON value."""
    raw = draw(valid_specs(2, max_depth=3))
    node = raw
    while node.get("schedulers") and draw(st.booleans()):
        node = draw(st.sampled_from(node["schedulers"]))
    key = draw(
        st.sampled_from(["type", "schedulers", "milestones", "gamma", "lr_lambda", "max_lr", "x"])
    )
    node[key] = draw(JSON | st.sampled_from(SPEC_TYPES))
    return raw


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=JSON | mutated_specs())
def test_any_json_gives_a_spec_or_a_spec_error(raw):
    try:
        parse_schedule(raw, n_groups=2)
    except SpecError as exc:
        assert exc.errors and all(e.field.startswith("schedule") for e in exc.errors)


def test_a_spec_model_is_checked_again():
    spec = parse_schedule({"type": "CyclicLR", "base_lr": [0.1, 0.2], "max_lr": 1.0}, n_groups=2)
    assert parse_schedule(spec, n_groups=2) == spec
    with pytest.raises(SpecError):
        parse_schedule(spec, n_groups=3)
