"""How the PostgreSQL pipeline (``service/store/pg_pipeline.py``) turns libpq's answers into
errors, without a server: any answer other than a statement's success is one, and the
exception stands without psycopg's undocumented ``error_from_result``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

psycopg = pytest.importorskip("psycopg")

from lrserve.service.store.pg_pipeline import PgPipeline, error_of  # noqa: E402
from psycopg import pq  # noqa: E402


class _Result:
    """A libpq result as the pipeline reads it."""

    def __init__(self, status: pq.ExecStatus, sqlstate: bytes | None = None, message: bytes = b"") -> None:
        self.status = status
        self.error_message = message
        self._sqlstate = sqlstate

    def error_field(self, field: pq.DiagnosticField) -> bytes | None:
        return self._sqlstate if field == pq.DiagnosticField.SQLSTATE else None

    def get_error_message(self, encoding: str = "utf-8") -> str:
        return self.error_message.decode(encoding)


def _pipeline() -> PgPipeline:
    pipeline = PgPipeline.__new__(PgPipeline)  # no connection: only ``_keep_error``'s state
    pipeline._driver = SimpleNamespace(info=SimpleNamespace(encoding="utf-8"))  # type: ignore[assignment]
    pipeline._error = None
    pipeline._prepared = {"SELECT 1": (b"lrserve_0", [])}
    return pipeline


@pytest.mark.parametrize("status", [pq.ExecStatus.BAD_RESPONSE, pq.ExecStatus.COPY_OUT,
                                    pq.ExecStatus.EMPTY_QUERY, pq.ExecStatus.PIPELINE_ABORTED])
def test_an_answer_other_than_a_statements_success_is_an_error(status):
    """Before, only ``FATAL_ERROR`` was: a ``BAD_RESPONSE`` (libpq could not read the server's
    answer) passed as a success, its statement's rows empty."""
    pipeline = _pipeline()
    pipeline._keep_error(_Result(pq.ExecStatus.COMMAND_OK))
    pipeline._keep_error(_Result(pq.ExecStatus.TUPLES_OK))
    assert pipeline._error is None
    pipeline._keep_error(_Result(status, message=b"server sent data of unknown type"))
    assert isinstance(pipeline._error, psycopg.OperationalError)
    assert status.name in str(pipeline._error)
    first = pipeline._error
    pipeline._keep_error(_Result(pq.ExecStatus.FATAL_ERROR, b"22012", b"ERROR:  division by zero"))
    assert pipeline._error is first  # the first one is kept
    assert pipeline._prepared  # only a missing prepared statement empties the list


def test_a_missing_prepared_statement_empties_the_connections_list():
    pipeline = _pipeline()
    pipeline._keep_error(_Result(pq.ExecStatus.FATAL_ERROR, b"26000",
                                 b'ERROR:  prepared statement "lrserve_0" does not exist'))
    assert isinstance(pipeline._error, psycopg.errors.InvalidSqlStatementName)
    assert pipeline._prepared == {}


def test_an_error_without_psycopgs_error_from_result(monkeypatch):
    """``psycopg.errors.error_from_result`` is not documented API: without it (or where it
    takes other arguments) the error is the documented ``lookup`` class of its SQLSTATE with
    its message, or a ``DatabaseError`` naming an unknown SQLSTATE."""
    monkeypatch.delattr(psycopg.errors, "error_from_result")
    error = error_of(_Result(pq.ExecStatus.FATAL_ERROR, b"22001", b"ERROR:  value too long"), "utf-8")
    assert type(error) is psycopg.errors.StringDataRightTruncation
    assert (error.sqlstate, str(error)) == ("22001", "ERROR:  value too long")
    error = error_of(_Result(pq.ExecStatus.FATAL_ERROR, b"ZZ999", b"ERROR:  new"), "utf-8")
    assert type(error) is psycopg.DatabaseError
    assert str(error) == "ERROR:  new (SQLSTATE ZZ999)"

    def other(result):  # another version's signature
        raise AssertionError("not called so")

    monkeypatch.setattr(psycopg.errors, "error_from_result", lambda result: other(result), raising=False)
    error = error_of(_Result(pq.ExecStatus.FATAL_ERROR, b"22012", b"ERROR:  division by zero"), "utf-8")
    assert type(error) is psycopg.errors.DivisionByZero
