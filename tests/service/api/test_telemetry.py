"""The request metrics: every answer counted and timed by method, route template and status,
the fast layer's answers included; the labelled children looked up once per kind of answer."""

from __future__ import annotations

from tests.service.api.conftest import make_run


def test_each_answer_is_counted_and_timed_by_route_and_status_looking_its_labels_up_once(app, api):
    telemetry = app.state.telemetry
    make_run(api, "t")
    looked_up: list[tuple[str, ...]] = []
    for metric in (telemetry.requests, telemetry.latency):
        labels = metric.labels

        def counted(*values: str, _labels=labels) -> object:
            looked_up.append(values)
            return _labels(*values)

        metric.labels = counted  # the real lookup, counted
    for step in range(5):
        assert api.get(f"/v1/runs/t/lr?step={step}").status_code == 200  # the fast layer's answer
        assert api.get("/v1/runs/nope").status_code == 404
    assert api.get("/v1/runs/t/lr?step=-1").status_code == 422
    sample = telemetry.registry.get_sample_value
    lr, run = "/v1/runs/{run_id}/lr", "/v1/runs/{run_id}"
    assert sample("lrserve_requests_total", {"method": "GET", "route": lr, "status": "200"}) == 5
    assert sample("lrserve_requests_total", {"method": "GET", "route": run, "status": "404"}) == 5
    assert sample("lrserve_requests_total", {"method": "GET", "route": lr, "status": "422"}) == 1
    assert sample("lrserve_request_seconds_count", {"method": "GET", "route": lr}) == 6
    assert sample("lrserve_request_seconds_count", {"method": "GET", "route": run}) == 5
    assert sample("lrserve_request_seconds_sum", {"method": "GET", "route": lr}) > 0
    # looked up once per kind of answer (method, route, status): 3 kinds, 2 metrics; 22 before
    assert len(looked_up) == 6


def test_past_the_kept_kinds_answers_are_still_counted_and_nothing_more_is_kept(app, api, monkeypatch):
    """Methods are the client's: past ``_KEPT_ANSWERS`` kinds of answer nothing more is kept
    (memory stays bounded), and those answers are counted all the same."""
    import lrserve.service.telemetry as telemetry_module

    telemetry = app.state.telemetry
    monkeypatch.setattr(telemetry_module, "_KEPT_ANSWERS", len(telemetry._answered) + 1)
    for _ in range(3):
        assert api.get("/v1/runs/a").status_code == 404
        assert api.get("/v1/runs").status_code == 200
    assert len(telemetry._answered) == telemetry_module._KEPT_ANSWERS
    sample = telemetry.registry.get_sample_value
    for route, status in (("/v1/runs/{run_id}", "404"), ("/v1/runs", "200")):
        assert sample("lrserve_requests_total", {"method": "GET", "route": route, "status": status}) == 3
