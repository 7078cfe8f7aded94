"""``lrserve serve`` builds one ``Settings`` from its flags and the environment, hands that
object on (to every worker, pickled), and never writes the environment back."""

from __future__ import annotations

import gc
import os
import pickle

import pytest
from fastapi.testclient import TestClient
from lrserve.service import cli
from lrserve.service.app import GC_THRESHOLDS
from lrserve.service.settings import Settings
from lrserve.service.workers import AppFactory


@pytest.fixture
def served(monkeypatch, tmp_path):
    """Run ``lrserve serve ARGS`` up to the point it would start uvicorn; return what it passes."""
    for name in [n for n in os.environ if n.startswith("LRSERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    seen: dict = {}

    def run_server(settings: Settings, **options) -> int:
        seen.update(options, settings=settings, collector_on=gc.isenabled())
        return 0

    monkeypatch.setattr(cli, "run_server", run_server)

    def serve(*args: str) -> dict:
        seen.clear()
        before = dict(os.environ)
        assert cli.main(["serve", "--db", f"sqlite:///{tmp_path}/s.db", *args]) == 0
        assert dict(os.environ) == before  # nothing written back for workers to re-read
        assert gc.isenabled()  # back on once serving ends, whatever the app did
        return seen

    return serve


def test_flags_win_over_variables_and_variables_over_defaults(served, monkeypatch):
    monkeypatch.setenv("LRSERVE_PORT", "9001")
    monkeypatch.setenv("LRSERVE_DB_WAIT_S", "2.5")
    monkeypatch.setenv("LRSERVE_MAX_AHEAD", "77")
    settings = served("--port", "9002", "--workers", "3")["settings"]
    assert settings.port == 9002  # the flag
    assert settings.db_wait_s == 2.5 and settings.max_ahead == 77  # the variables
    assert settings.request_timeout_s == Settings.model_fields["request_timeout_s"].default
    assert served()["settings"].port == 9001


def test_the_defaults_users_get(served):
    seen = served()
    settings = seen["settings"]
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert not settings.insecure and not settings.create_db
    assert settings.sqlite_synchronous == "NORMAL"
    assert seen["workers"] == 1 and seen["access_log"] is False


def test_a_bad_flag_value_is_one_line_naming_the_flag(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", "--db", "mysql://u:secret@h/db"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lrserve: cannot start: --db: ") and "secret" not in err[0]


def test_sqlite_synchronous_is_read_in_any_case_and_checked_once(monkeypatch):
    monkeypatch.setenv("LRSERVE_SQLITE_SYNCHRONOUS", "full")
    assert Settings().sqlite_synchronous == "FULL"
    monkeypatch.setenv("LRSERVE_SQLITE_SYNCHRONOUS", "OFF")
    with pytest.raises(ValueError, match="NORMAL"):
        Settings()


def test_workers_get_the_same_settings_through_the_pickle_not_the_environment(monkeypatch):
    settings = Settings(port=9003, max_ahead=5, tokens="ops:admin:t0k3n")
    factory = pickle.loads(pickle.dumps(AppFactory(settings)))
    monkeypatch.setenv("LRSERVE_MAX_AHEAD", "999")  # a worker's environment does not matter
    assert factory.settings == settings and factory.settings.max_ahead == 5


def test_start_up_runs_without_the_cyclic_collector_and_readiness_turns_it_on(served, tmp_path):
    """Imports (torch's above all) without the collector's full scans; the server answers with
    it on: the app's warm-up, before ``/readyz`` says ready, turns it back on."""
    assert served()["collector_on"] is False
    thresholds = gc.get_threshold()
    gc.disable()  # as serve_command leaves it for the app it builds
    try:
        app = AppFactory(Settings(db=f"sqlite:///{tmp_path}/gc.db"))()
        assert not gc.isenabled()  # the app's modules were imported without it
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == 200
            assert gc.isenabled() and gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.enable()
        gc.set_threshold(*thresholds)


def test_a_start_that_fails_leaves_the_collector_on(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", "--db", "mysql://u:secret@h/db"]) == 1
    assert gc.isenabled()
    monkeypatch.setattr("lrserve.service.app.create_app", lambda settings: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        AppFactory(Settings(db=f"sqlite:///{tmp_path}/f.db"))()
    assert gc.isenabled()
