"""The SQLite file under a running server: never acknowledge a write into the void.

A database file deleted, replaced or moved while the server runs does not stop SQLite:
its open connections keep writing to the old inode, every write is acknowledged, and
the next start finds no file (or another one) and begins from an empty database. Two
guards close that hole:

- ``FileIdentity`` remembers the file's identity (``st_dev``, ``st_ino``) when the store
  opens it and compares it before every write transaction commits, on ``/readyz`` and
  when the pool opens a connection (``refuse_another_file``). A file that is gone or not
  the same one makes the write a ``503`` (rolled back, never acknowledged) and readiness
  fail, with one log line when it happens (and one when the file is back). Reads on the
  connections already open go on reading the file the server opened; a new connection
  would read the other one (a run it acknowledged there answered as missing), so it is
  refused: a ``503`` too.
- A marker file next to the database (``.<name>.lrserve``), written once the database
  exists, is how a later start knows that one *existed*: finding the marker but no
  database, ``open_store`` refuses (one line, exit 1) instead of creating an empty one,
  unless asked to create it (``--create-db`` / ``LRSERVE_CREATE_DB=1``). The first start
  in a fresh place has no marker and creates the database as always.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from lrserve.service.errors import StoreUnavailable

log = logging.getLogger("lrserve")


class DatabaseMissing(StoreUnavailable):
    """A database existed at the configured path and is gone: not created anew unasked."""


def marker_path(database: Path) -> Path:
    return database.with_name(f".{database.name}.lrserve")


def check_existed(database: Path, *, create: bool) -> None:
    """Refuse to start on a missing database that the marker says existed (unless ``create``).

    Raises:
        DatabaseMissing: the marker is there and the database is not.
    """
    if create or database.exists() or not marker_path(database).exists():
        return
    raise DatabaseMissing(
        f"SQLite database {database} does not exist, but lrserve created one there before "
        f"({marker_path(database).name} says so): restore it, or pass --create-db "
        "(LRSERVE_CREATE_DB=1) to start an empty one"
    )


def unwritable(database: Path) -> str | None:
    """Why the server could not write the SQLite database, and what to do; ``None`` when it can.

    SQLite opens a file it cannot write read-only without a word (every write then fails),
    and one in a directory where it cannot create its ``-wal`` file fails with only "unable to
    open database file": a start-up asks first. ``os.access`` answers for the server's user,
    root included (an immutable file, ``chattr +i``, or a read-only mount refuse root too).
    """
    directory = database.parent
    try:
        read_only_mount = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return None  # a missing directory: SQLite's own error says so
    if read_only_mount:
        return (f"the file system holding {directory} is mounted read-only: remount it read-write, "
                "or point LRSERVE_DB at a writable place")
    wal = database.with_name(database.name + "-wal")
    for path in (database, wal):
        if path.exists() and not os.access(path, os.W_OK):
            return (f"{path.name} is read-only for this user (permissions, or chattr +i): make it "
                    "writable (chmod u+w, chattr -i), or start from a writable copy")
    if not wal.exists() and not os.access(directory, os.W_OK):
        return (f"the directory {directory} is not writable for this user and SQLite keeps its "
                f"-wal and -shm files there: make it writable, or move the database")
    return None


def write_marker(database: Path) -> None:
    """Note that the database exists (idempotent; a directory we cannot write is only logged)."""
    marker = marker_path(database)
    if marker.exists():
        return
    try:
        marker.write_text(
            f"lrserve created the SQLite database {database.name} in this directory. While this file\n"
            "exists, lrserve refuses to start without that database (it would start empty);\n"
            "pass --create-db or set LRSERVE_CREATE_DB=1 to start a new one on purpose.\n"
        )
    except OSError as exc:
        log.warning("cannot write %s (%s): a deleted database would not be noticed at start-up",
                    marker, exc.strerror)


_LOG_DELETED = "left without its write-ahead log (its -wal file deleted or replaced)"
_LOG_GONE = (" (stop the server with SIGTERM, not kill -9: its last connection's close copies the "
             "removed log, which it still holds open, into the database file, with every commit "
             "acknowledged before)")


class FileIdentity:
    """The identity of the SQLite file a store opened; ``check`` raises once it changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._where = str(path)  # ``os.stat`` of a str: a Path is turned into one on every call
        self._identity = self._stat()
        self._problem: str | None = None
        self._lock = threading.Lock()
        self._log = self._where + "-wal"
        self._log_lost = False
        self._log_identity: tuple[int, int] | None = None
        self._holding: sqlite3.Connection | None = None
        self._hold_log()

    def _hold_log(self) -> None:
        """Keep a connection of our own open on the file for the store's life, once it has read
        the file (so SQLite has its write-ahead log open), and note the log's identity. While
        any connection to the file is open SQLite neither deletes nor starts another log file,
        in this process or any other: a log missing or another file is someone else's doing."""
        try:
            holding = sqlite3.connect(self._where, check_same_thread=False)
            holding.execute("PRAGMA schema_version").fetchone()
            if holding.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                holding.close()  # no log to watch (a file SQLite keeps out of WAL mode)
                return
            st = os.stat(self._log)
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot watch the write-ahead log of %s (%s): its removal would not be noticed",
                        self.path, exc)
            return
        self._holding, self._log_identity = holding, (st.st_dev, st.st_ino)

    def _log_gone(self) -> bool:
        if self._log_lost:
            return True
        if self._log_identity is None:
            return False
        try:
            st = os.stat(self._log)
        except FileNotFoundError:
            self._log_lost = True
            return True
        self._log_lost = (st.st_dev, st.st_ino) != self._log_identity
        return self._log_lost

    def close(self) -> None:
        """Close the connection that holds the log (the store's last)."""
        holding, self._holding = self._holding, None
        if holding is not None:
            holding.close()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._where)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def check(self) -> None:
        """Raises StoreUnavailable if the file at the path is not the one opened, or its
        write-ahead log not the one SQLite holds open (``_hold_log``): SQLite writes on into a
        removed log, and a commit acknowledged then is lost with it (a bug hunt's ``rm
        lrserve.db-wal``: 20 steps acknowledged, then gone after a kill -9). The log's loss is
        for good, until a restart: a connection opened later would start another log beside the
        removed one the others still write to (a first version checked the log's presence
        alone: it passed again once the checkpoint thread had opened a connection, under load).

        Cost: two ``stat`` calls (about a microsecond each), once per write transaction and
        once per connection the pool opens (``refuse_another_file``).
        """
        problem: str | None = None
        try:
            now = self._stat()
            if now == self._identity and self._log_gone():
                problem = _LOG_DELETED
        except OSError as exc:  # the directory itself went away or is unreadable
            now, problem = None, f"cannot be checked ({exc.strerror})"
        if problem is None and now is not None and now == self._identity:
            if self._problem is not None:
                with self._lock:
                    if self._problem is not None:
                        log.warning("SQLite database %s is back: writes accepted again", self.path)
                        self._problem = None
            return
        problem = problem or ("deleted or moved" if now is None else "replaced by another file")
        if self._problem != problem:
            with self._lock:
                if self._problem != problem:
                    log.error("SQLite database %s was %s while the server ran: refusing every write "
                              "and every new connection (nothing is acknowledged) until the file is "
                              "back; restart to pick up a replacement%s", self.path, problem,
                              _LOG_GONE if problem is _LOG_DELETED else "")
                    self._problem = problem
        error = StoreUnavailable(f"SQLite database {self.path} was {problem} while the server ran")
        error.logged = True  # the line above, once per fault
        raise error

    def refuse_another_file(self, dbapi_connection: Any, _record: Any) -> None:
        """The pool's ``connect`` event: a connection just opened on a file that is not the one
        the store opened is closed, and ``check``'s ``StoreUnavailable`` raised (checked after
        the open: a file replaced before it is seen, one replaced after it is the old inode)."""
        try:
            self.check()
        except StoreUnavailable:
            dbapi_connection.close()
            raise
