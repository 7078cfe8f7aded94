"""Big tables are serialised a slice at a time, to the same bytes as one ``orjson.dumps``."""

from __future__ import annotations

import asyncio
import math
import random

import numpy as np
import orjson
import pytest
from lrserve.service.api import sliced_json
from lrserve.service.api.responses import SlicedJSONResponse


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


def test_pieces_are_the_same_bytes_a_slice_at_a_time(monkeypatch):
    table = np.random.default_rng(3).random((485, 1024)) * 1e-3
    body = {"run_id": "r", "lrs": {"steps": list(range(485)), "values": table}, "events": [{"k": 1}] * 5000}
    calls = []
    real = orjson.dumps
    monkeypatch.setattr(sliced_json.orjson, "dumps",
                        lambda value, **kw: calls.append(value) or real(value, **kw))
    pieces = sliced_json.pieces(body)
    first = next(pieces)
    assert len(calls) < 10  # written when asked for, not all at once
    rest = list(pieces)
    assert first + b"".join(rest) == real(body, option=sliced_json.OPTIONS)
    assert all(len(p) >= sliced_json.PIECE_BYTES for p in [first, *rest[:-1]])
    small = {"run_id": "r", "lrs": [0.1] * 10}
    assert list(sliced_json.pieces(small)) == [real(small)]


SCOPE = {"type": "http", "method": "GET", "path": "/", "headers": [], "asgi": {"spec_version": "2.3"}}


async def _respond(response, order: list[str], leave_after: int | None = None) -> list[dict]:
    """``response``'s messages, as a client gets them (each body noted in ``order``) that
    leaves after ``leave_after`` of them (then ``receive`` says ``http.disconnect``)."""
    sent: list[dict] = []
    gone = asyncio.Event()

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message.get("body"):
            order.append("piece")
        if leave_after is not None and len(sent) >= leave_after:
            gone.set()

    await response(SCOPE, receive, send)
    return sent


def test_a_sliced_answer_is_orjsons_bytes_and_other_work_runs_between_its_slices():
    content = {"lrs": {"values": np.random.default_rng(5).random((400, 300))}, "run_id": "r"}
    written: list[bytes] = []
    order: list[str] = []

    async def main() -> list[dict]:
        stop = asyncio.Event()

        async def other_work() -> None:  # another request's steps, ready all along
            while not stop.is_set():
                order.append("other")
                await asyncio.sleep(0)

        other = asyncio.create_task(other_work())
        sent = await _respond(SlicedJSONResponse(content, written=written.append), order)
        stop.set()
        await other
        return sent

    sent = asyncio.run(main())
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert body == orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY) and written == [body]
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    pieces = [i for i, what in enumerate(order) if what == "piece"]
    assert len(pieces) > 10
    between = [order[a + 1 : b] for a, b in zip(pieces, pieces[1:], strict=False)]
    assert all("other" in others for others in between)  # the loop's other work ran between every two


def test_a_client_gone_mid_answer_stops_its_writing(monkeypatch):
    content = {"lrs": {"values": np.random.default_rng(7).random((485, 1024))}}
    written: list[bytes] = []
    made: list[int] = []
    real = sliced_json.pieces

    def counted(value):
        for piece in real(value):
            made.append(len(piece))
            yield piece

    async def main() -> list[dict]:
        sent = await _respond(SlicedJSONResponse(content, written=written.append), [], leave_after=3)
        for _ in range(5):  # had it gone on, it would have written more meanwhile
            await asyncio.sleep(0)
        return sent

    monkeypatch.setattr(sliced_json, "pieces", counted)
    sent = asyncio.run(main())
    assert len(sent) < 6 and len(made) < 6 < len(list(real(content)))  # a few pieces of ~300
    assert written == []  # nothing kept
