"""Reads near the hot path: ``GET /v1/runs/{run_id}`` and ``GET .../history``, answered before
FastAPI where they can be, and history answers kept while they hold.

**History answers** (``HistoryAnswers``). A history is built from the run's events, its
metric rows (at most ``max_points`` of each series) and its final LRs, and it changes only
when the run does: final values never change (finality), events and metric rows are only
appended. So an answer is kept, as JSON bytes, under the run's ``HistoryMark`` (created_at,
horizon, last_seq, metric rows) read *before* it was built, and given again while a fresh
mark (one statement) is the same. Any process's commit, action or metric moves the mark
(replicas included); a run deleted and created again has another ``created_at``. A run of
more metric rows than a mark counts (``MARK_METRIC_ROWS``) has its histories built anew each
time, at the cost their ``max_points`` bounds. Kept answers are bounded in bytes
(``ANSWER_BYTES``), least recently used first out.

**Before FastAPI** (``FastReads``, an ASGI layer like ``fast_path.FastPath``). On SQLite,
where a read on the event loop never waits (WAL), these two reads are answered right there
when that is all they need: an authorised token, a well-formed request, and

- ``GET /v1/runs/{run_id}``: the run loaded in this process and not moved by another (one read
  of its row; the body is the route's own ``run_body``);
- ``GET .../history``: a kept answer whose mark still holds (one read), of at most
  ``ON_LOOP_BYTES``, for a run whose metric rows are few enough to count on the loop.

Anything else (an error, a run to load or catch up, an answer to build, PostgreSQL) goes on to
the route unchanged: the route stays the one definition of the behaviour and of the OpenAPI
document, and it uses the same kept answers.

**Big histories are written here**, read in the route's worker thread and written (their JSON)
in a ``Background`` thread (``service/background.py``: at a lower CPU priority than the event
loop's thread, which then waits less for a core), not in the worker process (``BigWork``):
their LRs are packed doubles written by orjson from a numpy view, a slice at a time
(``sliced_json``), 8 ms of CPU for the worst the budget allows (485 points x 1024 groups, 10
MB), against 24 ms of this process's CPU to take the same 10 MB back from a worker process
(measured; docs/performance.md, "Reads and history").
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from lrserve.service.api.fast_path import reader
from lrserve.service.api.responses import history_json, run_body
from lrserve.service.api.schemas import RUN_ID_PATTERN
from lrserve.service.api.sliced_json import SLICE_VALUES
from lrserve.service.background import Background
from lrserve.service.errors import LRServeError
from lrserve.service.liveness import Liveness
from lrserve.service.lru import Lru
from lrserve.service.runs.manager import RunManager
from lrserve.service.runs.state import RunState
from lrserve.service.store.base import HistoryMark, RunRecord
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

RUN_ROUTE = "/v1/runs/{run_id}"
HISTORY_ROUTE = "/v1/runs/{run_id}/history"
_ID = RUN_ID_PATTERN.strip("^$")
_RUN_PATH = re.compile(rf"/v1/runs/({_ID})")  # fullmatch: `$` would also match before a final "\n"
_HISTORY_PATH = re.compile(rf"/v1/runs/({_ID})/history")

MAX_POINTS = 100_000
"""The route's limit on ``max_points`` (``Query(le=...)``); its default is ``DEFAULT_POINTS``."""
DEFAULT_POINTS = 1000

ANSWER_BYTES = 64 << 20
"""Most bytes of history answers kept per server process (least recently used out first)."""
ANSWER_MOST = 4096
"""Most history answers kept per server process."""
ON_LOOP_BYTES = 1 << 20
"""Largest kept answer given from the event loop (bigger ones: the route, in a worker thread)."""
ON_LOOP_METRIC_ROWS = 20_000
"""Most metric rows a run may have for its mark to be read on the event loop (they are
counted: about a millisecond per 20,000 here)."""


class HistoryAnswers:
    """History answers (JSON bytes) kept by ``(run_id, max_points)`` with the ``HistoryMark``
    they were built at; safe from the event loop and from worker threads."""

    def __init__(self, most_bytes: int = ANSWER_BYTES, most: int = ANSWER_MOST) -> None:
        self.most_bytes = most_bytes
        self._kept: Lru[tuple[str, int], tuple[HistoryMark, bytes]] = Lru(
            most_bytes, lambda _, kept: len(kept[1]), most_items=most)

    def __len__(self) -> int:
        return len(self._kept)

    def peek(self, run_id: str, max_points: int) -> tuple[HistoryMark, bytes] | None:
        """The kept answer and its mark, whether or not it still holds."""
        return self._kept.get((run_id, max_points))

    def get(self, run_id: str, max_points: int, mark: HistoryMark) -> bytes | None:
        """The kept answer if it was built at ``mark`` (the run's mark now, ``exact``), else None."""
        key = (run_id, max_points)
        if not mark.exact:
            self._kept.pop(key)
            return None
        found = self._kept.get(key)
        if found is None or found[0] != mark:
            return None
        self._kept.get(key, touch=True)
        return found[1]

    def put(self, run_id: str, max_points: int, mark: HistoryMark, body: bytes) -> None:
        """Keep ``body``, built after reading ``mark``, unless it alone is over a quarter of the
        bound or the mark is not ``exact`` (it could not tell a later history from this one:
        the answer kept before goes too, so that nothing reads the mark for it again)."""
        key = (run_id, max_points)
        if len(body) > self.most_bytes // 4 or not mark.exact:
            self._kept.pop(key)
            return
        self._kept.put(key, (mark, body))


BACKGROUND_VALUES = SLICE_VALUES
"""A history of more LRs than this is written (its JSON) in a ``Background`` thread."""


def history_or_kept(
    manager: RunManager, answers: HistoryAnswers, run_id: str, max_points: int
) -> bytes | HistoryMark:
    """``GET .../history``'s body: the kept one while the run's mark holds, else built and kept;
    or, for a history of more than ``BACKGROUND_VALUES`` LRs, the mark read (and nothing more:
    ``big_history`` reads it once it holds a ``Background`` slot). Blocks: call it from a worker
    thread.

    Raises:
        RunNotFound: no such run.
        WorkBudgetExceeded: more points of more groups than the work budget allows.
    """
    mark = manager.history_mark(run_id)
    body = answers.get(run_id, max_points, mark)
    if body is not None:
        return body
    if min(max_points, mark.horizon + 1) * _groups(manager, run_id, mark) > BACKGROUND_VALUES:
        return mark
    body = history_json(manager.history(run_id, max_points, mark))  # (one that grew since: here too)
    answers.put(run_id, max_points, mark, body)
    return body


def _groups(manager: RunManager, run_id: str, mark: HistoryMark) -> int:
    """The run's param groups: from its state if loaded and the run ``mark`` was read of (no
    read), else loaded (as ``history`` would)."""
    state = manager.loaded(run_id)
    if state is None or state.created_at != mark.created_at:
        state = manager.caught_up(run_id)
    return state.n_groups


async def big_history(background: Background, manager: RunManager, answers: HistoryAnswers, run_id: str,
                      max_points: int, mark: HistoryMark) -> bytes:
    """A big history's body, kept: read in a worker thread, written in a ``Background`` thread,
    holding one of its slots throughout (at most ``Background.slots`` histories held at once; a
    request cancelled meanwhile lets its slot go, and its JSON, if begun, ends in its thread: at
    most the pool's workers more).

    Everything that reads the store or takes the run's lock (a load, a catch-up) runs in the
    worker thread, at the server's priority, and the answer is kept (``HistoryAnswers``' lock,
    which the event loop takes too) here, after: a background thread, which the kernel runs
    last, holds no lock that a commit or the loop waits on.

    Raises:
        RunNotFound: no such run (deleted since).
        WorkBudgetExceeded: more points of more groups than the work budget allows.
        ServerStopping: the server is stopping.
    """
    async with background.slot:
        # the History: an argument of `run` and of the pool's work item, both gone before the slot is let go
        reading = run_in_threadpool(manager.history, run_id, max_points, mark)
        body = await background.run(history_json, await reading)
    answers.put(run_id, max_points, mark, body)
    return body


def read_run_body(manager: RunManager, liveness: Liveness, run_id: str) -> dict[str, Any]:
    """``GET /v1/runs/{run_id}``'s body (``RunPublic``): one read of the run's row.

    Raises:
        RunNotFound: no such run.
    """
    record, state = manager.read_run(run_id)
    return run_public(manager, liveness, record, state)


def run_public(manager: RunManager, liveness: Liveness, record: RunRecord, state: RunState | None = None
               ) -> dict[str, Any]:
    """The run's body: its record, its state in this process and what liveness knows."""
    state = manager.state(record.run_id) if state is None else state
    return run_body(record, state, max_ahead=manager.settings.max_ahead, last_seen=liveness.last_seen(record),
                    stale=liveness.is_stale(record, state.status))


class FastReads:
    """Answers the reads above from the event loop where they need nothing else; passes every
    other request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            answered = self._answer(scope)
            if answered is not None:
                route, body = answered
                scope["lrserve.route"] = route  # for the telemetry middleware
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _answer(self, scope: Scope) -> tuple[str, bytes] | None:
        path: str = scope["path"]
        if not path.startswith("/v1/runs/"):
            return None
        query: bytes = scope.get("query_string", b"")
        run = _RUN_PATH.fullmatch(path)
        history = None if run is not None else _HISTORY_PATH.fullmatch(path)
        points = _max_points(query) if history is not None else None
        if not ((run is not None and not query) or points is not None):
            return None
        manager = reader(scope)
        if manager is None:
            return None
        app = scope["app"]
        if run is not None:
            return self._run(scope, manager, app.state.liveness, run.group(1))
        assert history is not None and points is not None
        return self._history(scope, manager, app.state.history_answers, history.group(1), points)

    def _run(self, scope: Scope, manager: RunManager, liveness: Liveness,
             run_id: str) -> tuple[str, bytes] | None:
        if manager.loaded(run_id) is None:
            return None
        try:
            body = manager.now(lambda: read_run_body(manager, liveness, run_id))
        except LRServeError:
            return None  # 404, 503: the route answers with its usual body
        if body is None:
            return None
        scope["path_params"] = {"run_id": run_id}
        return RUN_ROUTE, orjson.dumps(body)  # small: one param group's LRs per group

    def _history(self, scope: Scope, manager: RunManager, answers: HistoryAnswers, run_id: str,
                 points: int) -> tuple[str, bytes] | None:
        kept = answers.peek(run_id, points)
        if kept is None or len(kept[1]) > ON_LOOP_BYTES or kept[0].metric_rows > ON_LOOP_METRIC_ROWS:
            return None
        try:
            mark = manager.now(lambda: manager.history_mark(run_id))
        except LRServeError:
            return None
        if mark is None:
            return None
        body = answers.get(run_id, points, mark)
        if body is None:
            return None
        scope["path_params"] = {"run_id": run_id}
        return HISTORY_ROUTE, body


def _max_points(raw: bytes) -> int | None:
    """``max_points`` when the query holds only that (or nothing: ``DEFAULT_POINTS``), a plain
    number within the route's bounds; None: leave the request to the route."""
    if not raw:
        return DEFAULT_POINTS
    name, sep, value = raw.partition(b"=")
    if name != b"max_points" or not sep or not (value.isdigit() and len(value) <= 6):
        return None
    points = int(value)
    return points if 1 <= points <= MAX_POINTS else None
