"""``LRSERVE_RUN_ID`` and ``LRSERVE_LABELS``: what a launcher sets once for every rank of a job."""

from __future__ import annotations

import pytest
from lrserve.client import RemoteScheduler
from lrserve.service import create_app
from lrserve.service.settings import Settings
from starlette.testclient import TestClient

from tests.client.fake_server import Optimizer

STEP = {"type": "StepLR", "step_size": 2, "gamma": 0.5}


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(Settings(db=f"sqlite:///{tmp_path}/t.db"))) as client:
        yield client


def test_run_id_and_labels_come_from_the_environment(api, monkeypatch):
    monkeypatch.setenv("LRSERVE_RUN_ID", "sweep7-trial3")
    monkeypatch.setenv("LRSERVE_LABELS", "sweep=7, trial=3")
    with RemoteScheduler(Optimizer({"lr": 0.1}), STEP, http_client=api) as sched:
        assert sched.run_id == "sweep7-trial3"
    run = api.get("/v1/runs/sweep7-trial3").json()
    assert run["labels"] == {"sweep": "7", "trial": "3"}


def test_arguments_win_over_the_environment(api, monkeypatch):
    monkeypatch.setenv("LRSERVE_RUN_ID", "from-env")
    monkeypatch.setenv("LRSERVE_LABELS", "sweep=7")
    with RemoteScheduler(Optimizer({"lr": 0.1}), STEP, run_id="given", labels={"team": "x"},
                         http_client=api) as sched:
        assert sched.run_id == "given"
    assert api.get("/v1/runs/given").json()["labels"] == {"team": "x"}
    assert api.get("/v1/runs/from-env").status_code == 404


def test_without_them_the_server_names_the_run(api):
    with RemoteScheduler(Optimizer({"lr": 0.1}), STEP, http_client=api) as sched:
        assert sched.run_id.startswith("run-")
    assert api.get(f"/v1/runs/{sched.run_id}").json()["labels"] == {}


@pytest.mark.parametrize("value", ["sweep", "sweep=", "=7", "sweep=7,,x=1"])
def test_malformed_labels_name_the_variable(api, monkeypatch, value):
    monkeypatch.setenv("LRSERVE_LABELS", value)
    with pytest.raises(ValueError, match="LRSERVE_LABELS must be key=value pairs"):
        RemoteScheduler(Optimizer({"lr": 0.1}), STEP, http_client=api)
    assert api.get("/v1/runs").json()["count"] == 0
