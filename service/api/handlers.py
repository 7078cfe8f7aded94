"""The one mapping from errors to HTTP answers (bodies from ``responses.error_body``).

Domain errors (``service.errors``) answer with their status and code; FastAPI's request
validation errors become a 422 ``invalid_input`` worded as spec errors are
(``service.errors.validation_message``): a field path and "expected ..., got ...".
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
import typing
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from lrserve.service.api.responses import FastJSONResponse, error_response
from lrserve.service.errors import (
    STORE_UNAVAILABLE,
    FieldError,
    InvalidInput,
    LRServeError,
    StoreUnavailable,
    field_path,
    validation_message,
)
from pydantic import BaseModel
from starlette.exceptions import HTTPException

log = logging.getLogger("lrserve")

_SOURCES = ("body", "query", "path", "header", "cookie")


def validation_errors(raw: Sequence[Any], body_model: type[BaseModel] | None = None) -> list[FieldError]:
    """FastAPI's request validation errors, as field paths and the service's words.

    ``body_model`` (the route's body) lets an unknown field's message list the accepted ones.
    """
    errors = []
    for err in raw:
        source = err.get("loc", ("body",))[0] if err.get("loc") else "body"
        loc = [p for p in err.get("loc", ()) if p not in _SOURCES]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "parse error")
            errors.append(FieldError("body", f"the body is not valid JSON ({detail})"))
            continue
        got = None
        value = err.get("input")
        if source in ("query", "path", "header") and isinstance(value, str):
            got = value if len(value) <= 40 else value[:37] + "..."  # as typed in the URL
        unknown = "unknown field"
        if err.get("type") == "extra_forbidden":
            accepted = _fields_at(body_model, loc[:-1])
            if accepted:
                unknown = f"unknown field; accepted: {', '.join(accepted)}"
        message = validation_message(err, got=got, unknown_key=unknown)
        errors.append(FieldError(field_path(loc) or "body", message))
    return errors


def _fields_at(model: Any, path: Sequence[Any]) -> list[str]:
    """The field names of the model found at ``path`` inside ``model`` ([] if none is)."""
    annotation = model
    for part in [*path, None]:
        annotation = _model_in(annotation, part)
        if annotation is None:
            return []
        if part is None:
            return list(annotation.model_fields)
        field = annotation.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
    return []


def _model_in(annotation: Any, part: Any) -> Any:
    """The pydantic model ``annotation`` holds at one step of a path (unwrapping Optional,
    lists for an index, dicts for a key)."""
    for _ in range(4):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next((a for a in args if a is not type(None)), None)
        elif origin is list and isinstance(part, int) and args:
            annotation, part = args[0], None
        elif origin is dict and len(args) == 2:
            annotation, part = args[1], None
        else:
            return None
    return None


def _body_model(request: Request) -> type[BaseModel] | None:
    route = request.scope.get("route")
    body_field = getattr(route, "body_field", None)
    annotation = getattr(getattr(body_field, "field_info", None), "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unparsable_body(cause: BaseException | None) -> InvalidInput | None:
    """Why a body that is JSON could still not be parsed, as a 422 naming the limit.

    FastAPI turns every parser failure other than bad JSON syntax into a bare 400 ("There
    was an error parsing the body"), keeping the parser's exception as ``__cause__``: an
    integer past Python's int-string limit is a ``ValueError``, nesting past the parser's
    depth a ``RecursionError``. The parser reads the whole body first, so no field is known.
    """
    if isinstance(cause, RecursionError):
        return InvalidInput.at("body", "the JSON is nested too deeply (arrays and objects within each other)")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        limit = sys.get_int_max_str_digits()
        return InvalidInput.at("body", f"an integer has more than {limit} digits (the limit is {limit})")
    return None


class _Throttled:
    """A logger that writes the same message at most once per ``every_s`` (an outage fails
    every request: one line per request would bury the log), counting what it held back."""

    def __init__(self, log: Any, every_s: float) -> None:
        self._log = log
        self._every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, fmt: str, *args: Any) -> None:
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


class _HTTPError(LRServeError):
    """Starlette's own errors (no such route, wrong method, an unreadable body) in the one shape."""

    def __init__(self, exc: HTTPException) -> None:
        errors = [FieldError("body", str(exc.detail))] if exc.status_code == 400 else []
        super().__init__(str(exc.detail), errors=errors)
        self.status_code = exc.status_code
        self.code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )


class _Internal(LRServeError):
    """What a caller reads about a bug: the details go to the log."""


def install_error_handlers(app: FastAPI) -> None:
    """Register the one mapping from errors to JSON answers on a FastAPI app."""
    store_log = _Throttled(log, every_s=5.0)

    async def on_domain_error(request: Request, exc: LRServeError) -> FastJSONResponse:
        return error_response(exc)

    async def on_store_error(request: Request, exc: StoreUnavailable) -> FastJSONResponse:
        # The store's words name the file or host: they go to the log, never to a caller.
        if not exc.logged:
            store_log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc.message)
        return error_response(StoreUnavailable(STORE_UNAVAILABLE), headers={"retry-after": "1"})

    async def on_validation_error(request: Request, exc: RequestValidationError) -> FastJSONResponse:
        return error_response(InvalidInput.many(validation_errors(exc.errors(), _body_model(request))))

    async def on_http_error(request: Request, exc: HTTPException) -> FastJSONResponse:
        if exc.status_code == 400 and (unparsable := _unparsable_body(exc.__cause__)) is not None:
            return error_response(unparsable)
        return error_response(_HTTPError(exc), headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> FastJSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(_Internal("internal error; the server log has the details"))

    # Starlette types a handler as taking any Exception; each of these takes the class it is for.
    app.add_exception_handler(LRServeError, on_domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(StoreUnavailable, on_store_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
