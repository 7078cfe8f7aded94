"""Synthetic loss streams for the spike guard's detector, and its false-positive and detection
rates at the DEFAULT settings (the figures in the README).

    python -m tests.service.engine.spike_streams            # the table, about a minute
    python -m tests.service.engine.spike_streams --quick    # a tenth of the reports

Streams (one rank's reported loss per step, multiplicative Gaussian noise of relative
size ``noise``):

- ``decay``: ``a * exp(-t / tau) + floor``, tau 150..3000 steps (a training loss);
- ``plateau``: a level that drops by 5..30 % every 300..1500 steps (LR decays);
- ``drift-up`` / ``drift-down``: a slow linear drift of +/-40 % over the stream;
- ``warmup-decay``: a fast fall (tau 20..60) onto a slow one, as the first steps of training.

A spike multiplies one report's clean value by ``height`` (or is NaN / inf), placed after
the warm-up at a random step. Detection counts spikes the detector flags at that report.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable, Iterator

from lrserve.service.engine.spike_guard import Detector, GuardSettings, Report

KINDS = ("decay", "plateau", "drift-up", "drift-down", "warmup-decay")
HEIGHTS: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 10.0, math.nan, math.inf)


def clean(kind: str, n: int, rng: random.Random) -> list[float]:
    """The noiseless curve of a stream of ``n`` steps."""
    if kind == "decay":
        a, tau, floor = rng.uniform(0.5, 5.0), rng.uniform(150, 3000), rng.uniform(0.05, 2.0)
        return [a * math.exp(-t / tau) + floor for t in range(n)]
    if kind == "plateau":
        level, out, next_drop = rng.uniform(0.2, 4.0), [], rng.randint(300, 1500)
        for t in range(n):
            if t == next_drop:
                level *= 1 - rng.uniform(0.05, 0.3)
                next_drop += rng.randint(300, 1500)
            out.append(level)
        return out
    if kind in ("drift-up", "drift-down"):
        start, sign = rng.uniform(0.2, 4.0), 1 if kind == "drift-up" else -1
        return [start * (1 + sign * 0.4 * t / n) for t in range(n)]
    if kind == "warmup-decay":
        fast, slow = rng.uniform(20, 60), rng.uniform(500, 3000)
        a, b, floor = rng.uniform(2, 8), rng.uniform(0.3, 2), rng.uniform(0.05, 1)
        return [a * math.exp(-t / fast) + b * math.exp(-t / slow) + floor for t in range(n)]
    raise ValueError(kind)


def noisy(values: list[float], noise: float, rng: random.Random) -> list[float]:
    return [v * (1 + noise * rng.gauss(0, 1)) for v in values]


def judge(stream: list[float], settings: GuardSettings) -> list[int]:
    """Steps (1-based) the detector flags as spikes, one rank, reports in order."""
    detector, flagged = Detector(settings), []
    for k, value in enumerate(stream, start=1):
        verdict = detector.judge(Report(k, 0, value))
        if verdict is not None and verdict.spike:
            detector.spike_at(verdict, k)
            flagged.append(k)
    return flagged


def false_positives(kind: str, noise: float, reports: int, seed: int,
                    settings: GuardSettings) -> int:
    """Spikes flagged in ``reports`` reports of clean-but-noisy streams (2,000 steps each)."""
    rng, flagged, n = random.Random(seed), 0, 2000
    for _ in range(max(1, reports // n)):
        flagged += len(judge(noisy(clean(kind, n, rng), noise, rng), settings))
    return flagged


def spiked(kind: str, noise: float, height: float, rng: random.Random,
           n: int = 1500) -> tuple[list[float], int]:
    """A noisy stream with one spike (``height`` x the clean value, or NaN / inf) at a random step."""
    base = clean(kind, n, rng)
    stream = noisy(base, noise, rng)
    at = rng.randint(100, n - 1)  # after the warm-up (20) and a full window (50)
    stream[at] = height if not math.isfinite(height) else base[at] * height
    return stream, at + 1


def detection(kind: str, noise: float, height: float, trials: int, seed: int,
              settings: GuardSettings) -> float:
    """Share of ``trials`` spikes of ``height`` flagged at their own report."""
    rng, hits = random.Random(seed), 0
    for _ in range(trials):
        stream, step = spiked(kind, noise, height, rng)
        hits += step in judge(stream, settings)
    return hits / trials


def _rows(reports: int, trials: int, settings: GuardSettings) -> Iterator[str]:
    each = reports // len(KINDS)
    yield f"false spikes in {reports:,} reports per noise level ({each:,} per stream kind), default settings:"
    yield "  noise   " + "".join(f"{k:>14}" for k in KINDS) + "         total"
    for noise in (0.01, 0.05, 0.10, 0.20):
        counts = [false_positives(k, noise, each, seed=7, settings=settings) for k in KINDS]
        yield f"  {noise:>4.0%}    " + "".join(f"{c:>14}" for c in counts) + f"{sum(counts):>14}"
    for noise in (0.05, 0.10):
        yield f"detection rate, {trials} spikes each, noise {noise:.0%}:"
        yield "  height  " + "".join(f"{k:>14}" for k in KINDS)
        for height in HEIGHTS:
            rates = [detection(k, noise, height, trials, seed=11, settings=settings) for k in KINDS]
            label = f"{height:g}x" if math.isfinite(height) else str(height)
            yield f"  {label:>6}  " + "".join(f"{r:>14.1%}" for r in rates)


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.service.engine.spike_streams",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the reports and trials")
    args = parser.parse_args(argv)
    reports, trials = (10_000, 50) if args.quick else (100_000, 200)
    for row in _rows(reports, trials, GuardSettings()):
        out(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
