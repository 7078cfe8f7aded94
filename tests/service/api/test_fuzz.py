"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis).

Bounded in time: few examples per operation. Checks: no 5xx, every answer matches the
schema and status codes the document declares, malformed input is rejected. Runs on
both backends: PostgreSQL refuses some text SQLite keeps (NUL characters, over-long
strings), so the fuzzer hunts exactly the inputs where a store could answer 500/503.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from lrserve.service.app import create_app
from lrserve.service.settings import Settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = (not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance, negative_data_rejection)


class _Switch:
    """An ASGI app that forwards every call to the app of the running test (one per backend).

    schemathesis binds its schema to one ASGI app when the module loads; the routes and
    their OpenAPI document do not depend on the store, so the document comes from an app
    that never opens one (no lifespan runs), and the calls go to the current test's app.
    """

    def __init__(self) -> None:
        self.app = create_app(Settings(db="sqlite:///never-opened.db"))

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


switch = _Switch()
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(switch.app.openapi())))
schema.app = switch  # what from_asgi does after fetching the document
# GET /v1/events streams until the client leaves, and TestClient waits for the end of a
# response: its parameters are checked against real servers in tests/e2e/test_event_stream.py.
schema = schema.exclude(path="/v1/events")


@pytest.fixture(scope="module")
def module_app(module_settings):
    """The app of this module's tests on one backend, lifespan running (one app per backend,
    not one per operation: the fuzzer's cases never needed a fresh database, only a run)."""
    app = create_app(module_settings.model_copy(update={"max_jump": 500, "max_ahead": 500}))
    with TestClient(app) as client:
        yield app, client


@pytest.fixture
def current_app(module_app):
    """The module's app, with a run to hit (made again if a case deleted it)."""
    app, client = module_app
    client.post("/v1/runs", json={"run_id": "r", "schedule": {"type": "StepLR", "step_size": 2},
                                  "base_lrs": [0.1]}).raise_for_status()
    switch.app = app
    return app


@schema.parametrize()
@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_and_keeps_its_schema(case, current_app):
    case.call_and_validate(checks=CHECKS)
