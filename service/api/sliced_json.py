"""Big JSON answers serialised a slice at a time, so that no single call holds the GIL long.

``orjson.dumps`` is one C call that holds the GIL throughout: a 10 MB answer (485 steps of
1,024 LRs) held it for 90-140 ms, and the event loop, which needs the GIL for every request
it serves, waited that long. Tables of more than ``SLICE_VALUES`` numbers (lists of rows) are
written a slice of rows at a time: ``dumps`` in one go (in a worker thread: the GIL changes
hands between slices), ``pieces`` one slice per piece asked for (on the event loop, which
serves other requests between pieces: ``responses.SlicedJSONResponse``). The bytes are the
same as ``orjson.dumps``'s.

A table may also be a 2-D numpy array of float64 (a history's LRs, straight from their packed
doubles: no float objects made); orjson writes its numbers exactly as it writes Python floats.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

OPTIONS = orjson.OPT_SERIALIZE_NUMPY

SLICE_VALUES = 4096
"""Most numbers serialised in one ``orjson.dumps`` call (0.1-1 ms of work)."""
PIECE_BYTES = 16 << 10
"""``pieces`` gives the small parts between slices (keys, brackets, short values) together,
in pieces of at least this many bytes (but the last)."""


def dumps(content: Any) -> bytes:
    """``orjson.dumps(content)``, the same bytes, with big tables written a slice at a time."""
    if not is_big(content):
        return orjson.dumps(content, option=OPTIONS)
    return b"".join(_parts(content))


def is_big(content: Any) -> bool:
    """Whether ``content`` holds a table of more than ``SLICE_VALUES`` numbers (within four levels)."""
    return _has_big_table(content)


def pieces(content: Any) -> Iterator[bytes]:
    """``dumps(content)`` in pieces, each written when it is asked for: at most one slice's
    ``orjson.dumps`` (and small parts) per piece."""
    if not is_big(content):
        yield orjson.dumps(content, option=OPTIONS)
        return
    held: list[bytes] = []
    size = 0
    for part in _parts(content):
        held.append(part)
        size += len(part)
        if size >= PIECE_BYTES:
            yield b"".join(held)
            held, size = [], 0
    if held:
        yield b"".join(held)


def _values(value: Any) -> int:
    """How many numbers a list of rows (or of numbers) holds, judged by its first item."""
    if isinstance(value, np.ndarray):
        return int(value.size)
    if not isinstance(value, list) or not value:
        return 0
    first = value[0]
    return len(value) * (len(first) if isinstance(first, (list, tuple)) else 1)


def _has_big_table(value: Any, depth: int = 0) -> bool:
    if isinstance(value, dict) and depth < 4:
        return any(_has_big_table(v, depth + 1) for v in value.values())
    return _values(value) > SLICE_VALUES


def _parts(value: Any, depth: int = 0) -> Iterator[bytes]:
    """The bytes of ``value`` in order, a table's slice (one ``orjson.dumps`` call) at a time."""
    if isinstance(value, dict) and depth < 4 and _has_big_table(value, depth):
        yield b"{"
        for i, (key, item) in enumerate(value.items()):
            if i:
                yield b","
            yield orjson.dumps(key) + b":"
            yield from _parts(item, depth + 1)
        yield b"}"
        return
    total = _values(value)
    if total <= SLICE_VALUES:
        yield orjson.dumps(value, option=OPTIONS)
        return
    rows = max(1, len(value) * SLICE_VALUES // total)
    yield b"["
    for at in range(0, len(value), rows):
        if at:
            yield b","
        yield orjson.dumps(value[at : at + rows], option=OPTIONS)[1:-1]
    yield b"]"
