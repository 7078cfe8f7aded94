"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

# -- database URLs for the store backends -------------------------------------------------
#
# ``database_url("sqlite")`` / ``database_url("postgres")`` gives a fresh, empty database per
# call. A test parametrized over both backends:
#
#     @pytest.fixture(params=BACKENDS)
#     def db_url(request, database_url):
#         return database_url(request.param)

BACKENDS = ("sqlite", "postgres")
POSTGRES_ENV = "TEST_DATABASE_URL"  # e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test
_WORKER_DB_PREFIX = "lrserve_t_"  # + pid + xdist worker: this process's own database
_postgres_problem: dict[str, str] = {}  # base URL -> why it cannot be used (found once)
_worker_dbs: dict[str, str] = {}  # base URL -> URL of this process's database on that server


def _postgres_admin(base_url: str) -> Engine:
    return create_engine(base_url, poolclass=NullPool, connect_args={"connect_timeout": 3})


def _run_admin(base_url: str, *sql: str) -> None:
    engine = _postgres_admin(base_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for statement in sql:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(database: str) -> bool:
    """A database of this suite whose process is gone (``lrserve_t_<pid>_<worker>``)."""
    pid = database.removeprefix(_WORKER_DB_PREFIX).split("_")[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def _worker_database(base_url: str) -> str:
    """This test process's own database on the server ``base_url`` names, made on first use.

    Each pytest process (each xdist worker) gets one, so parallel workers and concurrent runs
    share no state through the database: not the schemas, nor ``NOTIFY`` channels, nor the
    migration's advisory lock. Databases left by processes that died (named by their pid) are
    dropped here; this process drops its own at exit (``pytest_sessionfinish``).
    """
    if base_url in _worker_dbs:
        return _worker_dbs[base_url]
    name = f"{_WORKER_DB_PREFIX}{os.getpid()}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    engine = _postgres_admin(base_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                                 {"p": _WORKER_DB_PREFIX + "%"}).scalars().all()
    finally:
        engine.dispose()
    drops = [f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)' for db in found if _stale(db)]
    try:
        _run_admin(base_url, *drops, f'CREATE DATABASE "{name}"')
    except SQLAlchemyError as exc:  # a role without CREATEDB: one schema per test in the named database
        print(f"{POSTGRES_ENV}: no database of this process's own ({str(exc).splitlines()[0]}); "
              "its tests share the named one, a schema each", file=sys.stderr)
        _worker_dbs[base_url] = base_url
    else:
        _worker_dbs[base_url] = make_url(base_url).set(database=name).render_as_string(hide_password=False)
    return _worker_dbs[base_url]


def pytest_sessionfinish(session: pytest.Session) -> None:
    for base_url, url in _worker_dbs.items():
        if url == base_url:
            continue
        name = make_url(url).database
        try:
            _run_admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except SQLAlchemyError:  # the server went away: the next run drops it (its pid is dead)
            pass
    _worker_dbs.clear()


def _postgres_schema_url(base_url: str, schema: str) -> str:
    """A new schema in this process's database, and its URL with ``search_path`` set to it:
    a private database for one test."""
    if base_url in _postgres_problem:
        pytest.skip(_postgres_problem[base_url])
    if base_url not in _worker_dbs:
        try:
            _worker_database(base_url)
        except SQLAlchemyError as exc:  # unreachable or refused: skip the postgres tests, saying why
            _postgres_problem[base_url] = f"{POSTGRES_ENV} is not usable: {str(exc).splitlines()[0]}"
            pytest.skip(_postgres_problem[base_url])
    # once it worked, a failure is the test's error (e.g. "too many clients"), never a skip
    db_url = _worker_dbs[base_url]
    _run_admin(db_url, f'CREATE SCHEMA "{schema}"')
    url = make_url(db_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def database_url(tmp_path) -> Iterator[Callable[[str], str]]:
    """Factory: ``database_url(backend)`` -> URL of a fresh, empty database for this test.

    sqlite: a new file under ``tmp_path``. postgres: a new schema, dropped after the test, in
    this process's own database on the server that ``TEST_DATABASE_URL`` names; the test is
    skipped, with the reason, when that variable is unset or the server cannot be reached.
    """
    with _databases(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def module_database_url(tmp_path_factory) -> Iterator[Callable[[str], str]]:
    """``database_url`` for a module's shared server or app: dropped after the module."""
    with _databases(tmp_path_factory.mktemp("db")) as make:
        yield make


@contextmanager
def _databases(folder: Path) -> Iterator[Callable[[str], str]]:
    schemas: list[tuple[str, str]] = []

    def make(backend: str) -> str:
        name = f"lrserve_test_{uuid.uuid4().hex[:12]}"
        if backend == "sqlite":
            return f"sqlite:///{folder / name}.db"
        if backend != "postgres":
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        base_url = os.environ.get(POSTGRES_ENV)
        if not base_url:
            pytest.skip(f"{POSTGRES_ENV} is not set (a postgresql+psycopg:// URL enables these)")
        url = _postgres_schema_url(base_url, name)
        schemas.append((_worker_dbs[base_url], name))
        return url

    try:
        yield make
    finally:
        for db_url, name in schemas:
            _run_admin(db_url, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist's ``loadfile`` hands out modules in the order collected (below), not in its
    own sort by number of tests (``--loadscope-reorder``, on by default): that sort undid the
    order below and put the long one-test modules (the 404s memory test, the trainers' outage
    and resume, e2e liveness and replicas) last, after a hundred quick modules, and the run
    ended with them running alone."""
    if hasattr(config.option, "loadscopereorder"):  # xdist is there (and may be off: -p no:xdist)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules holding a test marked ``slow`` go first, in path order; then the others, those
    with the most tests first (xdist's own sort: the fuzzing, contract and torch-suite modules
    are long by their many cases); each module's order kept. Under xdist (``--dist loadfile``,
    which keeps this order: ``pytest_configure``) the long end-to-end modules then start at
    once and the short ones fill the gaps at the end, instead of one long module running alone
    at the end. (A slow module's number of tests says nothing of its length: one of them is a
    single test of 50,000 requests.)"""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    tests = Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path not in slow, 0 if item.path in slow else -tests[item.path]))
