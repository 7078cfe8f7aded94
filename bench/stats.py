"""Small statistics and the interleaving every comparison in the suite goes through.

This machine is shared and noisy, so no figure compares two numbers taken at different
times: each compares variants measured in alternating rounds (A B, B A, ...), and reports
medians (robust to a noisy neighbour) and p99 (what the slowest requests pay).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100); NaN when there are no values.

    Nearest rank, not interpolation: p99 is a value that was really observed.
    """
    data = sorted(values)
    if not data:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(data)))
    return data[min(rank, len(data)) - 1]


def median(values: Iterable[float]) -> float:
    """The median (mean of the two middle values for an even count); NaN when empty."""
    data = sorted(values)
    n = len(data)
    if n == 0:
        return math.nan
    mid = n // 2
    return data[mid] if n % 2 else (data[mid - 1] + data[mid]) / 2.0


def p99(values: Iterable[float]) -> float:
    return percentile(values, 99.0)


def summary(values: Sequence[float]) -> dict[str, float]:
    """``{"n", "median", "p99", "mean"}`` of a sample."""
    n = len(values)
    return {
        "n": n,
        "median": median(values),
        "p99": p99(values),
        "mean": (sum(values) / n) if n else math.nan,
    }


def rotations(names: Sequence[T], rounds: int) -> list[list[T]]:
    """The order of each round: round r starts at name r (A B C, B C A, C A B, ...).

    Rotating cancels a steady drift of the machine (warming up, a neighbour starting),
    which a fixed order would charge to whichever variant always runs last.
    """
    k = len(names)
    return [[names[(r + i) % k] for i in range(k)] for r in range(rounds)]


def interleave(
    variants: dict[str, Callable[[], T]], rounds: int
) -> dict[str, list[T]]:
    """Run every variant once per round, in rotated order; the results of each, in round order."""
    results: dict[str, list[T]] = {name: [] for name in variants}
    for order in rotations(list(variants), rounds):
        for name in order:
            results[name].append(variants[name]())
    return results


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is 0 or either is NaN."""
    if not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def rounded(value: Any, digits: int = 3) -> Any:
    """Floats rounded for the JSON and the table (NaN becomes None: JSON has no NaN)."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value
