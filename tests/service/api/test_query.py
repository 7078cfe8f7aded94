"""``SingleQueryValues``: a repeated query parameter is a 422 unless a route declares it a list."""

from __future__ import annotations

from lrserve.service.api.query import SingleQueryValues


def test_distinct_parameters_never_ask_for_the_routes_lists():
    """Which parameters are lists comes from the OpenAPI document (built on first use, ~0.4 s
    of the event loop): a query without a repeated parameter must not build it."""
    asked = []

    def repeatable() -> frozenset[str]:
        asked.append(1)
        return frozenset({"label"})

    layer = SingleQueryValues(app=None, repeatable=repeatable)  # type: ignore[arg-type]
    assert layer._check(b"step=1&ahead=49") is None
    assert asked == []
    assert layer._check(b"label=a:1&label=b:2") is None
    error = layer._check(b"step=1&step=2")
    assert error is not None and "given 2 times" in str(error)
    assert asked == [1]  # once, then kept
