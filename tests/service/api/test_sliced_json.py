"""Big tables are serialised a slice at a time, to the same bytes as one ``orjson.dumps``."""

from __future__ import annotations

import asyncio
import math
import random
import threading

import numpy as np
import orjson
import pytest
from lrserve.service.api import sliced_json


@pytest.mark.parametrize("rows, width", [(1, 1), (3, 5000), (485, 1024), (5000, 1), (10_000, 3)])
def test_the_same_bytes_as_orjson(rows, width):
    rng = random.Random(rows * width)
    table = [[rng.random() * 10 ** rng.randint(-300, 300) for _ in range(width)] for _ in range(rows)]
    body = {"run_id": "r", "lrs": table[0], "window": {"start": 7, "lrs": table, "momentums": None},
            "flat": [r[0] for r in table], "empty": [], "n": -math.inf and "-Infinity"}
    assert sliced_json.dumps(body) == orjson.dumps(body)
    assert sliced_json.dumps(table) == orjson.dumps(table)
    packed = np.array(table, dtype=np.float64)  # a history's LRs: the same bytes as the lists
    expected = orjson.dumps(body | {"window": {"lrs": table}})
    assert sliced_json.dumps({**body, "window": {"lrs": packed}}) == expected


def test_a_big_table_is_written_in_slices(monkeypatch):
    calls = []
    real = orjson.dumps
    monkeypatch.setattr(sliced_json.orjson, "dumps",
                        lambda value, **kw: calls.append(value) or real(value, **kw))
    table = [[0.5] * 1024 for _ in range(485)]
    sliced_json.dumps({"window": {"lrs": table}})
    biggest = max(len(c) * (len(c[0]) if c and isinstance(c[0], list) else 1)
                  for c in calls if isinstance(c, list))
    assert biggest <= sliced_json.SLICE_VALUES
    calls.clear()
    sliced_json.dumps({"lrs": {"values": np.full((485, 1024), 0.5)}})
    assert max(c.size for c in calls if isinstance(c, np.ndarray)) <= sliced_json.SLICE_VALUES



def test_a_big_table_gives_way_between_slices(monkeypatch):
    # A thread waiting for the GIL (the event loop) takes it after each slice, not a switch
    # interval later: each slice of the table is followed by a release (``time.sleep(0)``).
    events = []
    real = orjson.dumps
    monkeypatch.setattr(sliced_json.orjson, "dumps",
                        lambda value, **kw: events.append(type(value).__name__) or real(value, **kw))
    monkeypatch.setattr(sliced_json.time, "sleep", lambda s: events.append(("sleep", s)))
    table = np.full((485, 1024), 0.5)
    written = []
    worker = threading.Thread(target=lambda: written.append(sliced_json.dumps({"lrs": {"values": table}})))
    worker.start()
    worker.join()
    assert written == [orjson.dumps({"lrs": {"values": table.tolist()}})]
    slices = [i for i, e in enumerate(events) if e == "ndarray"]
    assert len(slices) > 100 and all(events[i + 1] == ("sleep", 0) for i in slices)
    assert events.count(("sleep", 0)) == len(slices)
    events.clear()
    async def on_the_loop() -> bytes:
        return sliced_json.dumps({"lrs": {"values": table}})

    asyncio.run(on_the_loop())  # the event loop's thread does not, whichever thread runs it
    assert ("sleep", 0) not in events
    looping = threading.Thread(target=lambda: asyncio.run(on_the_loop()))  # a loop off the main thread
    looping.start()
    looping.join()
    assert ("sleep", 0) not in events
    sliced_json.dumps({"lrs": {"values": table}})  # the main thread with no loop (a script) does
    assert ("sleep", 0) in events
    events.clear()
    sliced_json.dumps({"lrs": [[0.5] * 8] * 8})  # small: one call, nothing to give way to
    assert events == ["dict"]
