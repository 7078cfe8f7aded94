"""Hypothesis strategies for schedule specs: raw JSON dicts that ``parse_schedule`` accepts.

Every torch scheduler class appears, with per-group lists, composites and (optionally)
ReduceLROnPlateau stages inside SequentialLR. Numbers stay in ranges where torch's values
remain finite for at least ``SAFE_STEPS`` steps, so callers may step any generated spec
that far. In particular every generated OneCycleLR has a cycle of at least
``ONE_CYCLE_MIN_STEPS`` steps (torch raises when it is stepped past its cycle).

Example:
    >>> from hypothesis import given
    >>> @given(valid_specs(2))
    ... def test_accepted(raw):
    ...     parse_schedule(raw, n_groups=2)
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

SAFE_STEPS = 200
"""Generated specs can be stepped this many times with finite values and no error."""
ONE_CYCLE_MIN_STEPS = 300
"""Every generated OneCycleLR has total_steps (or epochs * steps_per_epoch) >= this."""

LAMBDA_EXPRESSIONS = (
    "0.95 ** step",
    "min(1.0, (step + 1) / 10)",
    "0.5 * (1 + cos(pi * step / 50))",
    "1 / (step + 1)",
    "exp(-step / 100)",
    "1.0 if step < 30 else 0.1",
    "max(0.01, 1 - step / 150)",
)
"""Factors for LambdaLR (base_lr * factor): all finite and at most 1."""
MULTIPLICATIVE_EXPRESSIONS = (
    "0.99",
    "0.9 if step % 3 == 0 else 1.0",
    "1.0",
    "min(1.0, 0.9 + step / 1000)",
    "0.999 ** (step % 5)",
)
"""Factors for MultiplicativeLR (previous lr * factor): all in (0, 1]."""
MONITORS = ("val_loss", "val_acc", "train_loss")


def _floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def _per_group(n_groups: int, item: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(item, st.lists(item, min_size=n_groups, max_size=n_groups))


def _spec(kind: str, required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy:
    """A dict with ``type``, every required key, and any subset of the optional ones."""
    return st.fixed_dictionaries({"type": st.just(kind), **required}, optional=optional)


def _leaf_specs(n_groups: int) -> st.SearchStrategy[dict[str, Any]]:
    gamma = _floats(0.5, 1.02)
    steps = st.integers(1, 60)
    return st.one_of(
        _spec("StepLR", {"step_size": steps}, {"gamma": gamma}),
        _spec(
            "MultiStepLR",
            {
                "milestones": st.lists(
                    st.integers(1, 250), min_size=1, max_size=5, unique=True
                ).map(sorted)
            },
            {"gamma": gamma},
        ),
        _spec("ConstantLR", {}, {"factor": _floats(0.01, 1.0), "total_iters": steps}),
        _spec(
            "LinearLR",
            {},
            {
                "start_factor": _floats(0.01, 1.0),
                "end_factor": _floats(0.0, 1.0),
                "total_iters": steps,
            },
        ),
        _spec("ExponentialLR", {"gamma": _floats(0.8, 1.02)}, {}),
        _spec("CosineAnnealingLR", {"T_max": st.integers(1, 100)}, {"eta_min": _floats(0, 1e-3)}),
        _spec(
            "CosineAnnealingWarmRestarts",
            {"T_0": steps},
            {"T_mult": st.integers(1, 3), "eta_min": _floats(0, 1e-3)},
        ),
        _spec("PolynomialLR", {}, {"total_iters": st.integers(1, 100), "power": _floats(0, 3)}),
        _lambda_specs("LambdaLR", LAMBDA_EXPRESSIONS, n_groups),
        _lambda_specs("MultiplicativeLR", MULTIPLICATIVE_EXPRESSIONS, n_groups),
        _cyclic_specs(n_groups),
        _one_cycle_specs(n_groups),
    )


def _lambda_specs(kind: str, expressions: tuple[str, ...], n_groups: int) -> st.SearchStrategy:
    return _spec(kind, {"lr_lambda": _per_group(n_groups, st.sampled_from(expressions))}, {})


def _momentums(n_groups: int) -> dict[str, st.SearchStrategy[Any]]:
    # Disjoint ranges keep base_momentum <= max_momentum for every group.
    return {
        "base_momentum": _per_group(n_groups, _floats(0.5, 0.85)),
        "max_momentum": _per_group(n_groups, _floats(0.85, 0.99)),
        "cycle_momentum": st.booleans(),
    }


def _cyclic_specs(n_groups: int) -> st.SearchStrategy[dict[str, Any]]:
    required = {
        "base_lr": _per_group(n_groups, _floats(1e-4, 0.01)),
        "max_lr": _per_group(n_groups, _floats(0.01, 1.0)),
    }
    optional = {
        "step_size_up": st.integers(1, 50),
        "step_size_down": st.one_of(st.none(), st.integers(1, 50)),
        "mode": st.sampled_from(["triangular", "triangular2", "exp_range"]),
        "gamma": _floats(0.9, 1.0),
        "scale_mode": st.sampled_from(["cycle", "iterations"]),
        **_momentums(n_groups),
    }
    return _spec("CyclicLR", required, optional)


def _one_cycle_specs(n_groups: int) -> st.SearchStrategy[dict[str, Any]]:
    optional = {
        "pct_start": _floats(0.1, 0.45),
        "anneal_strategy": st.sampled_from(["cos", "linear"]),
        "div_factor": _floats(1.0, 100.0),
        "final_div_factor": _floats(1.0, 1e4),
        "three_phase": st.booleans(),
        **_momentums(n_groups),
    }
    max_lr = {"max_lr": _per_group(n_groups, _floats(0.01, 1.0))}
    by_total = {**max_lr, "total_steps": st.integers(ONE_CYCLE_MIN_STEPS, 2000)}
    by_epochs = {**max_lr, "epochs": st.integers(10, 40), "steps_per_epoch": st.integers(30, 100)}
    return st.one_of(
        _spec("OneCycleLR", by_total, optional), _spec("OneCycleLR", by_epochs, optional)
    )


def plateau_specs(n_groups: int) -> st.SearchStrategy[dict[str, Any]]:
    """ReduceLROnPlateau specs (top level, or a SequentialLR stage)."""
    optional = {
        "mode": st.sampled_from(["min", "max"]),
        "factor": _floats(0.1, 0.9),
        "patience": st.integers(0, 5),
        "threshold": _floats(0.0, 0.1),
        "threshold_mode": st.sampled_from(["rel", "abs"]),
        "cooldown": st.integers(0, 3),
        "min_lr": _per_group(n_groups, _floats(0.0, 1e-4)),
        "eps": _floats(0.0, 1e-6),
        "monitor": st.sampled_from(MONITORS),
    }
    return _spec("ReduceLROnPlateau", {}, optional)


@st.composite
def _sequential_specs(draw: st.DrawFn, n_groups: int, allow_plateau: bool) -> dict[str, Any]:
    # Stages are plain schedulers (or plateaus): lrserve refuses composite stages.
    stage = (
        st.one_of(_leaf_specs(n_groups), plateau_specs(n_groups))
        if allow_plateau
        else (_leaf_specs(n_groups))
    )
    stages = draw(st.lists(stage, min_size=1, max_size=3))
    milestones = draw(
        st.lists(
            st.integers(1, 150), min_size=len(stages) - 1, max_size=len(stages) - 1, unique=True
        )
    )
    return {"type": "SequentialLR", "schedulers": stages, "milestones": sorted(milestones)}


@st.composite
def _chained_specs(
    draw: st.DrawFn, n_groups: int, depth: int, max_depth: int, allow_plateau: bool
) -> dict[str, Any]:
    child = _node_specs(n_groups, depth + 1, max_depth, allow_plateau, top=False)
    return {"type": "ChainedScheduler", "schedulers": draw(st.lists(child, min_size=1, max_size=3))}


def _node_specs(
    n_groups: int, depth: int, max_depth: int, allow_plateau: bool, *, top: bool
) -> st.SearchStrategy[dict[str, Any]]:
    options = [_leaf_specs(n_groups)]
    if top and allow_plateau:
        options.append(plateau_specs(n_groups))
    if depth < max_depth:
        options.append(_sequential_specs(n_groups, allow_plateau))
        options.append(_chained_specs(n_groups, depth, max_depth, allow_plateau))
    return st.one_of(*options)


def valid_specs(
    n_groups: int, *, max_depth: int = 2, allow_plateau: bool = True
) -> st.SearchStrategy[dict[str, Any]]:
    """Raw spec dicts that ``parse_schedule(raw, n_groups=n_groups)`` accepts.

    Args:
        n_groups: Param groups of the run; per-group lists have this many items.
        max_depth: Deepest nesting level generated (1: no composites).
        allow_plateau: Whether ReduceLROnPlateau may appear (top level or as a
            SequentialLR stage). Plain torch cannot build a SequentialLR with a plateau
            stage; pass False to compare with torch directly.

    Returns:
        A strategy of JSON-ready dicts; see the module docstring for the value ranges.
    """
    return _node_specs(n_groups, 1, max_depth, allow_plateau, top=True)
