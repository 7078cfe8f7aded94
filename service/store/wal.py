"""SQLite's WAL checkpoints, run outside the file's write slot.

By default SQLite checkpoints in the ``COMMIT`` that takes the write-ahead log past 1,000
pages (``wal_autocheckpoint``): that commit copies the log's pages into the database file
(and syncs it) before it returns. The committing thread still holds this process's write
slot then (``SqlStore._sqlite_writers``), so every other run's commit waited for a copy of
4-8 MB: 60-90 ms after each engine snapshot of a 1024-group run (its value chunk is 8 MB of
log), and a shorter stall every few thousand small commits.

So the store's connections are opened with ``wal_autocheckpoint=0`` (``_install_sqlite_hooks``)
and ``Checkpointer``, a thread of the store, runs ``PRAGMA wal_checkpoint(PASSIVE)`` at most
once per ``every_s`` after writes. A passive checkpoint waits for no lock and blocks no reader
or writer: commits go on while it copies (it copies the frames no reader still needs, and a
later one the rest). Once a checkpoint has copied the whole log, the next writer starts the
log again from its beginning, as with SQLite's own checkpoints; durability is the commit's
(its frames in the log), not the checkpoint's.

Under a steady stream of commits, though, a passive checkpoint never finds the whole log
copied (commits land while it copies), so the log never starts again: a bug hunt's one
client stepping one run grew it by 30 MB a second, without end, until the disk was full.
So where the log has grown past ``RESTART_PAGES`` since it last started (each checkpoint
copied what was there, but commits landed meanwhile, or readers kept old frames), the
checkpointer runs a ``RESTART`` checkpoint holding this process's write slot
(``write_slot``): SQLite's writer lock keeps other processes' writers out too, it copies
only the frames committed during the first (a few ms of commits waiting), and it waits at
most ``RESTART_WAIT_MS`` for a writer of another process and for readers still on the old
log, so that the next writer starts the log again. And ``journal_size_limit``
(``WAL_KEEP_BYTES``) truncates the file when the log starts again, so a burst's log does not
keep its size on disk for good.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import weakref
from contextlib import AbstractContextManager
from typing import Any

from lrserve.service.errors import OutageLog, StoreUnavailable
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

log = logging.getLogger("lrserve")

CHECKPOINT_EVERY_S = 0.5
"""At most one checkpoint per this many seconds, and only after a write."""
RESTART_PAGES = 4096
"""Pages the log may hold since it last started before a checkpoint holds the write slot to
start it again (16 MiB of 4 KiB pages; SQLite's own automatic checkpoints start at 1,000)."""
RESTART_WAIT_MS = 50
"""How long the held checkpoint waits for other processes' writers and for readers of the old
log (then it copies what it can, as a passive one, and a later round tries again): every
writer of the file waits meanwhile."""
WAL_KEEP_BYTES = 16 << 20
"""``journal_size_limit``: the log file is truncated to this size when the log starts again."""


class Checkpointer:
    """Runs SQLite's passive checkpoints in a thread of its own, after writes.

    Started by the first ``wrote()``; stopped by ``close()`` (or when its owner is collected,
    so a store nobody closed leaves no thread turning).
    """

    def __init__(
        self, engine: Engine, owner: object, every_s: float = CHECKPOINT_EVERY_S, *,
        write_slot: AbstractContextManager[Any] | None = None,
    ) -> None:
        self._engine = engine
        self._owner = weakref.ref(owner)
        self._every_s = every_s
        self._write_slot = write_slot  # this process's writers' turn (``SqlStore._sqlite_writers``)
        self._wrote = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self._outage = OutageLog(log, "WAL checkpoint", "cannot checkpoint the SQLite database")
        self.checkpoints = 0
        """Checkpoints run so far (tests read it)."""

    def wrote(self) -> None:
        """A write transaction committed: a checkpoint follows within ``every_s``."""
        if not self._wrote.is_set():  # set: the checkpoint to come clears it first, then copies
            self._wrote.set()  # (a lock and a notify: skipped while one is due anyway)
        if self._thread is None:
            with self._start:
                if self._thread is None and not self._closed.is_set():
                    self._thread = threading.Thread(target=self._run, name="lrserve-wal-checkpoint",
                                                    daemon=True)
                    self._thread.start()

    def close(self) -> None:
        """Stop the thread (SQLite checkpoints when the file's last connection closes)."""
        self._closed.set()
        self._wrote.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    def checkpoint(self) -> tuple[int, int, int] | None:
        """A passive checkpoint now, and another holding the write slot where the log has grown
        past ``RESTART_PAGES`` since it last started: SQLite's ``(busy, log pages, pages
        checkpointed)`` of the last, or ``None`` if the database failed (logged once per outage)."""
        found = self._checkpoint()
        if found is not None and self._write_slot is not None and found[1] > RESTART_PAGES:
            found = self._checkpoint(restart=True)  # commits landed while it copied, or readers held on
        return found

    def _checkpoint(self, *, restart: bool = False) -> tuple[int, int, int] | None:
        """``PASSIVE``; or, ``restart``, ``RESTART`` holding this process's write slot and waiting
        at most ``RESTART_WAIT_MS`` for other processes' writers and for readers of the old log."""
        try:
            raw = self._engine.raw_connection()  # its connection first: the slot held for the copy alone
            try:
                driver: Any = raw.driver_connection
                if not restart:
                    row: Any = driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                else:
                    assert self._write_slot is not None
                    waits = driver.execute("PRAGMA busy_timeout").fetchone()[0]
                    driver.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
                    try:
                        with self._write_slot:
                            row = driver.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                    finally:
                        driver.execute(f"PRAGMA busy_timeout={int(waits)}")
            finally:
                raw.close()
        # clients hear of it from writes; StoreUnavailable: the file guard refused a new connection
        except (sqlite3.Error, sa_exc.SQLAlchemyError, OSError, StoreUnavailable) as exc:
            self._outage.failed(exc)
            return None
        self._outage.ok()
        self.checkpoints += 1
        return int(row[0]), int(row[1]), int(row[2])

    def _run(self) -> None:
        while not self._closed.is_set():
            if not self._wrote.wait(5.0):
                if self._owner() is None:  # its store was dropped unclosed
                    return
                continue
            if self._closed.wait(self._every_s):  # gather the writes of ``every_s``
                return
            self._wrote.clear()
            try:
                self.checkpoint()
            except Exception:  # the only checkpointer (autocheckpoint is off): it must live on
                log.exception("WAL checkpoint: unexpected failure (trying again after the next writes)")
