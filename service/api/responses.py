"""A JSON response rendered by orjson: fast, exact floats.

Non-finite numbers are spelled "NaN" / "Infinity" / "-Infinity" before they get here
(``service.engine.codec.public_float``); orjson would write ``null``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
