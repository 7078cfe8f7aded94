"""``codec``'s snapshot text: written by orjson (one short C call, not the stdlib encoder's
4 ms with the GIL held for a 1024-group engine), read back to the identical objects, floats
bit for bit (any NaN for a NaN), non-finite ones, ``Counter``, tuples and big ints included.
That real engines' snapshots take orjson itself, not the fallback: test_engine.py's
``test_snapshot_round_trip_continues_identically``."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter

from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from lrserve.service.engine import codec

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8))
STATES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=6), inner, max_size=4),
        st.builds(Counter, st.dictionaries(st.integers(0, 1000), st.integers(0, 5), max_size=4))),
    max_leaves=20)


def same(a, b) -> bool:
    """Equal, and every float the same bits (NaN, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


@examples(max_examples=300, deadline=None)
@given(state=STATES)
def test_a_snapshot_reads_back_to_the_same_objects(state):
    text = codec.dumps(state)
    assert same(codec.loads(text), state)
    assert json.loads(text) == json.loads(json.dumps(codec.to_jsonable(state), allow_nan=False))


def test_floats_are_written_exactly_and_big_ints_still_written():
    tricky = [0.1 + 0.2, 1e-308, 5e-324, 1.7976931348623157e308, -0.0, 1 / 3, 1e-05,
              math.nan, math.inf, -math.inf]
    assert same(codec.loads(codec.dumps(tricky)), tricky)
    assert codec.loads(codec.dumps({"big": 2**80})) == {"big": 2**80}  # over 64 bits: the stdlib's
