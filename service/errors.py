"""Domain errors, and the words of validation messages.

Handlers and the engine raise these; ``service.api.handlers`` maps every one of them (and
FastAPI's own validation errors) to one JSON body (``service.api.responses.error_body``)::

    {"detail": "schedule.milestones: must be strictly increasing",
     "code": "invalid_spec",
     "errors": [{"field": "schedule.milestones", "message": "must be strictly increasing"}]}

so a user always reads what was wrong and where, never a stack trace.

**One voice.** A request body's fields and a schedule spec's arguments are both checked by
pydantic; ``validation_message`` words both alike ("expected a value >= 0, got -1"), so
a bad ``base_lrs`` and a bad ``step_size`` read the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


@dataclass(frozen=True)
class FieldError:
    """One problem with one field; ``field`` is a dotted path such as ``schedule.schedulers.1.T_max``."""

    field: str
    message: str


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


class HeadTooLarge(LRServeError):
    """A request's line and headers are larger than the server reads (the connection is closed
    after the answer)."""

    status_code = 431
    code = "request_head_too_large"


class RequestTimeout(LRServeError):
    """The request was not received in time (the connection is closed after the answer)."""

    status_code = 408
    code = "request_timeout"


class TooManyConnections(LRServeError):
    """The server holds as many connections as it may; this one is closed."""

    status_code = 503
    code = "too_many_connections"


class ServerStopping(LRServeError):
    """The server is shutting down: it takes no new commits (another replica, or this one
    restarted, will)."""

    status_code = 503
    code = "server_stopping"


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


def describe(value: Any) -> str:
    """Name a JSON value the way a user wrote it: ``the string '5'``, ``NaN``, ``true``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() < 100 else f"an integer with {len(str(value))} digits"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_MESSAGES = {
    "missing": "required, but missing",
    "int_type": "expected an integer, got {got}",
    "int_parsing": "expected an integer, got {got}",
    "int_from_float": "expected an integer, got {got}",
    "float_type": "expected a number, got {got}",
    "float_parsing": "expected a number, got {got}",
    "finite_number": "expected a finite number, got {got}",
    "bool_type": "expected true or false, got {got}",
    "bool_parsing": "expected true or false, got {got}",
    "string_type": "expected a string, got {got}",
    "list_type": "expected a list, got {got}",
    "literal_error": "expected {expected}, got {got}",
    "enum": "expected {expected}, got {got}",
    "greater_than": "expected a value > {gt}, got {got}",
    "greater_than_equal": "expected a value >= {ge}, got {got}",
    "less_than": "expected a value < {lt}, got {got}",
    "less_than_equal": "expected a value <= {le}, got {got}",
    "string_too_short": "expected at least {min_length} characters, got {got}",
    "string_too_long": "expected at most {max_length} characters, got {got}",
    "string_pattern_mismatch": "expected text matching {pattern}, got {got}",
    "model_attributes_type": "expected an object, got {got}",
    "model_type": "expected an object, got {got}",
    "dict_type": "expected an object, got {got}",
}


def validation_message(
    error: ErrorDetails, *, got: str | None = None, unknown_key: str = "unknown field"
) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) in the service's words.

    ``got`` names the value received (default: ``describe`` of the error's input);
    ``unknown_key`` is what an ``extra_forbidden`` error says (the caller knows what was
    accepted there).
    """
    kind = error["type"]
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v  # ">= 0", not ">= 0.0"
           for k, v in (error.get("ctx") or {}).items()}
    if got is None:
        got = describe(error.get("input"))
    if kind == "extra_forbidden":
        return unknown_key
    if kind == "value_error":  # a model validator's own words
        return str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    template = _MESSAGES.get(kind)
    if template is not None:
        return template.format(got=got, **ctx)
    if kind in ("too_short", "too_long"):
        most = kind == "too_long"
        bound = ("at most", ctx.get("max_length")) if most else ("at least", ctx.get("min_length"))
        return f"expected {bound[0]} {bound[1]} items, got {ctx.get('actual_length', '?')}"
    return f"{error.get('msg', 'invalid value')}, got {got}"
