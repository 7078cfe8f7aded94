"""One spelling of non-finite numbers in every answer: "NaN", "Infinity", "-Infinity".

Before: history said ``null`` for NaN, inf and -inf alike while a plateau decision's event
said ``"nan"`` (issue 13).
"""

from __future__ import annotations

import math

from tests.adversarial.conftest import post_json
from tests.specs import plateau

PLATEAU = plateau()


def test_history_metrics_and_events_spell_non_finite_numbers_alike(http):
    body = {"run_id": "nonfinite", "schedule": PLATEAU, "base_lrs": [0.1]}
    assert http.post("/v1/runs", json=body).status_code == 201
    for step, loss in enumerate([1.0, math.nan, math.inf, -math.inf], start=1):
        response = post_json(http, "/v1/runs/nonfinite/step", {"step": step, "metrics": {"val_loss": loss}})
        assert response.status_code == 200, response.text
    points = ((9, math.nan), (10, math.inf), (11, -1.5))
    logged = [{"step": s, "name": "grad_norm", "value": v} for s, v in points]
    assert post_json(http, "/v1/runs/nonfinite/metrics", {"records": logged}).status_code == 202

    history = http.get("/v1/runs/nonfinite/history").json()
    assert history["metrics"]["val_loss"]["values"] == [1.0, "NaN", "Infinity", "-Infinity"]
    assert history["metrics"]["grad_norm"]["values"] == ["NaN", "Infinity", -1.5]
    reductions = [e for e in history["events"] if e["kind"] == "plateau_reduction"]
    # NaN and +inf do not improve on 1.0 (patience 0: each reduces); -inf does.
    assert [e["value"] for e in reductions] == ["NaN", "Infinity"]


def test_openapi_documents_the_spelling(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    for model, field in (("HistoryPublic", "metrics"), ("HistoryPublic", "events"), ("PreviewResult", "lrs")):
        assert '"NaN", "Infinity", "-Infinity"' in schemas[model]["properties"][field]["description"]
