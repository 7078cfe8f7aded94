"""FastAPI's native OpenTelemetry: off unless the environment configures OpenTelemetry.

Recent FastAPI releases ask OpenTelemetry's API on every request whether a provider is
configured (``os.environ`` lookups); ``telemetry.fastapi_options`` decides it once when the
app is built. The requests below count those questions.
"""

from __future__ import annotations

import inspect

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from lrserve.service.app import create_app
from lrserve.service.telemetry import OTEL_SWITCHES, fastapi_options

pytestmark = pytest.mark.skipif("telemetry" not in inspect.signature(FastAPI.__init__).parameters,
                                reason="this FastAPI has no native OpenTelemetry")


def test_off_unless_the_environment_configures_opentelemetry() -> None:
    assert fastapi_options({}) == {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    for name in OTEL_SWITCHES:
        assert fastapi_options({name: "sdk"}) == {}
    assert fastapi_options({"FASTAPI_OTEL_AUTO_CONFIGURE": "TRUE"}) == {}
    assert fastapi_options({"FASTAPI_OTEL_AUTO_CONFIGURE": "false"}) != {}


def test_a_provider_the_process_set_in_code_keeps_fastapis_telemetry(monkeypatch) -> None:
    from opentelemetry import trace

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.NoOpTracerProvider())
    assert fastapi_options({}) == {}


@pytest.fixture
def provider_questions(monkeypatch):
    """How often OpenTelemetry's tracer provider is asked for."""
    from opentelemetry import trace

    asked = [0]
    real = trace.get_tracer_provider

    def counted():
        asked[0] += 1
        return real()

    monkeypatch.setattr(trace, "get_tracer_provider", counted)
    return asked


def test_requests_ask_nothing_of_opentelemetry_by_default(settings, provider_questions, monkeypatch) -> None:
    for name in (*OTEL_SWITCHES, "FASTAPI_OTEL_AUTO_CONFIGURE"):
        monkeypatch.delenv(name, raising=False)
    with TestClient(create_app(settings)) as api:
        provider_questions[0] = 0
        for _ in range(3):
            assert api.get("/healthz").status_code == 200
        assert api.post("/v1/runs", json={"run_id": "r", "schedule": {"type": "StepLR", "step_size": 2},
                                          "base_lrs": [0.1]}).status_code == 201
        assert api.get("/v1/runs/r/lr", params={"step": 0}).status_code == 200
    assert provider_questions[0] == 0


def test_a_configured_environment_keeps_fastapis_telemetry(settings, provider_questions, monkeypatch) -> None:
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    with TestClient(create_app(settings)) as api:
        provider_questions[0] = 0
        assert api.get("/healthz").status_code == 200
    assert provider_questions[0] > 0  # FastAPI asks, as it ships
