"""JSON codec for engine snapshots.

torch's ``state_dict()`` is not plain JSON: MultiStepLR keeps a ``Counter`` with int
keys, ReduceLROnPlateau holds ``inf``, some fields are tuples. This codec tags those
so a snapshot reloads to the identical Python objects, floats bit for bit.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

_TAGS = ("$float", "$counter", "$tuple", "$dict")


def to_jsonable(value: Any) -> Any:
    """Turn a state dict into JSON-safe data, tagging what JSON cannot say."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, Counter):
        return {"$counter": [[to_jsonable(k), to_jsonable(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"$tuple": [to_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: to_jsonable(v) for k, v in value.items()}
        return {"$dict": [[to_jsonable(k), to_jsonable(v)] for k, v in value.items()]}
    raise TypeError(f"cannot snapshot a {type(value).__name__}: {value!r}")


def from_jsonable(value: Any) -> Any:
    """Inverse of ``to_jsonable``."""
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$float":
            return float(inner)
        if tag == "$counter":
            return Counter({from_jsonable(k): from_jsonable(v) for k, v in inner})
        if tag == "$tuple":
            return tuple(from_jsonable(v) for v in inner)
        if tag == "$dict":
            return {from_jsonable(k): from_jsonable(v) for k, v in inner}
    return {k: from_jsonable(v) for k, v in value.items()}


def dumps(state: Any) -> str:
    """Serialise a snapshot; floats keep their exact value (``repr`` round-trips)."""
    return json.dumps(to_jsonable(state), allow_nan=False, separators=(",", ":"))


def loads(text: str) -> Any:
    return from_jsonable(json.loads(text))
