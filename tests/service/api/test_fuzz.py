"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis).

Bounded in time: few examples per operation. Checks: no 5xx, every answer matches the
schema and status codes the document declares, malformed input is rejected.
"""

from __future__ import annotations

import tempfile

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings

_tmp = tempfile.TemporaryDirectory(prefix="lrserve-fuzz-")
app = create_app(Settings(db=f"sqlite:///{_tmp.name}/fuzz.db", max_jump=500, max_ahead=500))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)

CHECKS = (not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance, negative_data_rejection)


@pytest.fixture(scope="module", autouse=True)
def running_app():
    """Run the app's lifespan (opens the store) around every fuzzed call, with a run to hit."""
    with TestClient(app) as client:
        client.post("/v1/runs", json={"run_id": "r", "schedule": {"type": "StepLR", "step_size": 2},
                                      "base_lrs": [0.1]})
        yield
    _tmp.cleanup()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_and_keeps_its_schema(case):
    case.call_and_validate(checks=CHECKS)
