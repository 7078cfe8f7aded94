"""Property tests of the spike guard's detector on synthetic streams, at the DEFAULT settings.

Rates over many streams are in the README (``python -m tests.service.engine.spike_streams``);
here hypothesis searches for a stream that breaks the promises the README makes: no false
spike at up to 10 % noise, every NaN / inf and every 5x spike found, the same decisions
every time (and in a preview as in the engine).
"""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from lrserve.service.engine.engine import Engine
from lrserve.service.engine.preview import simulate
from lrserve.service.engine.spec import parse_schedule
from lrserve.service.engine.spike_guard import GuardSettings

from tests.service.engine.spike_streams import KINDS, clean, judge, noisy, spiked

DEFAULTS = GuardSettings()
kinds = st.sampled_from(KINDS)
seeds = st.integers(0, 2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(kinds, st.floats(0.0, 0.10), seeds)
def test_no_false_spike_at_up_to_10_percent_noise(kind, noise, seed):
    rng = random.Random(seed)
    assert judge(noisy(clean(kind, 1500, rng), noise, rng), DEFAULTS) == []


@settings(max_examples=60, deadline=None)
@given(kinds, st.floats(0.0, 0.10), st.sampled_from([math.nan, math.inf, 5.0, 10.0, 100.0]), seeds)
def test_non_finite_and_large_spikes_are_always_found(kind, noise, height, seed):
    stream, step = spiked(kind, noise, height, random.Random(seed))
    assert judge(stream, DEFAULTS) == [step]


@settings(max_examples=40, deadline=None)
@given(kinds, st.floats(0.0, 0.10), seeds, st.integers(0, 5))
def test_non_finite_values_count_even_in_warmup(kind, noise, seed, at):
    rng = random.Random(seed)
    stream = noisy(clean(kind, 60, rng), noise, rng)
    stream[at] = math.nan
    assert judge(stream, DEFAULTS)[:1] == [at + 1]


@settings(max_examples=25, deadline=None)
@given(kinds, st.floats(0.0, 0.3), seeds, st.lists(st.integers(30, 399), max_size=4),
       st.sampled_from([3.0, math.nan, -math.inf, math.inf]))
def test_same_stream_same_decisions_in_the_engine_and_in_a_preview(kind, noise, seed, at, height):
    rng = random.Random(seed)
    base = clean(kind, 400, rng)
    stream = noisy(base, noise, rng)
    for step in at:
        stream[step] = base[step] * height if math.isfinite(height) else height
    spec = parse_schedule({"type": "SpikeGuard", "schedule": {"type": "CosineAnnealingLR", "T_max": 300}},
                          n_groups=2)
    first = simulate(spec, [0.1, 0.01], None, 401, {"loss": stream})
    assert simulate(spec, [0.1, 0.01], None, 401, {"loss": stream}) == first
    engine = Engine(spec, [0.1, 0.01])
    lrs, spikes = [list(engine.values()[0])], []
    for k, value in enumerate(stream, start=1):
        spikes += engine.advance(None, [{"step": k, "rank": 0, "name": "loss", "value": value}])
        lrs.append(list(engine.values()[0]))
    assert lrs == first.lrs and spikes == first.spikes
    assert [s.step for s in spikes] == [s for s in judge(stream, DEFAULTS)]
