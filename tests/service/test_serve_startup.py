"""``lrserve serve`` start-up: one clear line and a non-zero exit when the database is not
usable (never the password), and an optional wait for a database still starting."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from lrserve.service.errors import StoreUnavailable
from lrserve.service.store import SchemaTooNew, open_store, wait_for_store

from tests.conftest import BACKENDS
from tests.service.store.test_contract import bump_schema_version

PASSWORD = "hunter2-secret"


def serve(db: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrserve.service", "serve", "--db", db, *extra],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # a real lrserve process, started as an operator would
def test_unreachable_database_is_one_line_naming_the_host_not_the_password():
    result = serve(f"postgresql+psycopg://bob:{PASSWORD}@127.0.0.1:1/lrserve")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrserve: cannot start: PostgreSQL at 127.0.0.1:1/lrserve")
    assert PASSWORD not in result.stderr + result.stdout


@pytest.mark.slow  # a real lrserve process, started as an operator would
def test_a_malformed_url_is_not_echoed():
    result = serve(f"postgresql+psycopg://bob:{PASSWORD}@127.0.0.1:port/x")
    assert result.returncode == 1 and "cannot start" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


@pytest.mark.slow  # a real lrserve process, started as an operator would
def test_waits_then_gives_up_saying_so():
    started = time.monotonic()
    result = serve(f"postgresql+psycopg://bob:{PASSWORD}@127.0.0.1:1/lrserve", "--db-wait", "1.5")
    assert result.returncode == 1 and time.monotonic() - started >= 1.5
    assert "waiting for the database" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lrserve: cannot start:")
    assert PASSWORD not in result.stderr


@pytest.mark.slow  # a real lrserve process, started as an operator would
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_schema_newer_than_the_code_is_refused(backend, database_url):
    url = database_url(backend)
    open_store(url).close()
    bump_schema_version(url)
    result = serve(url, "--db-wait", "30")
    assert result.returncode == 1
    assert "newer than this lrserve" in result.stderr and "waiting" not in result.stderr  # not retried


def test_wait_for_store_opens_once_the_database_is_there(tmp_path):
    folder = tmp_path / "later"
    waits = []
    threading.Timer(0.5, folder.mkdir).start()  # the "database" appears after a while
    store = wait_for_store(f"sqlite:///{folder}/db.sqlite", wait_s=10, poll_s=0.1,
                           on_wait=lambda error, left: waits.append(left))
    store.close()
    assert waits and all(0 < left <= 10 for left in waits)


def test_wait_for_store_tries_once_without_a_wait(tmp_path):
    waits = []
    with pytest.raises(StoreUnavailable):
        wait_for_store(f"sqlite:///{tmp_path}/missing/db.sqlite",
                       on_wait=lambda error, left: waits.append(left))
    assert waits == []


def test_the_wait_counts_from_the_first_failure_so_a_slow_first_try_still_waits(monkeypatch):
    """A first try slower than the wait (a busy host: the driver's import, a slow refusal) is
    still followed by the wait (before: time was up at once, no retry, no "waiting" line; the
    start-up test below failed so at load 15)."""
    import lrserve.service.store as stores

    tries: list[float] = []

    def refused(url, **kwargs):
        tries.append(time.monotonic())
        if len(tries) == 1:
            time.sleep(0.3)  # longer than the whole wait
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(stores, "open_store", refused)
    waits: list[float] = []
    with pytest.raises(StoreUnavailable):
        wait_for_store("postgresql+psycopg://x@127.0.0.1:1/db", wait_s=0.2, poll_s=0.05,
                       on_wait=lambda error, left: waits.append(left))
    assert waits and len(tries) >= 2 and all(0 < left <= 0.2 for left in waits)


def test_schema_too_new_is_not_retried(tmp_path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    open_store(url).close()
    bump_schema_version(url)
    waits = []
    with pytest.raises(SchemaTooNew):
        wait_for_store(url, wait_s=30, on_wait=lambda error, left: waits.append(left))
    assert waits == []


@pytest.mark.parametrize("mode,level", [("NORMAL", 1), ("FULL", 2), ("EXTRA", 3)])
def test_the_start_up_check_opens_sqlite_with_the_configured_synchronous(tmp_path, mode, level):
    """The check creates or migrates the database: it writes with the settings' durability
    (before: always NORMAL). Every connection it opens is asked for its pragma."""
    from lrserve.service.cli import check_database
    from sqlalchemy import Engine, event

    seen: list[int] = []

    def ask(conn) -> None:
        seen.append(conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0])

    event.listen(Engine, "engine_connect", ask)
    try:
        assert check_database(f"sqlite:///{tmp_path / 'l.db'}", 0, sqlite_synchronous=mode) is None
    finally:
        event.remove(Engine, "engine_connect", ask)
    assert seen and set(seen) == {level}, seen
