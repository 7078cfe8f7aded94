"""Group commit: many runs' commits in one transaction, each acknowledged once it is durable.

Every commit of every run needs a write transaction (on SQLite the file's one write slot),
and each transaction costs its own BEGIN, row reads, WAL write and COMMIT. With many runs
committing at once (a fleet of jobs), threads queued for the slot and went through one by
one. Here a commit is queued instead: the first thread that finds no transaction in
progress becomes the writer, takes every commit queued by then into one transaction
(``BaseStore.lock_runs``), and after COMMIT hands each its outcome; commits queued while it
wrote form the next group, written by one of their threads. A thread alone writes its own
commit at once: nobody waits for company, so a sequential client pays nothing for this.

Only where the database has one writer at a time (SQLite: ``BaseStore.one_writer``; the
``Committer`` queues nothing elsewhere). On PostgreSQL each commit keeps its own transaction:
they run side by side on the server (row locks, one per run), which flushes their WAL
together by itself; one transaction per process at a time measured 0.79x the commits/s there
(figure 5's commit load).

Outcomes: a commit's ``append`` may refuse by raising before its first write (its run moved,
say): that error is its own, the others go on. An error after a write, or at COMMIT (the
database failed), spoils the transaction: every commit of the group gets that error and
none is acknowledged, exactly as if each had failed alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from lrserve.service.errors import RunNotFound
from lrserve.service.store.base import BaseStore, RunTransaction


@dataclass(eq=False)
class _Queued:
    run_id: str
    append: Callable[[RunTransaction], None]
    done: bool = False
    error: BaseException | None = None


class GroupCommit:
    """This process's queue of commits waiting for a write transaction."""

    def __init__(self, store: BaseStore) -> None:
        self.store = store
        self._queue: list[_Queued] = []
        self._writing = False
        self._turn = threading.Condition(threading.Lock())

    def write(self, run_id: str, append: Callable[[RunTransaction], None]) -> None:
        """Call ``append(tx)`` on the run's transaction (``RunTransaction``), shared with the other
        commits queued meanwhile; return once that transaction is committed, durably.

        Raises:
            RunNotFound: no such run.
            Exception: whatever ``append`` raised, or what failed the transaction.
        """
        queued = _Queued(run_id, append)
        with self._turn:
            self._queue.append(queued)
            while self._writing and not queued.done:
                self._turn.wait()
            group = None
            if not queued.done:  # nobody is writing: this thread writes, for everyone queued
                self._writing = True
                group = self._take_group()
        if group is not None:
            try:
                self._write(group)
            finally:
                with self._turn:
                    self._writing = False
                    self._turn.notify_all()
        if queued.error is not None:
            raise queued.error

    def _take_group(self) -> list[_Queued]:
        """The queued commits, one per run (a run's second commit waits for the next group:
        each checks the run as the one before it left it)."""
        group: dict[str, _Queued] = {}
        later = []
        for queued in self._queue:
            if queued.run_id in group:
                later.append(queued)
            else:
                group[queued.run_id] = queued
        self._queue = later
        return list(group.values())

    def _write(self, group: list[_Queued]) -> None:
        try:
            with self.store.lock_runs([queued.run_id for queued in group]) as locked:
                for queued in group:
                    tx = locked.get(queued.run_id)
                    if tx is None:
                        queued.error = RunNotFound(queued.run_id)
                        continue
                    try:
                        queued.append(tx)
                    except Exception as exc:
                        if tx.dirty:  # the transaction holds part of it: nobody's commit stands
                            raise
                        queued.error = exc  # refused before writing: its own outcome
        except BaseException as exc:
            for queued in group:
                if queued.error is None:
                    queued.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for queued in group:
                queued.done = True
