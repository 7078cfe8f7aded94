"""A PostgreSQL write transaction in libpq's pipeline mode, one socket write per flush.

The hot writes (commits, metric writes, barrier reports) are a few small statements whose
answers are needed at one or two points: the run's locked row, and COMMIT. psycopg's own
pipeline (``Connection.pipeline``) sends each statement as it is executed, a write of its
own, and the server's process wakes for each: a commit of the commit load was seven writes
(``BEGIN``, the locked row, a flush request, the ``UPDATE``, ``COMMIT``, the sync, a flush
request), where pgbench sends the same transaction in two. Here the statements wait in
libpq's output buffer and go out together where the server must answer (a statement's rows
are read, or the transaction ends): a commit is two writes and two round trips, as before.
It also skips psycopg's per-statement machinery (the pipeline's queues, its prepared-statement
manager, a cursor's result set-up), most of the commit's CPU in the server's process.

The statements are the same ones, prepared once per connection (named ``lrserve_N``), their
values adapted by psycopg's own dumpers (text) and their rows by its loaders
(``psycopg.adapt.Transformer`` on the connection), so values go and come back as a psycopg
cursor would send and return them. The parameters' types are the server's inference from the
statement (SQLAlchemy writes a cast on each typed value), as with pgbench's ``-M prepared``.

A prepared statement lives as long as the server's session, whatever its transactions do,
unless something deallocates it. psycopg does: once it has prepared statements of its own (a
statement's sixth use on the connection), its ``rollback()`` of an open transaction, and a
``DROP``, ``ALTER`` or ``ROLLBACK`` run through it, send ``DEALLOCATE ALL``
(``psycopg/_preparing.py``), which deletes these too. So the store's connections are opened
with ``prepare_threshold=None`` (``_open_postgres``: psycopg then prepares nothing and
deallocates nothing); a pipeline ends a transaction it left open with a ``ROLLBACK`` of its
own, not psycopg's ``rollback()``; and should a statement still be missing (SQLSTATE 26000),
that request fails and the connection's list is emptied, so its next use prepares them again
under new names: a connection never fails for good.

Errors are psycopg's own (``psycopg.errors``: the statement's SQLSTATE class), raised where
the answer is read; a connection the server dropped is ``broken`` as psycopg reports it, so
``SqlStore._discard`` and SQLAlchemy's disconnect check see it the same way.
"""

from __future__ import annotations

import re
import select
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_FATAL = pq.ExecStatus.FATAL_ERROR
_ABORTED = pq.ExecStatus.PIPELINE_ABORTED  # a statement after an error, skipped up to the sync
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_IDLE = pq.TransactionStatus.IDLE
_SQLSTATE = pq.DiagnosticField.SQLSTATE
_NO_SUCH_STATEMENT = b"26000"  # invalid_sql_statement_name: a prepared statement the server has not
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


class _Prepared:
    """The statements a pipeline prepared on one connection: statement text -> (its name, its
    parameters' names in order). Names are never used twice on a connection (``taken``), so a
    list emptied after a statement went missing cannot collide with one the server still has."""

    __slots__ = ("names", "taken")

    def __init__(self) -> None:
        self.names: dict[str, tuple[bytes, list[str]]] = {}
        self.taken = 0

    def next_name(self) -> bytes:
        self.taken += 1
        return f"lrserve_{self.taken - 1}".encode()


_PREPARED: weakref.WeakKeyDictionary[Any, _Prepared] = weakref.WeakKeyDictionary()  # per connection
_TO_PREPARE: dict[str, tuple[bytes, list[str]]] = {}  # statement text -> ($n text, names)


def _converted(sql: str) -> tuple[bytes, list[str]]:
    """``sql`` (psycopg's ``%(name)s`` placeholders) with ``$n`` ones, and the names in order."""
    found = _TO_PREPARE.get(sql)
    if found is None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) is None:
                return "%"
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        found = _TO_PREPARE[sql] = (_PLACEHOLDER.sub(number, sql).encode(), names)
    return found


class _Answer:
    """What one queued statement's (or sync's) answer will be: filled in by ``PgPipeline._receive``."""

    __slots__ = ("prepares", "results", "sync")

    def __init__(self, prepares: str | None = None, *, sync: bool = False) -> None:
        self.prepares = prepares  # a prepare of this statement text
        self.sync = sync  # a sync: the end of an implicit transaction (or of COMMIT's flush)
        self.results: list[pq.abc.PGresult] | None = None  # None: not received yet


class PgPipeline:
    """Statements on a psycopg connection, queued in libpq's pipeline mode.

    ``transaction=True`` (``pipelined``): ``begin`` queues ``BEGIN``; ``cursor().execute``
    queues a statement; reading a cursor's rows sends what is queued with a flush request and
    waits for that statement's answer; ``commit`` sends the rest with ``COMMIT`` and a sync,
    and returns once COMMIT answered (raising the first error of the transaction, if any:
    then nothing of it is kept). ``transaction=False`` (``reading``): reading a cursor's rows
    sends what is queued with a sync, so each read is its own transaction (as in psycopg's
    autocommit) in one write and one round trip. ``close`` always runs last: it ends pipeline
    mode, and leaves the connection as the pool keeps them (no transaction open), or closed
    if that cannot be done.
    """

    def __init__(self, driver: psycopg.Connection[Any], *, transaction: bool = True) -> None:
        self._driver = driver
        self._pg = driver.pgconn
        self._transaction = transaction
        self._transformer = Transformer(driver)
        self._statements = _PREPARED.get(driver) or _PREPARED.setdefault(driver, _Prepared())
        self._prepared = self._statements.names
        self._preparing: dict[str, tuple[bytes, list[str]]] = {}  # prepares queued, not answered yet
        self._answers: list[_Answer] = []
        self._received = 0  # answers in so far (a prefix of ``_answers``)
        self._sent = 0  # answers the server was asked for (flush request or sync after them)
        self._error: psycopg.Error | None = None
        self._poll: Any = None
        self._pg.enter_pipeline_mode()

    def cursor(self) -> PgCursor:
        return PgCursor(self)

    def begin(self) -> None:
        self.queue("BEGIN", ())

    def commit(self) -> None:
        self.queue("COMMIT", ())
        self.finish()

    def finish(self) -> None:
        """Send what is still queued with a sync, receive it all, and raise the first error."""
        if self._answers and not self._answers[-1].sync:
            self._sync()
        if self._error is not None:
            raise self._error

    def queue(self, sql: str, values: Sequence[Any]) -> _Answer:
        """Queue ``sql`` (psycopg's placeholders) with ``values`` in its parameters' order
        (``names_of``); prepared on this connection first if it is not yet."""
        found = self._prepared.get(sql) or self._preparing.get(sql)
        if found is None:
            text, names = _converted(sql)
            name = self._statements.next_name()
            found = self._preparing[sql] = (name, names)
            self._pg.send_prepare(name, text)
            self._answers.append(_Answer(prepares=sql))
        params = self._transformer.dump_sequence(values, [PyFormat.TEXT] * len(values)) if values else None
        self._pg.send_query_prepared(found[0], params)
        answer = _Answer()
        self._answers.append(answer)
        return answer

    @staticmethod
    def names_of(sql: str) -> list[str]:
        """The names of ``sql``'s parameters in their ``$n`` order."""
        return _converted(sql)[1]

    def wait_for(self, answer: _Answer) -> None:
        """Have the server answer everything queued up to ``answer``, and receive it."""
        if answer.results is None:
            if self._sent < len(self._answers):
                if self._transaction:
                    self._pg.send_flush_request()
                    self._sent = len(self._answers)
                    self._flush()
                else:
                    self._sync()  # receives it
            if answer.results is None:
                self._receive(self._answers.index(answer, self._received) + 1)
        if self._error is not None:
            raise self._error

    def _sync(self) -> None:
        """Send what is queued with a sync, and receive every answer up to it."""
        self._pg.pipeline_sync()
        self._answers.append(_Answer(sync=True))
        self._sent = len(self._answers)
        self._flush()
        self._receive(len(self._answers))

    def _flush(self) -> None:
        pg = self._pg
        while pg.flush():  # 1: more to send (a full socket buffer): wait, reading what came
            if self._wait(select.POLLIN | select.POLLOUT) & select.POLLIN:
                pg.consume_input()

    def _wait(self, events: int) -> int:
        if self._poll is None:
            self._poll = select.poll()
        self._poll.register(self._pg.socket, events)
        found = 0
        while not found:
            found = sum(mask for _, mask in self._poll.poll())
        return found

    def _next(self) -> pq.abc.PGresult | None:
        pg = self._pg
        while pg.is_busy():
            self._wait(select.POLLIN)
            pg.consume_input()
        return pg.get_result()

    def _send_plain(self, sql: bytes) -> None:
        """Queue ``sql`` unprepared (no parameters)."""
        self._pg.send_query_params(sql, None)
        self._answers.append(_Answer())

    def _receive(self, upto: int) -> None:
        """Receive the answers of ``_answers[:upto]``: a statement's results end with libpq's
        ``None``, a sync's is its own result; the first error is kept (``_keep_error``)."""
        while self._received < upto:
            answer = self._answers[self._received]
            results = []
            while (result := self._next()) is not None:
                if answer.sync and result.status == _SYNC:
                    break
                results.append(result)
                self._keep_error(result)
            answer.results = results
            self._received += 1
            if answer.prepares is not None:
                named = self._preparing.pop(answer.prepares)
                if results and results[0].status == _COMMAND_OK:
                    self._prepared[answer.prepares] = named

    def _keep_error(self, result: pq.abc.PGresult) -> None:
        """The first error, as psycopg raises it (later statements up to the sync come back
        aborted): a statement's error, or any answer other than a statement's success (a
        ``BAD_RESPONSE``, a ``COPY``). A prepared statement the server has not (SQLSTATE
        26000: deallocated behind the pipeline's back) empties the connection's list, so its
        statements are prepared again at their next use."""
        status = result.status
        if status == _COMMAND_OK or status == _TUPLES_OK or (status == _ABORTED and self._error is not None):
            return
        if status == _FATAL and result.error_field(_SQLSTATE) == _NO_SUCH_STATEMENT:
            self._prepared.clear()
        if self._error is None:
            self._error = error_of(result, self._driver.info.encoding)

    def close(self) -> None:
        """End pipeline mode: the rest received (a sync sent first if the last thing queued
        is not one), then a transaction left open (a BEGIN that did not reach its COMMIT)
        rolled back by a ``ROLLBACK`` of its own, not psycopg's ``rollback()`` (which may send
        ``DEALLOCATE ALL`` after it, see the module's notes); a connection where that fails,
        or that is still in a transaction after it, is closed."""
        driver = self._driver
        if driver.closed:
            return
        pg = self._pg
        try:
            if self._answers and not self._answers[-1].sync:
                self._sync()
            if pg.transaction_status != _IDLE:  # (``driver.info``'s costs ~7 µs)
                self._send_plain(b"ROLLBACK")
                self._sync()
            pg.exit_pipeline_mode()
            if pg.transaction_status != _IDLE:
                raise psycopg.OperationalError("the transaction did not end")
        except Exception:  # noqa: BLE001 - the connection is unusable: close it (the pool drops it)
            driver.close()

    def rows_of(self, answer: _Answer) -> tuple[list[tuple[Any, ...]], list[tuple[str, int]]]:
        """The rows of a received SELECT as psycopg's loaders return them, and its columns."""
        assert answer.results is not None
        result = answer.results[-1] if answer.results else None
        if result is None or result.status != _TUPLES_OK:
            return [], []
        self._transformer.set_pgresult(result)
        rows = self._transformer.load_rows(0, result.ntuples, tuple)
        columns = [((result.fname(i) or b"").decode(), result.ftype(i)) for i in range(result.nfields)]
        return rows, columns


class PgCursor:
    """The DB-API cursor methods ``_DriverSql`` uses, on a ``PgPipeline``: ``execute`` and
    ``executemany`` queue, ``fetchone``/``fetchall``/``description`` wait for the answer
    (``execute_each``: one statement's rows for each of many parameter sets, in one round trip);
    ``rowcount`` counts the answers received so far (all of them once COMMIT answered)."""

    def __init__(self, pipeline: PgPipeline) -> None:
        self._pipeline = pipeline
        self._answers: list[_Answer] = []
        self._rows: list[tuple[Any, ...]] | None = None
        self._description: list[tuple[str, int]] | None = None
        self._at = 0

    def execute(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> PgCursor:
        self._answers, self._rows, self._description, self._at = [], None, None, 0
        self._queue(sql, params)
        return self

    def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        self._answers, self._rows, self._description, self._at = [], None, None, 0
        for params in rows:
            self._queue(sql, params)

    def execute_each(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> list[list[tuple[Any, ...]]]:
        """``sql`` once per item of ``rows``, all sent in one write and answered in one round
        trip (the server runs them in order), and each one's rows; the first error of any of
        them raised. ``fetchone``/``fetchall``/``description`` then read the last one's rows,
        ``rowcount`` counts every one's."""
        self.executemany(sql, rows)
        if not self._answers:
            return []
        self._pipeline.wait_for(self._answers[-1])
        found = [self._pipeline.rows_of(answer) for answer in self._answers]
        self._rows, self._description = found[-1]
        return [rows for rows, _ in found]

    def _queue(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None) -> None:
        pipeline = self._pipeline
        if params is None:
            values: Sequence[Any] = ()
        elif isinstance(params, Mapping):
            values = [params[name] for name in pipeline.names_of(sql)]
        else:
            values = params
        self._answers.append(pipeline.queue(sql, values))

    def _loaded(self) -> list[tuple[Any, ...]]:
        if self._rows is None:
            if not self._answers:
                raise psycopg.ProgrammingError("no statement executed")
            self._pipeline.wait_for(self._answers[-1])
            self._rows, self._description = self._pipeline.rows_of(self._answers[-1])
        return self._rows

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self._loaded()
        if self._at >= len(rows):
            return None
        self._at += 1
        return rows[self._at - 1]

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows = self._loaded()
        rest, self._at = rows[self._at:], len(rows)
        return rest

    @property
    def description(self) -> list[tuple[str, int]] | None:
        self._loaded()
        return self._description

    @property
    def rowcount(self) -> int:
        counts = [result.command_tuples for answer in self._answers if answer.results
                  for result in answer.results[-1:]]
        known = [count for count in counts if count is not None]
        return sum(known) if known else -1

    def close(self) -> None:
        self._answers, self._rows = [], None


def error_of(result: pq.abc.PGresult, encoding: str) -> psycopg.Error:
    """The exception for an answer that is not a statement's success: an answer without a
    SQLSTATE (a ``BAD_RESPONSE``: libpq could not read the server's) is an
    ``OperationalError`` naming its status; an error is what psycopg raises for it
    (``psycopg.errors.error_from_result``, not documented API: where it is missing or takes
    other arguments, the documented ``psycopg.errors.lookup`` class of its SQLSTATE with its
    message, or a plain ``DatabaseError`` naming both)."""
    message = (result.error_message or b"").decode(encoding, "replace").strip()
    sqlstate = (result.error_field(_SQLSTATE) or b"").decode("ascii", "replace")
    if not sqlstate:
        return psycopg.OperationalError(
            f"unexpected answer from the server: {pq.ExecStatus(result.status).name}"
            + (f": {message}" if message else ""))
    from_result = getattr(psycopg.errors, "error_from_result", None)
    if from_result is not None:
        try:
            error = from_result(result, encoding=encoding)
        except TypeError:
            pass
        else:
            if isinstance(error, psycopg.Error):
                return error
    try:
        return psycopg.errors.lookup(sqlstate)(message)
    except KeyError:
        return psycopg.DatabaseError(f"{message} (SQLSTATE {sqlstate})")


@contextmanager
def reading(driver: psycopg.Connection[Any]) -> Iterator[PgPipeline]:
    """Reads on ``driver`` (``PgPipeline(transaction=False)``): each cursor's statement goes
    out with a sync where its rows are read, its own transaction; the connection left as the
    pool keeps them."""
    pipeline = PgPipeline(driver, transaction=False)
    try:
        yield pipeline
        pipeline.finish()  # a statement whose rows were not read
    finally:
        pipeline.close()


@contextmanager
def pipelined(driver: psycopg.Connection[Any]) -> Iterator[PgPipeline]:
    """One transaction on ``driver`` (``PgPipeline``): ``BEGIN`` queued, the block's
    statements, then ``COMMIT``, answered before this returns; the connection left as the
    pool keeps them whatever happens."""
    pipeline = PgPipeline(driver)
    try:
        pipeline.begin()
        yield pipeline
        pipeline.commit()
    finally:
        pipeline.close()
