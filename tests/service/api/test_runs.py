"""Runs: idempotent create, list, read, delete, and what bad input gets."""

from __future__ import annotations

import asyncio
import threading

import pytest
from lrserve.service.api.routes.runs import Creates
from lrserve.service.api.schemas import ControlRequest, FleetControlRequest
from lrserve.service.errors import RunConflict, ScheduleError, StoreUnavailable
from lrserve.service.runs import manager as manager_module
from lrserve.service.runs.manager import RunManager
from lrserve.service.store import open_store

from tests.service.api.conftest import make_run

STEP = {"type": "StepLR", "step_size": 3, "gamma": 0.5}


def test_create_answers_201_then_200_for_the_same_spec(api):
    body = {"run_id": "a", "schedule": STEP, "base_lrs": [0.1, 0.01], "labels": {"sweep": "7"}}
    first = api.post("/v1/runs", json=body)
    again = api.post("/v1/runs", json=body)
    assert first.status_code == 201 and again.status_code == 200
    run = first.json()
    assert run["horizon"] == 0 and run["lrs"] == [0.1, 0.01] and run["status"] == "active"
    assert run["momentums"] is None and run["labels"] == {"sweep": "7"}
    assert again.json()["run_id"] == "a"


def test_create_with_a_different_spec_is_409(api):
    make_run(api, "a")
    response = api.post("/v1/runs", json={"run_id": "a", "schedule": STEP, "base_lrs": [0.2]})
    assert response.status_code == 409
    assert response.json()["code"] == "run_conflict"


def test_create_without_run_id_makes_one(api):
    response = api.post("/v1/runs", json={"schedule": STEP, "base_lrs": [0.1]})
    assert response.status_code == 201
    assert response.json()["run_id"].startswith("run-")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"schedule": {"type": "StepLR", "step_size": 0}, "base_lrs": [0.1]},
                     "schedule.step_size", id="zero-step-size"),
        pytest.param({"schedule": {"type": "MultiStepLR", "milestones": [30, 10]}, "base_lrs": [0.1]},
                     "schedule.milestones", id="unsorted-milestones"),
        pytest.param({"schedule": {"type": "Nope"}, "base_lrs": [0.1]}, "schedule.type", id="unknown-type"),
        pytest.param({"schedule": STEP, "base_lrs": []}, "base_lrs", id="no-groups"),
        pytest.param({"schedule": STEP, "base_lrs": [-1.0]}, "base_lrs.0", id="negative-lr"),
        pytest.param({"schedule": STEP, "base_lrs": [0.1], "base_momentums": [0.9, 0.9]},
                     "base_momentums", id="momentum-length"),
        pytest.param({"schedule": STEP, "base_lrs": [0.1], "run_id": "bad id!"}, "run_id", id="bad-run-id"),
        pytest.param({"schedule": STEP, "base_lrs": [0.1], "world_size": 0}, "world_size", id="world-size"),
        pytest.param({"schedule": STEP, "base_lrs": [0.1], "colour": "red"}, "colour", id="unknown-key"),
        pytest.param({"base_lrs": [0.1]}, "schedule", id="missing-schedule"),
    ],
)
def test_invalid_create_is_422_naming_the_field(api, body, field):
    response = api.post("/v1/runs", json=body)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert payload["errors"][0]["field"] == field
    assert field in payload["detail"]
    assert api.get("/v1/runs").json()["count"] == 0  # nothing stored


def test_non_json_body_is_422(api):
    response = api.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body"


def test_oversized_body_is_413(api):
    response = api.post("/v1/runs", json={"schedule": STEP, "base_lrs": [0.1] * 300_000})
    assert response.status_code == 413
    assert response.json()["code"] == "limit_exceeded"


def test_list_filters_by_labels_and_status_and_pages(api):
    for i in range(5):
        make_run(api, f"r{i}", labels={"sweep": "a" if i % 2 else "b", "team": "x"})
    api.post("/v1/runs/r1/control", json={"action": "stop"})
    api.get("/v1/runs/r1/lr", params={"step": 1})
    by_label = api.get("/v1/runs", params=[("label", "sweep:a"), ("label", "team:x")]).json()
    assert [r["run_id"] for r in by_label["data"]] == ["r1", "r3"]
    stopped = api.get("/v1/runs", params={"status": "stopped"}).json()
    assert [r["run_id"] for r in stopped["data"]] == ["r1"]
    page1 = api.get("/v1/runs", params={"limit": 2}).json()
    page2 = api.get("/v1/runs", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
    page3 = api.get("/v1/runs", params={"limit": 2, "cursor": page2["next_cursor"]}).json()
    assert [r["run_id"] for r in page1["data"] + page2["data"] + page3["data"]] == [f"r{i}" for i in range(5)]
    assert page3["next_cursor"] is None


def test_bad_label_filter_is_422(api):
    response = api.get("/v1/runs", params={"label": "nocolon"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "label"


def test_nul_in_labels_is_422_and_in_filters_matches_nothing(api):
    """PostgreSQL cannot store NUL: both backends answer alike, never with a 5xx."""
    response = api.post("/v1/runs", json={"run_id": "n", "schedule": STEP, "base_lrs": [0.1],
                                          "labels": {"team": "a\x00b"}})
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "labels"
    make_run(api, "x", labels={"team": "a"})
    assert api.get("/v1/runs", params={"label": "team:a\x00"}).json()["data"] == []
    assert [r["run_id"] for r in api.get("/v1/runs", params={"cursor": "w\x00"}).json()["data"]] == ["x"]


def test_read_and_delete(api):
    make_run(api, "gone")
    assert api.get("/v1/runs/gone").status_code == 200
    assert api.delete("/v1/runs/gone").status_code == 204
    missing = api.get("/v1/runs/gone")
    assert missing.status_code == 404 and missing.json()["code"] == "run_not_found"
    assert api.delete("/v1/runs/gone").status_code == 404


def test_unknown_route_is_json_404(api):
    response = api.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_runs_carry_last_seen_and_are_not_stale_by_default(api):
    created = make_run(api, "r1")
    assert created["stale"] is False and created["last_seen"] is not None
    assert api.get("/v1/runs", params={"stale": "true"}).json()["data"] == []  # 300 s is far away
    answer = api.get("/v1/runs", params={"stale": "false"})
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "stale"


def _held_build(store, monkeypatch, fail_first=False):
    """``store.create_run`` held until ``release`` is set (``building``: it was entered)."""
    building, release = threading.Event(), threading.Event()
    real = store.create_run
    calls = []

    def held(*args, **kwargs):
        calls.append(1)
        building.set()
        release.wait()
        if fail_first and len(calls) == 1:
            raise StoreUnavailable("the database went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "create_run", held)
    return building, release


@pytest.mark.parametrize("fail_first", [False, True])
def test_ranks_arriving_while_their_run_is_built_wait_for_it_on_the_event_loop(
    settings, monkeypatch, fail_first
):
    """A job's ranks send their creates together: while one builds the run in a worker thread,
    the others wait on the event loop (no worker thread each, holding a thread-pool token on the
    run's lock), then join: on SQLite each with a read on the loop; on PostgreSQL the first in
    a worker thread, the rest taking the run it read. If the build fails, one of them builds it."""
    store = open_store(settings.db)
    manager = RunManager(store, settings)
    building, release = _held_build(store, monkeypatch, fail_first)
    spec = {"run_id": "job", "schedule": STEP, "base_lrs": [0.1], "world_size": 6}
    threads = []
    create, join = _create_and_join(manager, spec, lambda: threads.append(threading.get_ident()))

    async def ranks():
        creates = Creates()
        first = asyncio.create_task(creates.answer(manager, "job", create, join))
        await asyncio.to_thread(building.wait)
        builds = len(threads)  # SQLite: its try on the loop, then in a worker thread
        others = [asyncio.create_task(creates.answer(manager, "job", create, join)) for _ in range(5)]
        try:
            await asyncio.sleep(0)  # each runs until it waits (asyncio runs ready tasks in order)
            assert len(threads) == builds  # the others wait for the build here, no thread each
        finally:
            release.set()
        answers = await asyncio.gather(first, *others, return_exceptions=True)
        return threading.get_ident(), builds, answers

    try:
        loop_thread, builds, answers = asyncio.run(ranks())
    finally:
        store.close()
    if fail_first:
        assert isinstance(answers[0], StoreUnavailable)
        answers = answers[1:]
    assert sum(created for _, created, _ in answers) == 1
    assert len({(record.run_id, record.created_at) for record, _, _ in answers}) == 1
    if store.one_writer and not fail_first:  # SQLite: after the build, each join is a read on the loop
        assert threads[builds:] == [loop_thread] * 5
    elif not fail_first:  # PostgreSQL: one join in a worker thread, for the five
        assert len(threads) == builds + 1 and loop_thread not in threads


def _create_and_join(manager, spec, on_create):
    """The ``create`` and ``join`` the route hands ``Creates.answer`` for ``spec`` (without the
    run's body); ``on_create()`` as each create begins."""

    def create():
        on_create()
        record, created = manager.create_run(spec)
        return record, created, {}

    def join(record):
        return (record, False, {}) if manager.asks_for(record, spec) else None

    return create, join


def _ranks_at_once(manager, spec, n):
    """``n`` creates of ``spec`` sent together through one ``Creates``: their answers (or errors),
    and how many of them ran ``create`` in a worker thread."""
    in_threads = []
    create, join = _create_and_join(
        manager, spec, lambda: in_threads.append(threading.get_ident() != loop_thread))

    async def ranks():
        creates = Creates()
        ranks = [creates.answer(manager, spec["run_id"], create, join) for _ in range(n)]
        return await asyncio.gather(*ranks, return_exceptions=True)

    loop_thread = None

    async def on_the_loop():
        nonlocal loop_thread
        loop_thread = threading.get_ident()
        return await ranks()

    return asyncio.run(on_the_loop()), sum(in_threads)


def test_ranks_whose_spec_is_refused_all_get_the_refusal_checked_once(settings, monkeypatch):
    """The builder's check refuses the spec (its first steps: a 422): the ranks waiting for it get
    the same 422 without checking it again one after another."""
    store = open_store(settings.db)
    manager = RunManager(store, settings)
    checks = []
    real = manager_module._first_steps

    def counted(parsed):
        checks.append(1)
        return real(parsed)

    monkeypatch.setattr(manager_module, "_first_steps", counted)
    spec = {"run_id": "job", "schedule": {"type": "ExponentialLR", "gamma": 1e308}, "base_lrs": [0.1],
            "world_size": 6}
    try:
        answers, _ = _ranks_at_once(manager, spec, 6)
    finally:
        store.close()
    assert all(isinstance(a, ScheduleError) for a in answers), answers
    assert len({(a.code, a.message) for a in answers}) == 1
    assert checks == [1]


def test_ranks_whose_spec_conflicts_take_the_conflict_their_builder_read(settings):
    """The run is stored with another spec: the ranks waiting for a create begun after they arrived
    take the run it read (a 409 for each), not a worker thread each, one after another (PostgreSQL;
    on SQLite each reads it on the event loop)."""
    store = open_store(settings.db)
    manager = RunManager(store, settings)
    spec = {"run_id": "job", "schedule": STEP, "base_lrs": [0.1], "world_size": 6}
    manager.create_run(spec)
    try:
        answers, in_threads = _ranks_at_once(manager, {**spec, "base_lrs": [0.2]}, 6)
    finally:
        store.close()
    assert all(isinstance(a, RunConflict) for a in answers), answers
    # PostgreSQL: the create the others arrived during, and the one begun after they arrived
    assert in_threads == (0 if store.one_writer else 2)


@pytest.mark.parametrize("body", [
    {"action": "scale", "factor": 0.5, "at_step": 7, "reason": "why"},
    {"action": "set_lr", "lr": 0.1},
    {"action": "set_lr", "lrs": [0.1, 0.2]},
    {"action": "hold"},
    {"action": "resume", "reason": "back"},
    {"action": "stop"},
    {"action": "replace_schedule", "schedule": {"type": "MultiStepLR", "milestones": [3, 6], "gamma": 0.5}},
])
def test_a_controls_action_is_its_model_dump_without_the_copy(body):
    """What ``POST .../control`` hands ``action_for_run`` (``ActionSpec.given``): the action and
    its given arguments, as ``model_dump`` of the action's fields without the None ones gave it."""
    request = ControlRequest.model_validate(body)
    assert request.given() == request.model_dump(exclude={"at_step", "reason"}, exclude_none=True)
    assert list(request.given()) == list(request.model_dump(exclude={"at_step", "reason"}, exclude_none=True))
    fleet = FleetControlRequest.model_validate({"selector": {"status": ["active"]}, "action": {
        k: v for k, v in body.items() if k not in ("at_step", "reason")}})
    assert fleet.action.given() == fleet.action.model_dump(exclude_none=True)
