"""Query strings: a parameter given twice is a 422, never last-one-wins.

Starlette keeps every value of a repeated parameter and FastAPI reads the last one for a
scalar, so ``?step=1&step=2`` would silently mean step 2. This ASGI layer answers 422,
naming the parameter, for any repeated parameter that no route declares as a list (such
as ``label``); it reads the query only when it holds more than one parameter.
"""

from __future__ import annotations

import typing
from collections import Counter
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI
from lrserve.service.api.responses import error_body
from lrserve.service.errors import InvalidInput
from starlette.types import ASGIApp, Receive, Scope, Send


def repeatable_parameters(app: FastAPI) -> frozenset[str]:
    """Names of the query parameters some route declares as a list (may be repeated)."""
    names = set()
    for operations in app.openapi().get("paths", {}).values():  # the routes as documented
        for operation in operations.values():
            for param in operation.get("parameters", []):
                schema = param.get("schema", {})
                kinds = [schema, *schema.get("anyOf", [])]
                if param.get("in") == "query" and any(k.get("type") == "array" for k in kinds):
                    names.add(param["name"])
    return frozenset(names)


class SingleQueryValues:
    """Answers 422 when a query parameter that is not a list appears more than once."""

    def __init__(self, app: ASGIApp, repeatable: typing.Callable[[], frozenset[str]]) -> None:
        self.app = app
        self._repeatable_of = repeatable
        self._repeatable: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and b"&" in scope.get("query_string", b""):
            error = self._check(scope["query_string"])
            if error is not None:
                body = orjson.dumps(error_body(error))
                await send({"type": "http.response.start", "status": error.status_code, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _check(self, raw: bytes) -> InvalidInput | None:
        counts = Counter(key for key, _ in parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
        for key, n in counts.items():
            if n > 1 and key not in self._repeatable_names():
                return InvalidInput.at(key[:64], f"given {n} times; give it once")
        return None

    def _repeatable_names(self) -> frozenset[str]:
        """Asked only for a query with a repeated parameter: reading them builds the OpenAPI
        document (~0.4 s of the event loop, the first time), which ``?step=1&ahead=9`` must not wait for."""
        if self._repeatable is None:
            self._repeatable = self._repeatable_of()  # the routes are all known by the first request
        return self._repeatable
