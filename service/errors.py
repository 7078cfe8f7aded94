"""Domain errors, and the one place that turns them into HTTP answers.

Handlers and the engine raise these; ``install_error_handlers`` maps every one of
them (and FastAPI's own validation errors) to a JSON body of one shape::

    {"detail": "schedule.milestones: must be strictly increasing",
     "code": "invalid_spec",
     "errors": [{"field": "schedule.milestones", "message": "must be strictly increasing"}]}

so a user always reads what was wrong and where, never a stack trace.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One problem with one field; ``field`` is a dotted path such as ``schedule.schedulers.1.T_max``."""

    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


def field_path(loc: Iterable[Any]) -> str:
    """Join a location tuple (``("schedule", "schedulers", 1)``) into ``schedule.schedulers.1``."""
    return ".".join(str(part) for part in loc)


class LRServeError(Exception):
    """Root of every error the service reports on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, errors: Sequence[FieldError] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.errors = list(errors)

    def body(self) -> dict[str, Any]:
        return {
            "detail": self.message,
            "code": self.code,
            "errors": [e.as_dict() for e in self.errors],
        }


class InvalidInput(LRServeError):
    """A request field has a value the service cannot accept."""

    status_code = 422
    code = "invalid_input"

    @classmethod
    def at(cls, field: str, message: str) -> InvalidInput:
        return cls(f"{field}: {message}", errors=[FieldError(field, message)])

    @classmethod
    def many(cls, errors: Sequence[FieldError]) -> InvalidInput:
        return cls("; ".join(f"{e.field}: {e.message}" for e in errors), errors=errors)


class SpecError(InvalidInput):
    """A schedule spec is invalid; every problem names its field path."""

    code = "invalid_spec"


class ScheduleError(InvalidInput):
    """The schedule cannot produce a value at the asked step (torch itself would raise there)."""

    code = "schedule_error"


class LimitExceeded(LRServeError):
    """A request is larger than a configured limit."""

    status_code = 413
    code = "limit_exceeded"


class RunNotFound(LRServeError):
    """No run has this id."""

    status_code = 404
    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} does not exist", errors=[FieldError("run_id", "not found")])
        self.run_id = run_id


class RunConflict(LRServeError):
    """The run exists with a different spec, or the request contradicts the run's state."""

    status_code = 409
    code = "run_conflict"


class Unauthorized(LRServeError):
    """Missing or unknown bearer token."""

    status_code = 401
    code = "unauthorized"


class Forbidden(LRServeError):
    """The token's role may not use this route."""

    status_code = 403
    code = "forbidden"


class StoreUnavailable(LRServeError):
    """The database could not be reached or refused the write."""

    status_code = 503
    code = "store_unavailable"
    logged = False  # True where the raiser already told the log (once per fault, not per request)


STORE_UNAVAILABLE = "the database is unavailable; retry later (the server log says why)"
"""The only words a caller reads about a store failure: its details name server files and hosts."""


class _Throttled:
    """A logger that writes the same message at most once per ``every_s`` (an outage fails
    every request: one line per request would bury the log), counting what it held back."""

    def __init__(self, log: Any, every_s: float) -> None:
        import threading

        self._log = log
        self._every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, fmt: str, *args: Any) -> None:
        import time

        key = str(args[-1]) if args else fmt
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-self._every_s, 0))
            if now - last < self._every_s:
                self._last[key] = (last, held + 1)
                return
            if len(self._last) > 1000:
                self._last.clear()
            self._last[key] = (now, 0)
        self._log.warning(fmt + (" (and %d more like it)" if held else ""), *args, *((held,) if held else ()))


class OutageLog:
    """What a background loop (the liveness flusher, the event feed, webhooks) says about its
    database: one warning when it first fails, one when it works again, nothing in between
    however often the loop retries (it retries every second or so: a line per try buries
    the log during an outage)."""

    def __init__(self, log: Any, loop: str, failing: str) -> None:
        import threading

        self._log = log
        self._loop = loop
        self._failing = failing
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic start of the outage; None while working
        self._tries = 0

    def failed(self, exc: BaseException) -> None:
        """A try failed: the first failure of an outage is logged (on one line)."""
        import time

        with self._lock:
            self._tries += 1
            if self._since is not None:
                return
            self._since = time.monotonic()
        self._log.warning("%s: %s: %s (said once; a line follows when it is back)",
                          self._loop, self._failing, " ".join(str(exc).split()))

    def ok(self) -> None:
        """A try worked: the end of an outage is logged, with how long it lasted."""
        import time

        if self._since is None:  # the usual case: no lock
            return
        with self._lock:
            if self._since is None:
                return
            lasted, tries = time.monotonic() - self._since, self._tries
            self._since, self._tries = None, 0
        self._log.warning("%s: the database is back after %.1f s, %d failed tries (it was: %s)",
                          self._loop, lasted, tries, self._failing)


def _validation_errors(raw: Sequence[Any]) -> list[FieldError]:
    """FastAPI's request validation errors, as field paths and plain words."""
    errors = []
    for err in raw:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            loc = ["body"]  # FastAPI puts the character offset here, not a field
            message = f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        if err.get("type") == "missing" and not loc:
            loc = ["body"]
        errors.append(FieldError(field_path(loc) or "body", message))
    return errors


def _unparsable_body(cause: BaseException | None) -> InvalidInput | None:
    """Why a body that is JSON could still not be parsed, as a 422 naming the limit.

    FastAPI turns every parser failure other than bad JSON syntax into a bare 400 ("There
    was an error parsing the body"), keeping the parser's exception as ``__cause__``: an
    integer past Python's int-string limit is a ``ValueError``, nesting past the parser's
    depth a ``RecursionError``. The parser reads the whole body first, so no field is known.
    """
    import sys

    if isinstance(cause, RecursionError):
        return InvalidInput.at("body", "the JSON is nested too deeply (arrays and objects within each other)")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        limit = sys.get_int_max_str_digits()
        return InvalidInput.at("body", f"an integer has more than {limit} digits (the limit is {limit})")
    return None


def install_error_handlers(app: Any) -> None:
    """Register the one mapping from errors to JSON answers on a FastAPI app."""
    import logging

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from service.api.responses import FastJSONResponse

    log = logging.getLogger("lrserve")

    async def on_domain_error(request: Any, exc: LRServeError) -> FastJSONResponse:
        return FastJSONResponse(exc.body(), status_code=exc.status_code)

    store_log = _Throttled(log, every_s=5.0)

    async def on_store_error(request: Any, exc: StoreUnavailable) -> FastJSONResponse:
        # The store's words name the file or host: they go to the log, never to a caller.
        if not exc.logged:
            store_log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc.message)
        return FastJSONResponse(StoreUnavailable(STORE_UNAVAILABLE).body(), status_code=503,
                                headers={"retry-after": "1"})

    async def on_validation_error(request: Any, exc: RequestValidationError) -> FastJSONResponse:
        return await on_domain_error(request, InvalidInput.many(_validation_errors(exc.errors())))

    async def on_http_error(request: Any, exc: HTTPException) -> FastJSONResponse:
        if exc.status_code == 400 and (unparsable := _unparsable_body(exc.__cause__)) is not None:
            return await on_domain_error(request, unparsable)
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        errors = [{"field": "body", "message": str(exc.detail)}] if exc.status_code == 400 else []
        body = {"detail": str(exc.detail), "code": code, "errors": errors}
        return FastJSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Any, exc: Exception) -> FastJSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = {
            "detail": "internal error; the server log has the details",
            "code": "internal_error",
            "errors": [],
        }
        return FastJSONResponse(body, status_code=500)

    app.add_exception_handler(LRServeError, on_domain_error)
    app.add_exception_handler(StoreUnavailable, on_store_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
