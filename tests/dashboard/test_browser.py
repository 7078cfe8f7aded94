"""The dashboard in a real Chromium against a real server: what an operator sees and does."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from tests.dashboard.conftest import screenshot
from tests.dashboard.seed import RANGE_TEST, RANGE_TEST_RUN, RUNS, range_test_loss

pytestmark = pytest.mark.slow

MARKED = {"plateau_reduction", "control", "status", "barrier_timeout", "schedule_switch"}


def vertices(path_d: str) -> int:
    """Points of an SVG path drawn by the dashboard: one M or L command each."""
    return len(re.findall(r"[ML]", path_d))


def finite(values: list) -> int:
    return sum(isinstance(v, (int, float)) for v in values)


def test_runs_page_lists_filters_and_refreshes(page, live):
    server, http = live
    page.goto(f"{server.url}/")
    rows = page.locator("#runs-table tbody tr")
    expect(rows).to_have_count(len(RUNS))
    for run in http.get("/v1/runs").json()["data"]:
        row = page.locator(f'tr[data-run-id="{run["run_id"]}"]')
        expect(row).to_have_attribute("data-status", run["status"])
        expect(row.locator('[data-col="horizon"]')).to_have_text(str(run["horizon"]))
        for key, value in run["labels"].items():
            expect(row.locator(".chip", has_text=f"{key}:{value}")).to_be_visible()
        expect(row.locator("svg.sparkline path")).to_have_count(1)
    expect(page.locator('tr[data-run-id="resnet50-a1"] [data-col="metric"]')).to_contain_text(
        "val_loss"
    )
    page.set_viewport_size({"width": 1360, "height": 420})  # the table, not a screen of blank page
    screenshot(page, "runs.png")

    page.fill("#filter-label", "team:nlp")
    page.press("#filter-label", "Enter")
    expect(rows).to_have_count(2)
    page.select_option("#filter-status", "held")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-run-id", "gpt-small-3")
    assert "label=team%3Anlp" in page.url and "status=held" in page.url

    page.click("text=Clear")
    expect(rows).to_have_count(len(RUNS))
    page.locator('tr[data-run-id="resnet50-a1"] .chip', has_text="team:vision").click()
    expect(rows).to_have_count(2)  # a label chip filters by itself
    expect(page.locator("#filter-label")).to_have_value("team:vision")
    page.click("text=Clear")
    expect(rows).to_have_count(len(RUNS))
    horizon = http.get("/v1/runs/bert-base-ft").json()["horizon"]
    http.get(
        "/v1/runs/bert-base-ft/lr", params={"step": horizon + 1, "ahead": 9}
    ).raise_for_status()
    cell = page.locator('tr[data-run-id="bert-base-ft"] [data-col="horizon"]')
    expect(cell).to_have_text(str(horizon + 10), timeout=8000)  # the page refreshes itself


def test_run_page_draws_history_points_and_events(page, live):
    server, http = live
    page.goto(f"{server.url}/#/runs/resnet50-a1")
    lr_path = page.locator('[data-chart="lr"] path.series')
    expect(lr_path).to_have_count(1)
    history = http.get("/v1/runs/resnet50-a1/history", params={"max_points": 500}).json()
    assert vertices(lr_path.get_attribute("d")) == len(history["lrs"]["steps"]) == 81
    # stairs: each LR holds until the next point (an "H" run), then steps to the next value
    assert lr_path.get_attribute("data-shape") == "stairs" and "H" in lr_path.get_attribute("d")
    for name, series in history["metrics"].items():
        path = page.locator(f'[data-chart="metric:{name}"] path.series')
        assert vertices(path.get_attribute("d")) == finite(series["values"]) > 0
    marked = [e for e in history["events"] if e["kind"] in MARKED]
    assert any(e["kind"] == "plateau_reduction" for e in marked)
    expect(page.locator('[data-chart="lr"] .event-marker')).to_have_count(len(marked))
    expect(page.locator("#events-table tbody tr")).to_have_count(len(history["events"]))
    expect(page.locator("#run-spec")).to_contain_text("ReduceLROnPlateau")
    screenshot(page, "run.png")

    page.select_option("#max-points", "100")  # downsampled by the server, drawn as given
    expect(page.locator("#charts")).to_have_attribute("data-lr-points", "81")
    bert = http.get("/v1/runs/bert-base-ft/history", params={"max_points": 100}).json()
    page.goto(f"{server.url}/#/runs/bert-base-ft")
    groups = page.locator('[data-chart="lr"] path.series')
    expect(groups).to_have_count(2)  # one curve per param group
    expect(page.locator("#charts")).to_have_attribute(
        "data-lr-points", str(len(bert["lrs"]["steps"]))
    )
    assert len(bert["lrs"]["steps"]) == 100
    assert [vertices(groups.nth(g).get_attribute("d")) for g in range(2)] == [100, 100]


def test_run_page_says_it_shows_the_latest_events_of_more(page, live):
    """A history shows the run's latest ``max_points`` events; the page says so, newest first."""
    server, http = live
    http.post("/v1/runs", json={"run_id": "many-events", "schedule": {"type": "StepLR", "step_size": 10},
                                "base_lrs": [0.1]}).raise_for_status()
    for i in range(120):
        http.post("/v1/runs/many-events/control",
                  json={"action": "scale", "factor": 1.0, "reason": f"#{i}"}).raise_for_status()
    page.goto(f"{server.url}/#/runs/many-events")
    expect(page.locator("#events-table tbody tr")).to_have_count(121)  # 500 points: every one
    expect(page.locator("#events-cut")).to_have_count(0)
    page.select_option("#max-points", "100")
    expect(page.locator("#events-cut")).to_have_text("The latest 100 of 121 events.")
    expect(page.locator("#events-table tbody tr")).to_have_count(100)
    expect(page.locator("#events-table tbody tr .event-reason").first).to_have_text("“#119”")


def test_run_page_says_a_long_runs_band_is_replayed_then_draws_it(page, live):
    """A guarded run of 20,000 reports: the page's first view of its spike guard is answered
    while the server replays them in the background; the page says so, and draws the band at
    a later refresh."""
    server, http = live
    guard = {"type": "SpikeGuard", "schedule": {"type": "StepLR", "step_size": 100}}
    body = {"run_id": "long-guarded", "schedule": guard, "base_lrs": [0.1]}
    http.post("/v1/runs", json=body).raise_for_status()
    for first in (1, 10_001):
        records = [{"step": step, "name": "loss", "value": 1.0 + 0.01 * (step % 7), "rank": 0}
                   for step in range(first, first + 10_000)]
        http.post("/v1/runs/long-guarded/metrics", json={"records": records}).raise_for_status()
    for step in (10_000, 20_000):
        http.get("/v1/runs/long-guarded/lr", params={"step": step}).raise_for_status()
    page.goto(f"{server.url}/#/runs/long-guarded")
    expect(page.locator("#band-replaying")).to_have_text("spike guard: replaying its reports")
    expect(page.locator("#band-replaying")).to_have_count(0, timeout=30_000)  # the page refreshes every 4 s
    expect(page.locator("h3", has_text="loss").locator(".badge", has_text="spike guard")).to_have_count(1)


def test_operator_action_is_confirmed_and_lands_on_the_run(page, live):
    server, http = live
    page.goto(f"{server.url}/#/runs/bert-base-ft")
    expect(page.locator("#session-badge")).to_have_text("open server")
    page.fill("#ctl-factor", "0.5")
    page.click('button[data-action="scale"]')
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Multiply the current LRs by 0.5")
    page.click("#confirm-cancel")
    expect(page.locator("#control-message")).to_have_text("Cancelled.")
    assert not [
        e
        for e in http.get("/v1/runs/bert-base-ft/history").json()["events"]
        if e["kind"] == "control"
    ]

    horizon = http.get("/v1/runs/bert-base-ft").json()["horizon"]
    page.click('button[data-action="scale"]')
    page.click("#confirm-ok")
    expect(page.locator("#control-message")).to_contain_text("scale applied at step")
    applied = int(re.search(r"step (\d+)", page.locator("#control-message").inner_text()).group(1))
    assert applied == horizon + 1
    controls = [
        e
        for e in http.get("/v1/runs/bert-base-ft/history").json()["events"]
        if e["kind"] == "control"
    ]
    assert [(e["action"], e["factor"], e["step"]) for e in controls] == [("scale", 0.5, applied)]
    expect(page.locator('#events-table tr[data-kind="control"]')).to_have_count(1)
    expect(page.locator('#events-table tr[data-kind="control"] .event-actor')).to_have_text("local")

    page.fill("#ctl-at", str(applied - 1))  # below the horizon: the server's 422 lands at the field
    page.click('button[data-action="hold"]')
    page.click("#confirm-ok")
    expect(page.locator('[data-field-error="at_step"]')).to_contain_text(
        "must be above the horizon"
    )


def test_designer_draws_preview_and_shows_field_errors(page, live):
    server, _ = live
    page.goto(f"{server.url}/#/designer")
    curve = page.locator('[data-chart="preview"] path.series')
    expect(curve).to_have_count(1)
    assert vertices(curve.get_attribute("d")) == 300  # steps 0..299 of the example

    page.fill("#designer-spec", '{"type": "MultiStepLR", "milestones": [30, 10]}')
    page.click("#designer-preview")
    error = page.locator('[data-field-error="schedule"]')
    expect(error).to_contain_text("schedule.milestones: must be strictly increasing")
    expect(page.locator("#designer-spec")).to_have_attribute("aria-invalid", "true")

    page.fill("#designer-spec", '{"type": "StepLR", "step_size": 10}')
    page.fill("#designer-base-lrs", "-1")
    page.click("#designer-preview")
    expect(page.locator('[data-field-error="base_lrs"]')).to_contain_text(
        "base_lrs.0: expected a value >= 0, got -1")  # worded as spec errors are
    expect(error).to_be_hidden()

    page.fill("#designer-base-lrs", "0.1, 0.01")
    page.fill("#designer-steps", "50")
    page.click("#designer-preview")
    expect(curve).to_have_count(2)
    expect(page.locator('[data-field-error="base_lrs"]')).to_be_hidden()


def post_loss(http, run_id: str, step: int, loss: float) -> dict:
    """One step with its loss; Python's JSON (as the client sends it), so NaN travels too."""
    body = json.dumps({"step": step, "metrics": {"loss": loss}})
    answer = http.post(
        f"/v1/runs/{run_id}/step", content=body, headers={"content-type": "application/json"}
    )
    return answer.raise_for_status().json()


def test_lr_finder_panel_draws_the_curve_suggestions_and_choice(page, live):
    server, http = live
    finder = http.get(f"/v1/runs/{RANGE_TEST_RUN}/lr-finder").json()
    assert finder["done"] and finder["switched_at"] is not None and finder["chosen"] is not None
    page.goto(f"{server.url}/#/runs/{RANGE_TEST_RUN}")
    panel = page.locator("#lr-finder")
    expect(panel).to_be_visible()
    curve = panel.locator('[data-chart="lr-finder"] path.series')
    expect(curve).to_have_count(1)
    assert vertices(curve.get_attribute("d")) == finite(finder["losses"]) > 10
    expect(panel.locator("#finder-status")).to_have_text(f"switched at step {finder['switched_at']}")
    expect(panel.locator("#finder-switched")).to_have_text(str(finder["switched_at"]))
    chosen = panel.locator("#finder-chosen")
    assert float(chosen.get_attribute("data-lr")) == finder["chosen"]
    expect(chosen).not_to_have_text("—")
    for key in ("steepest", "min_over_10", "chosen"):
        value = finder["chosen"] if key == "chosen" else finder["suggestions"][key]
        mark = panel.locator(f'[data-marker="{key}"]')
        expect(mark).to_have_count(1)
        assert float(mark.get_attribute("data-lr")) == value
    expect(panel.locator("svg")).to_contain_text("learning rate (log)")  # exponential test: log x
    expect(page.locator('[data-chart="lr"] .event-marker[data-kind="schedule_switch"]')).to_have_count(1)
    switch_row = page.locator('#events-table tr[data-kind="schedule_switch"]')
    expect(switch_row).to_contain_text("range test chose lr")
    screenshot(page, "lr-finder.png")

    page.goto(f"{server.url}/#/runs/resnet50-a1")  # no range test: no panel
    expect(page.locator('[data-chart="lr"] path.series')).to_have_count(1)
    expect(page.locator("#lr-finder")).to_be_hidden()


def test_lr_finder_panel_follows_a_running_test(page, live):
    server, http = live
    run_id = "lr-find-running"
    spec = {**RANGE_TEST, "mode": "linear", "min_lr": 1e-4, "max_lr": 0.5, "then": None}
    http.post("/v1/runs", json={"run_id": run_id, "schedule": spec, "base_lrs": [0.1]}).raise_for_status()
    try:
        lr = http.get(f"/v1/runs/{run_id}").json()["lrs"][0]
        for k in range(1, 13):
            lr = post_loss(http, run_id, k, range_test_loss(lr, k))["lrs"][0]
        page.goto(f"{server.url}/#/runs/{run_id}")
        panel = page.locator("#lr-finder")
        expect(panel.locator("#finder-status")).to_have_text("running: 12 of 100 losses")
        expect(panel.locator("#finder-chart")).to_have_attribute("data-points", "12")
        expect(panel.locator("svg")).not_to_contain_text("(log)")  # linear test: linear x
        for k, loss in ((13, float("nan")), (14, 1.0)):  # a NaN poisons the smoothed loss from there on
            post_loss(http, run_id, k, loss)
        expect(panel.locator("#finder-points")).to_have_text("12 finite of 14", timeout=8000)  # refreshed
        finder = http.get(f"/v1/runs/{run_id}/lr-finder").json()
        assert finder["losses"][12:] == ["NaN", "NaN"] and not finder["done"]
        curve = panel.locator('[data-chart="lr-finder"] path.series')
        assert vertices(curve.get_attribute("d")) == finite(finder["losses"]) == 12
        expect(panel.locator("#finder-chosen")).to_have_text("—")
        expect(panel.locator('[data-marker="chosen"]')).to_have_count(0)
    finally:
        http.delete(f"/v1/runs/{run_id}").raise_for_status()  # the runs page test counts the seeded runs


def test_designer_previews_a_range_test(page, live):
    server, _ = live
    page.goto(f"{server.url}/#/designer")
    expect(page.locator('[data-chart="preview"] path.series')).to_have_count(1)
    page.select_option("#designer-type", "LRRangeTest")
    expect(page.locator("#designer-spec")).to_have_value(re.compile(r'"type": "LRRangeTest"'))
    expect(page.locator("#designer-log")).to_be_checked()
    note = page.locator("#designer-note")
    expect(note).to_contain_text("no loss values given")
    curve = page.locator('[data-chart="preview"] path.series')
    assert vertices(curve.get_attribute("d")) == 300
    expect(page.locator('[data-field-error="schedule"]')).to_be_hidden()

    page.fill("#designer-metrics", '{"loss": [2.0, 1.9, 1.5, 1.2, 9.0, 50.0]}')
    page.click("#designer-preview")
    expect(note).to_contain_text("where the test would stop")
    expect(curve).to_have_count(1)


def test_read_only_token_sees_no_controls_and_token_stays_in_session(page, secured):
    server, _ = secured
    page.goto(f"{server.url}/#/runs/guarded")
    expect(page.locator("#banner")).to_contain_text("needs a token")
    expect(page.locator("#session-badge")).to_have_text("signed out")

    page.fill("#token-input", "r")
    page.press("#token-input", "Enter")
    expect(page.locator("#session-badge")).to_have_text("read-only")
    expect(page.locator("#session-badge")).to_have_attribute("title", "token: read (read)")  # GET /v1/whoami
    expect(page.locator('[data-chart="lr"] path.series')).to_have_count(1)
    expect(page.locator("#controls")).to_have_count(0)
    expect(page.locator("button[data-action]")).to_have_count(0)
    assert page.evaluate("sessionStorage.getItem('lrserve.token')") == "r"
    assert page.evaluate("localStorage.length") == 0

    page.fill("#token-input", "a")
    page.press("#token-input", "Enter")
    expect(page.locator("#session-badge")).to_have_text("admin")
    expect(page.locator("button[data-action]")).to_have_count(5)

    page.fill("#token-input", "wrong")
    page.press("#token-input", "Enter")
    expect(page.locator("#banner")).to_contain_text("not accepted")
    expect(page.locator("#controls")).to_have_count(0)


GUARDED = {"type": "SpikeGuard", "schedule": {"type": "CosineAnnealingLR", "T_max": 200}}


def guarded_loss(step: int) -> float:
    return 2.0 * 2.718281828 ** (-step / 60) + 0.4 + 0.02 * ((step * 7) % 5 - 2)


def test_run_page_marks_spikes_and_draws_the_guards_band(page, live):
    server, http = live
    http.post("/v1/runs", json={"run_id": "llm-guarded", "schedule": GUARDED, "base_lrs": [3e-4],
                                "world_size": 2}).raise_for_status()
    for k in range(1, 61):  # two ranks log their loss; rank 1's diverges once (NaN), rank 0's jumps 6x
        http.get("/v1/runs/llm-guarded/lr", params={"step": k}).raise_for_status()
        value = {(35, 1): float("nan"), (50, 0): guarded_loss(k) * 6}
        records = [{"step": k, "name": "loss", "rank": r, "value": value.get((k, r), guarded_loss(k))}
                   for r in (0, 1)]
        body = json.dumps({"records": records})  # Python's JSON writes NaN, as the client does
        http.post("/v1/runs/llm-guarded/metrics", content=body,
                  headers={"content-type": "application/json"}).raise_for_status()
    http.get("/v1/runs/llm-guarded/lr", params={"step": 61, "ahead": 20}).raise_for_status()
    guard = http.get("/v1/runs/llm-guarded/spike-guard").json()
    assert [(s["step"], s["rank"]) for s in guard["spikes"]] == [(35, 1), (50, 0)]

    page.goto(f"{server.url}/#/runs/llm-guarded")
    chart = page.locator('[data-chart="metric:loss"]').first
    for rank in ("0", "1"):
        band = guard["band"][rank]
        baseline = chart.locator(f'path.series.dashed[data-series="baseline (rank {rank})"]')
        upper = chart.locator(f'path.series.dashed[data-series="spike line (rank {rank})"]')
        expect(baseline).to_have_attribute("data-points", str(finite(band["baseline"])))
        expect(upper).to_have_attribute("data-points", str(finite(band["upper"])))
    markers = chart.locator('.event-marker[data-kind="loss_spike"]')
    expect(markers).to_have_count(2)
    assert sorted(int(m.get_attribute("data-step")) for m in markers.all()) == [35, 50]
    lr_markers = page.locator('[data-chart="lr"] .event-marker[data-kind="loss_spike"]')
    expect(lr_markers).to_have_count(2)  # on the LR curve too, where it backed off
    rows = page.locator('#events-table tr[data-kind="loss_spike"]')
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("rank 0 reported")
    expect(rows.last).to_contain_text(f"backoff from step {guard['spikes'][0]['applied_at']}")
    screenshot(page, "spike-guard.png")


def test_designer_marks_the_spikes_a_metric_stream_would_cause(page, live):
    server, _ = live
    page.goto(f"{server.url}/#/designer")
    losses = [round(guarded_loss(k), 4) for k in range(1, 120)]
    losses[79] = None  # no report with the 80th step()
    losses[89] = losses[88] * 8
    page.fill("#designer-spec", json.dumps(GUARDED))
    page.fill("#designer-steps", "120")
    page.fill("#designer-metrics", json.dumps({"loss": losses}))
    page.click("#designer-preview")
    marker = page.locator('[data-chart="preview"] .event-marker[data-kind="loss_spike"]')
    expect(marker).to_have_count(1)
    assert marker.get_attribute("data-step") == "90"


def test_a_live_event_arrives_on_the_run_page_without_a_reload(page, live):
    """The event list follows GET /v1/events: the page shows the event's global id, which
    only the stream carries (history has no ids), and its row, without reloading."""
    from tests.sse import read_stream

    server, http = live
    http.post("/v1/runs", json={"run_id": "live-events", "schedule": {"type": "StepLR", "step_size": 5},
                                "base_lrs": [0.1]}).raise_for_status()
    page.goto(f"{server.url}/#/runs/live-events")
    expect(page.locator("#events-live")).to_have_attribute("data-state", "live")
    expect(page.locator("#events-table tbody tr")).to_have_count(1)  # created
    http.post("/v1/runs/live-events/control", json={"action": "scale", "factor": 0.5,
                                                     "reason": "live test"}).raise_for_status()
    streamed = read_stream(f"{server.url}/v1/events", lambda ms: ms[-1].json()["kind"] == "control",
                           params={"since": 0, "run_id": "live-events"})
    control_id = streamed[-1].json()["id"]
    expect(page.locator("#events-live")).to_have_attribute("data-last-event-id", str(control_id))
    expect(page.locator("#events-live")).to_contain_text(f"#{control_id} (control)")
    expect(page.locator('#events-table tr[data-kind="control"]')).to_have_count(1)
    expect(page.locator('#events-table tr[data-kind="control"] .event-reason')).to_contain_text("live test")
    page.goto(f"{server.url}/")  # leaving the page ends its stream
    expect(page.locator("#runs-table tbody tr")).not_to_have_count(0)
    expect(page.locator("#runs-updated")).to_have_attribute("data-live", "live")


def test_fleet_action_on_the_filtered_runs_with_stale_badges(page, tmp_path):
    """An admin filters the runs page, acts on all shown runs, and sees who refused."""
    import time

    import httpx

    from tests.dashboard.conftest import _server

    server = _server(tmp_path, {"LRSERVE_STALE_AFTER_S": "1", "LRSERVE_LAST_SEEN_FLUSH_S": "0.2"})
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for run_id in ("ui-a", "ui-b", "ui-c", "other"):
                labels = {"fleet": "ui"} if run_id != "other" else {"fleet": "no"}
                http.post("/v1/runs", json={"run_id": run_id, "schedule": {"type": "StepLR", "step_size": 5},
                                            "base_lrs": [0.1], "labels": labels}).raise_for_status()
            http.post("/v1/runs/ui-c/control", json={"action": "stop"}).raise_for_status()
            http.get("/v1/runs/ui-c/lr", params={"step": 1}).raise_for_status()
            time.sleep(1.2)  # quiet for longer than LRSERVE_STALE_AFTER_S

            page.goto(f"{server.url}/#/runs?label=fleet%3Aui")
            rows = page.locator("#runs-table tbody tr")
            expect(rows).to_have_count(3)
            expect(page.locator('tr[data-run-id="ui-a"] .badge.stale')).to_be_visible()
            stopped = page.locator('tr[data-run-id="ui-c"] .badge.stale')
            expect(stopped).to_have_count(0)  # stopped: done, not stale

            page.select_option("#fleet-action", "scale")
            page.fill("#fleet-factor", "0.5")
            page.fill("#fleet-reason", "too hot")
            page.click("#fleet-apply")
            dialog = page.locator("#confirm-dialog")
            expect(dialog).to_contain_text("Multiply the current LRs by 0.5 on 3 runs (fleet:ui)")
            page.click("#confirm-cancel")
            expect(page.locator("#fleet-message")).to_have_text("Cancelled.")
            assert _controls(http, "ui-a") == []

            page.click("#fleet-apply")
            page.click("#confirm-ok")
            message = page.locator("#fleet-message")
            expect(message).to_contain_text("scale applied to 2 of 3 runs")
            expect(message).to_contain_text("ui-c")  # stopped: refused, named
            for run_id in ("ui-a", "ui-b"):
                assert _controls(http, run_id) == [("scale", 0.5, "local", "too hot")]
            assert _controls(http, "other") == []
    finally:
        server.stop()


def _controls(http, run_id):
    events = http.get(f"/v1/runs/{run_id}/history").json()["events"]
    return [(e["action"], e.get("factor"), e["actor"], e["reason"]) for e in events if e["kind"] == "control"
            and e["action"] != "stop"]
