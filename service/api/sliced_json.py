"""Big JSON answers serialised a slice at a time, so the GIL changes hands meanwhile.

``orjson.dumps`` is one C call that holds the GIL throughout: a 10 MB answer (485 steps of
1,024 LRs) held it for 90-140 ms, and the event loop, which needs the GIL for every request
it serves, waited that long. ``dumps`` writes tables of more than ``SLICE_VALUES`` numbers
(lists of rows) a slice of rows at a time, so that the GIL changes hands between slices
(every ``sys.getswitchinterval()``); the bytes are the same as ``orjson.dumps``'s.

Between slices a writing thread that runs no event loop **gives way** (``time.sleep(0)``: the
GIL released, and taken back after a thread that was waiting for it; the event loop's thread,
which writes the spike guard's answers, does not: it would only wait for the GIL back).
Without it a thread waiting for the GIL waits for the writer's next forced switch, up to the
switch interval (0.5 ms) after it asked, at each of its own releases (a socket write, an
SQLite call). The event loop serving
another run's ``POST .../step`` releases it dozens of times per request, so a worst history
(485 x 1,024 LRs, ~120 slices) written beside it made that step's p99 2.7-3.0 x its idle
figure; giving way, 1.2-2.0 x (docs/hardening.md, "Big answers").

A table may also be a 2-D numpy array of float64 (a history's LRs, straight from their packed
doubles: no float objects made); orjson writes its numbers exactly as it writes Python floats.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import orjson

OPTIONS = orjson.OPT_SERIALIZE_NUMPY

SLICE_VALUES = 4096
"""Most numbers serialised in one ``orjson.dumps`` call (about a millisecond's work)."""


def dumps(content: Any) -> bytes:
    """``orjson.dumps(content)``, the same bytes, with big tables written a slice at a time."""
    if not _has_big_table(content):
        return orjson.dumps(content, option=OPTIONS)
    parts: list[bytes] = []
    _write(content, parts)
    return b"".join(parts)


_CONTAINERS = (dict, list, np.ndarray)


def _values(value: Any) -> int:
    """How many numbers a list of rows (or of numbers) holds, judged by its first item."""
    if isinstance(value, np.ndarray):
        return int(value.size)
    if not isinstance(value, list) or not value:
        return 0
    first = value[0]
    return len(value) * (len(first) if isinstance(first, (list, tuple)) else 1)


def _has_big_table(value: Any, depth: int = 0) -> bool:
    if isinstance(value, dict):  # a loop, not any() over a generator: most answers are small
        if depth < 4:
            for item in value.values():  # a call only for what may hold a table (not per number)
                if isinstance(item, _CONTAINERS) and _has_big_table(item, depth + 1):
                    return True
        return False
    if isinstance(value, (list, np.ndarray)):
        return _values(value) > SLICE_VALUES
    return False


def _write(value: Any, parts: list[bytes], depth: int = 0) -> None:
    if isinstance(value, dict) and depth < 4 and _has_big_table(value, depth):
        parts.append(b"{")
        for i, (key, item) in enumerate(value.items()):
            parts.append(b"," if i else b"")
            parts.append(orjson.dumps(key))
            parts.append(b":")
            _write(item, parts, depth + 1)
        parts.append(b"}")
        return
    total = _values(value)
    if total <= SLICE_VALUES:
        parts.append(orjson.dumps(value, option=OPTIONS))
        return
    rows = max(1, len(value) * SLICE_VALUES // total)
    give_way = asyncio._get_running_loop() is None  # on the loop's own thread: it is the one waiting
    parts.append(b"[")
    for at in range(0, len(value), rows):
        parts.append(b"," if at else b"")
        parts.append(orjson.dumps(value[at : at + rows], option=OPTIONS)[1:-1])
        if give_way:
            time.sleep(0)  # see the module's note
    parts.append(b"]")
