"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
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
_postgres_problem: dict[str, str] = {}  # base URL -> why it cannot be used (found once)


def _postgres_admin(base_url: str) -> Engine:
    return create_engine(base_url, poolclass=NullPool, connect_args={"connect_timeout": 3})


def _run_admin(base_url: str, sql: str) -> None:
    engine = _postgres_admin(base_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def _postgres_schema_url(base_url: str, schema: str) -> str:
    """A new schema, and the base URL with ``search_path`` set to it: a private database."""
    if base_url in _postgres_problem:
        pytest.skip(_postgres_problem[base_url])
    try:
        _run_admin(base_url, f'CREATE SCHEMA "{schema}"')
    except Exception as exc:  # unreachable or refused: skip the postgres tests, saying why
        _postgres_problem[base_url] = f"{POSTGRES_ENV} is not usable: {str(exc).splitlines()[0]}"
        pytest.skip(_postgres_problem[base_url])
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def database_url(tmp_path) -> Iterator[Callable[[str], str]]:
    """Factory: ``database_url(backend)`` -> URL of a fresh, empty database for this test.

    sqlite: a new file under ``tmp_path``. postgres: a new schema in the database that
    ``TEST_DATABASE_URL`` names, dropped after the test; the test is skipped, with the
    reason, when that variable is unset or the server cannot be reached.
    """
    schemas: list[tuple[str, str]] = []

    def make(backend: str) -> str:
        name = f"lrserve_test_{uuid.uuid4().hex[:12]}"
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / name}.db"
        if backend != "postgres":
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        base_url = os.environ.get(POSTGRES_ENV)
        if not base_url:
            pytest.skip(f"{POSTGRES_ENV} is not set (a postgresql+psycopg:// URL enables these)")
        url = _postgres_schema_url(base_url, name)
        schemas.append((base_url, name))
        return url

    yield make
    for base_url, name in schemas:
        _run_admin(base_url, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
