"""The hot path and the hot writes, answered before FastAPI's routing.

Profiling (docs/performance.md) showed FastAPI's routing, dependency solving and request
handling taking most of a request whose work is small: ~0.4 ms of a durable
``POST .../step`` whose commit takes ~0.3 ms. This ASGI layer answers two kinds of request
itself:

- ``GET /v1/runs/{run_id}/lr`` with a well-formed query, an authorised token and a loaded
  run, with the body the route would give: a window of final steps from memory, or one
  whose new steps it commits right here on the event loop when that needs no wait and
  little work (``RunManager.windows_now``: SQLite, the write slot free; the windows asked in
  one turn of the loop in one transaction, each answered once it is durable, as always);
  errors and work for a worker thread go on to the route;
- the writes a job makes all the time (``FastWrite``: ``POST .../step``, ``.../metrics``,
  ``.../control``, and ``POST /v1/runs``, which each of its ranks sends as it starts)
  whose request is well formed: an authorised token, a JSON body that the
  route's own request model accepts, no query string. It calls the route's own answer
  function (the route calls the same one), and maps the errors that raises with the app's
  own exception handlers, so the answers, their bodies and what is stored are the route's.

Anything else — a missing or bad token, a body the model refuses, another content type,
other routes — goes on to the FastAPI app unchanged (with the body read so far given to it
again), so the routes stay the one definition of every error answer and of the OpenAPI
document.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from lrserve.service.api.responses import window_body, window_response
from lrserve.service.api.schemas import MAX_STEP, RUN_ID_PATTERN
from lrserve.service.auth import Identity
from lrserve.service.errors import LRServeError
from lrserve.service.runs.manager import ON_LOOP_VALUES, RunManager, Window
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ROUTE = "/v1/runs/{run_id}/lr"
_RUN_ID = RUN_ID_PATTERN.strip("^$")
_PATH = re.compile(rf"/v1/runs/({_RUN_ID})/lr")  # fullmatch: `$` would also match before a final "\n"
log = logging.getLogger("lrserve")
_MAX_DIGITS = len(str(MAX_STEP))  # longer strings go to the route's 422 (never to int())
_RUN_PREFIX = "/v1/runs/{run_id}/"
RUNS = "/v1/runs"
"""``POST /v1/runs``: every rank of a job creates (joins) its run as it starts."""


@dataclass(frozen=True)
class FastWrite:
    """A ``POST`` route on one run that the fast path answers itself when its request is well formed.

    Declared next to its route, which takes its ``role`` (``deps.access(role)``) and calls its
    ``answer`` too: one definition of each.

    Attributes:
        route: The route's template (``/v1/runs/{run_id}/...``, or ``/v1/runs``: a create), as
            telemetry and liveness name it.
        body: The route's request model.
        role: The role the route requires (``Authenticator.require``).
        answer: ``answer(app, run_id, body, identity)``: the route's answer (``run_id``: the
            path's; ``""`` for ``/v1/runs``).
    """

    route: str
    body: type[BaseModel]
    role: str
    answer: Callable[[Starlette, str, Any, Identity], Awaitable[Response]]


@dataclass(eq=False)
class _Miss:
    """A ``GET .../lr`` for a window not yet final, gone on to the route (which commits it)."""

    last: int
    """The last step it asked for."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0
    """Requests waiting for it to end."""


class FastPath:
    """Serves cached windows of final values and well-formed hot writes; passes every other
    request on.

    The ranks of a job ask for the same window at nearly the same moment, and the first
    to arrive commits it. Those that arrive while it is in the route (committing in a worker
    thread, in this process) wait for it and are answered here from what it made final,
    rather than each going through the route, a worker thread and the run's lock to find
    the window final; if it fails, or made less final than they ask, they go on to the
    route as before.
    """

    def __init__(self, app: ASGIApp, writes: Sequence[FastWrite] = ()) -> None:
        self.app = app
        on_runs = [write for write in writes if write.route != RUNS]
        for write in on_runs:
            if not write.route.startswith(_RUN_PREFIX) or "/" in write.route[len(_RUN_PREFIX):]:
                raise ValueError(f"a fast write is {RUNS} or /v1/runs/{{run_id}}/<name>, not {write.route}")
        self.writes = {write.route[len(_RUN_PREFIX):]: write for write in on_runs}
        self._create = next((write for write in writes if write.route == RUNS), None)
        self._misses: dict[str, _Miss] = {}  # by run id: the GET in the route committing its next window
        self._commits: _LoopCommits | None = None
        self._write_path = re.compile(rf"/v1/runs/({_RUN_ID})/({'|'.join(map(re.escape, self.writes))})")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            if method == "GET":
                asked = self._asked(scope)
                if asked is not None:
                    await self._window(scope, receive, send, *asked)
                    return
            elif method == "POST":
                if scope["path"] == RUNS and self._create is not None:
                    await self._write(scope, receive, send, "", self._create)
                    return
                match = self._write_path.fullmatch(scope["path"]) if self.writes else None
                if match is not None:
                    await self._write(scope, receive, send, match.group(1), self.writes[match.group(2)])
                    return
        await self.app(scope, receive, send)

    async def _write(self, scope: Scope, receive: Receive, send: Send, run_id: str, write: FastWrite) -> None:
        raw, messages = await _read_body(receive)  # a body over the limit raises here (BodySizeLimit answers)
        accepted = None if raw is None else self._accept(scope, raw, write)
        if accepted is None:  # the route answers: its errors, its bodies
            await self.app(scope, _replay(messages, receive), send)
            return
        body, identity = accepted
        app: Starlette = scope["app"]
        scope["lrserve.route"] = write.route  # for the telemetry middleware (and liveness)
        scope["path_params"] = {"run_id": run_id} if run_id else {}  # as the router would have it
        await _respond(scope, receive, send, write.answer(app, run_id, body, identity))

    @staticmethod
    def _accept(scope: Scope, raw: bytes, write: FastWrite) -> tuple[BaseModel, Identity] | None:
        """The request's validated body and who sends it, or None where the route must answer.

        As FastAPI reads a JSON body: ``json.loads``, then the model's Python-mode validation
        (FastAPI's ``from_attributes=True`` left out: it changes nothing for what ``json.loads``
        gives, dicts, lists and plain values, and cost a third of the validation).
        """
        if scope.get("query_string") or _content_type(scope) != "application/json":
            return None
        state = scope["app"].state
        if getattr(state, "manager", None) is None:
            return None
        try:
            identity = state.auth.require(header(scope, b"authorization"), write.role)
        except LRServeError:
            return None  # the route answers 401/403 with its usual body
        try:
            return write.body.model_validate(json.loads(raw)), identity
        except Exception:  # noqa: BLE001 - bad JSON or a refused body: the route words the 4xx
            return None

    async def _window(
        self, scope: Scope, receive: Receive, send: Send,
        manager: RunManager, run_id: str, step: int, ahead: int,
    ) -> None:
        body = await self._answer(scope, manager, run_id, step, ahead)
        miss = self._misses.get(run_id) if body is None else None
        if miss is not None and miss.last >= step + ahead:  # being committed by a request under way
            miss.waiting += 1
            try:
                await miss.done.wait()
            finally:
                miss.waiting -= 1
            body = await self._answer(scope, manager, run_id, step, ahead)
        if body is not None:
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if run_id in self._misses:
            await self._commit(scope, receive, send, manager, run_id, step, ahead)
            return
        miss = self._misses[run_id] = _Miss(step + ahead)
        try:
            await self._commit(scope, receive, send, manager, run_id, step, ahead)
        finally:
            del self._misses[run_id]
            miss.done.set()

    async def _commit(
        self, scope: Scope, receive: Receive, send: Send,
        manager: RunManager, run_id: str, step: int, ahead: int,
    ) -> None:
        """A window to commit in a worker thread: the route's (SQLite: a refused ask, rare, and the
        route's own errors); on PostgreSQL, where every commit is one (each statement a round
        trip), the route's answer given here without FastAPI's routing, its errors mapped by the
        app's handlers as ``_write``'s are."""
        if manager.store.one_writer:
            await self.app(scope, receive, send)
            return
        scope["lrserve.route"] = ROUTE  # for the telemetry middleware (and liveness)
        scope["path_params"] = {"run_id": run_id}  # as the route would have it
        answer = manager.in_commit_thread(lambda: window_response(manager.window(run_id, step, ahead)))
        await _respond(scope, receive, send, answer)

    @staticmethod
    def _asked(scope: Scope) -> tuple[RunManager, str, int, int] | None:
        """What a well-formed, authorised ``GET .../lr`` asks (None: the route answers)."""
        match = _PATH.fullmatch(scope["path"])
        if match is None:
            return None
        query = _parse_query(scope.get("query_string", b""))
        if query is None:
            return None
        manager = reader(scope)
        if manager is None:
            return None
        return manager, match.group(1), *query

    async def _answer(
        self, scope: Scope, manager: RunManager, run_id: str, step: int, ahead: int
    ) -> bytes | None:
        window = manager.cached_window(run_id, step, ahead, most_values=ON_LOOP_VALUES)
        if window is None:
            if manager.loaded(run_id) is None:
                return None  # the route loads it, in a worker thread
            commits = self._commits
            if commits is None or commits.manager is not manager:  # a new lifespan, a new manager
                commits = self._commits = _LoopCommits(manager)
            window = await commits.window(run_id, step, ahead)
            if window is None:
                return None
        scope["lrserve.route"] = ROUTE  # for the telemetry middleware (and liveness)
        scope["path_params"] = {"run_id": window.run_id}  # as the route would have it
        # the numpy option: a window over ON_LOOP_VALUES (a cap that grew meanwhile) comes packed
        return orjson.dumps(window_body(window), option=orjson.OPT_SERIALIZE_NUMPY)


GROUPS_AT_ONCE = 1
"""PostgreSQL: how many groups of windows commit at once in this process (``_LoopCommits``)."""
_Ask = tuple[tuple[str, int, int], "asyncio.Future[Window | None]"]
"""A window asked of ``_LoopCommits`` (run, step, ahead) and the future its request awaits."""


class _LoopCommits:
    """Windows whose steps are to be committed, asked in one turn of the event loop: committed
    in one transaction as the loop's next turn begins, each answered once that transaction is
    durable. A lone request waits for nothing but that turn.

    SQLite: on the event loop itself (``RunManager.windows_now``: a commit takes microseconds).
    PostgreSQL: in one commit thread (``RunManager.windows_grouped``), the windows asked while
    no group is under way one thread's work, one transaction and two round trips however
    many runs ask (more only for runs another process appended events to), where each would
    be a thread's and a transaction's of its own; the windows asked while it commits go in
    the next one (``GROUPS_AT_ONCE``).
    """

    def __init__(self, manager: RunManager) -> None:
        self.manager = manager
        self._asks: list[_Ask] = []
        self._tasks: set[asyncio.Future[Any]] = set()  # the commit threads' groups under way
        self._scheduled = False  # a call of ``_commit`` is due in the loop's next turn
        self._under_way: dict[str, asyncio.Event] = {}  # by run: its group's end, in a commit thread

    async def window(self, run_id: str, step: int, ahead: int) -> Window | None:
        """The window, committed; None: the route answers (it would wait or is big; or an error,
        which the route meets again and answers the one way errors are answered, as a client's
        retry would: a refused ask changed nothing, a commit that went through is final).

        A run whose steps a commit thread is committing (the other ranks of its job asking the
        same window a moment later) waits for that group first: its window is likely final then.
        """
        under_way = self._under_way.get(run_id)
        if under_way is not None:
            await under_way.wait()
            window = self.manager.cached_window(run_id, step, ahead, most_values=ON_LOOP_VALUES)
            if window is not None:
                return window
        future: asyncio.Future[Window | None] = asyncio.get_running_loop().create_future()
        self._asks.append(((run_id, step, ahead), future))
        self._next_group()
        return await future

    def _next_group(self) -> None:
        """The asks so far committed as the loop's next turn begins; on PostgreSQL once fewer
        than ``GROUPS_AT_ONCE`` groups are under way (until then, the asks gather)."""
        if self._asks and not self._scheduled and (
                self.manager.store.one_writer or len(self._tasks) < GROUPS_AT_ONCE):
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._commit)

    def _commit(self) -> None:
        self._scheduled = False
        asks, self._asks = self._asks, []
        if not asks:
            return
        manager = self.manager
        windows = [ask for ask, _ in asks]
        if not manager.store.one_writer:
            done = asyncio.Event()
            for run_id, _, _ in windows:
                self._under_way[run_id] = done
            group = functools.partial(manager.windows_grouped, windows, most_values=ON_LOOP_VALUES)
            task = asyncio.ensure_future(manager.in_commit_thread(group))
            self._tasks.add(task)  # held: the loop keeps only a weak reference to a task
            task.add_done_callback(functools.partial(self._group_done, asks, done))
            return
        try:
            outcomes = manager.windows_now(windows, most_values=ON_LOOP_VALUES)
        except Exception:
            log.exception("GET .../lr on the event loop failed; the route asks again")
            outcomes = [None] * len(asks)
        _answer_asks(asks, outcomes)

    def _group_done(self, asks: list[_Ask], done: asyncio.Event, task: asyncio.Future[Any]) -> None:
        """A group's end, however it ended (cancelled too, even before it began: the server
        stopping): each ask answered (None: the route's), its runs no longer under way, and the
        asks gathered meanwhile sent as the next group."""
        self._tasks.discard(task)
        outcomes: Sequence[Window | BaseException | None] = [None] * len(asks)
        if not task.cancelled():
            error = task.exception()
            if error is None:
                outcomes = task.result()
            elif not isinstance(error, LRServeError):  # ServerStopping: the route answers each, a 503
                log.error("GET .../lr in a commit thread failed; the route asks again", exc_info=error)
        for (run_id, _, _), _ in asks:
            if self._under_way.get(run_id) is done:
                del self._under_way[run_id]
        done.set()
        _answer_asks(asks, outcomes)
        self._next_group()


def _answer_asks(asks: list[_Ask], outcomes: Sequence[Window | BaseException | None]) -> None:
    """Each ask's future: its window, or None (the route answers it: an error, or work it would wait for)."""
    for ((run_id, _, _), future), outcome in zip(asks, outcomes, strict=True):
        if isinstance(outcome, Exception) and not isinstance(outcome, LRServeError):
            log.error("GET %s/lr failed in its group; the route asks again", run_id, exc_info=outcome)
        if not future.done():  # done: cancelled, its client gone (a commit stands all the same)
            future.set_result(outcome if isinstance(outcome, Window) else None)


def _parse_query(raw: bytes) -> tuple[int, int] | None:
    """``step`` and ``ahead`` when the query holds exactly those, as plain non-negative ints
    (a parameter given empty, ``ahead=``, is kept: the route answers its 422)."""
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    params: dict[str, Any] = dict(pairs)
    if len(params) != len(pairs) or not set(params) <= {"step", "ahead"} or "step" not in params:
        return None
    values = [params["step"], params.get("ahead", "0")]
    if not all(len(v) <= _MAX_DIGITS and v.isdigit() and v.isascii() for v in values):
        return None
    step, ahead = (int(v) for v in values)
    return (step, ahead) if step <= MAX_STEP else None


async def _read_body(receive: Receive) -> tuple[bytes | None, list[Message]]:
    """The whole body (None if the client went away first), and the messages it came in."""
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None, messages
        if not message.get("more_body", False):
            return b"".join(m.get("body", b"") for m in messages), messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` for the route: the messages read here, then whatever comes next."""
    pending = messages[::-1]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


_Handler = Callable[[Request, Exception], Awaitable[Response]]


async def _respond(scope: Scope, receive: Receive, send: Send, answer: Awaitable[Response]) -> None:
    """Send a route's answer, or the app's answer to the error it raised (``_handler_for``)."""
    try:
        response = await answer
    except Exception as exc:
        handler = _handler_for(scope["app"], exc)
        if handler is None:
            raise  # as from a route: the server's error middleware answers 500 and logs it
        response = await handler(Request(scope, receive), exc)
    await response(scope, receive, send)


def _handler_for(app: Starlette, exc: Exception) -> _Handler | None:
    """The app's handler for ``exc``, looked up as Starlette's exception middleware does (by the
    class's MRO; the handler of ``Exception`` is the server-error middleware's, left to it)."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            handler: _Handler = handlers[cls]
            return handler
    return None


def _content_type(scope: Scope) -> str | None:
    value = header(scope, b"content-type")
    return None if value is None else value.split(";", 1)[0].strip().lower()


def reader(scope: Scope) -> RunManager | None:
    """The app's run manager when the request's token may read; ``None``: the route answers
    (the app is starting, or a 401/403 with its usual body)."""
    app = scope["app"]
    manager: RunManager | None = getattr(app.state, "manager", None)
    if manager is None:
        return None
    try:
        app.state.auth.require(header(scope, b"authorization"), "read")
    except LRServeError:
        return None
    return manager


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (``name`` in lower case, as ASGI gives it), or ``None``."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
