"""Connecting to the index database: SQLite (WAL) by default, PostgreSQL through the same URL."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from . import schema

#: Seconds a SQLite write waits for another process's lock before "database is locked" (the node
#: answers A700): below the 30 s DIMSE timeout most peers use, so a peer gets a status, not a timeout.
DEFAULT_BUSY_TIMEOUT = 10.0


def _sqlite_pragmas(busy_timeout: float) -> Callable[[Any, Any], None]:
    """The connect hook.  WAL lets readers (C-FIND, retrieves) run while ingest writes.

    ``synchronous=NORMAL`` is enough: a volume record is fsynced before its index commit, and
    recovery re-indexes from the volumes whatever the index lost in a power cut.
    """
    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.close()
    return on_connect


#: PostgreSQL's SQLSTATE for "disk_full" (Appendix A of its manual).
_PG_DISK_FULL = "53100"


def is_disk_full(exc: DBAPIError) -> bool:
    """Whether a database error means the database's disk (or quota) is full."""
    driver_error = exc.orig
    return (getattr(driver_error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or getattr(driver_error, "sqlstate", None) == _PG_DISK_FULL)


def reason(exc: DBAPIError) -> str:
    """The driver's message of a database error on one line, for log lines and Error Comments."""
    return " ".join(str(exc.orig).split()) or type(exc.orig).__name__


class OutageNotice:
    """For a background loop that uses the index and tries again: an unreachable index is logged once
    (one line, not a traceback every round), and once more when it works again."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        """``what`` names the loop in the lines, e.g. "deferred compression"."""
        self._log = logger
        self._what = what
        self._lock = threading.Lock()
        self._down = False

    def failed(self, exc: DBAPIError) -> None:
        """A round failed on the index database."""
        with self._lock:
            if self._down:
                return
            self._down = True
        self._log.error("%s paused: index database unavailable: %s; retrying", self._what, reason(exc))

    def succeeded(self) -> None:
        """A round reached the index database."""
        with self._lock:
            if not self._down:
                return
            self._down = False
        self._log.info("%s resumed: the index database is reachable again", self._what)


class CommitUnknownError(Exception):
    """The COMMIT itself failed (:meth:`Index.committing`): it was sent, and whether it took effect is not
    known.  A connection that breaks before the server's reply (the server stopped or the backend was
    terminated at that instant, a network error) raises the same error whether the server applied the
    transaction or not: psycopg's ``OperationalError`` "consuming input failed: server closed the
    connection unexpectedly".  Ask again (:mod:`.commit_outcome`).  ``error`` is the database error."""

    def __init__(self, error: DBAPIError) -> None:
        super().__init__(str(error))
        self.error = error


class Index:
    """The index database: engine, sessions and the schema's version check."""

    def __init__(self, url: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        """``busy_timeout``: seconds a SQLite statement waits for another process's lock (unused for
        PostgreSQL, whose row locks are only held by the node's own short transactions); with either
        database, how long a store whose COMMIT failed asks whether it took effect (:mod:`.commit_outcome`)."""
        self.url = url
        self.busy_timeout = busy_timeout
        if url.startswith("sqlite"):
            self.engine: Engine = create_engine(url, connect_args={"timeout": busy_timeout,
                                                                   "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas(busy_timeout))
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def redacted_url(self) -> str:
        """The URL with any password masked, for messages."""
        return make_url(self.url).render_as_string(hide_password=True)

    def prepare_schema(self) -> None:
        """Create the schema in an empty database; otherwise check that it is at this code's revision, and
        raise :class:`~.schema.SchemaError` (which says what to do) if not.  See :mod:`.schema`."""
        schema.ensure(self.engine, self.redacted_url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        try:
            with self.committing() as session:
                yield session
        except CommitUnknownError as failed:
            raise failed.error from None

    @contextmanager
    def committing(self) -> Iterator[Session]:
        """Like :meth:`session`, but a failure of the COMMIT itself raises :class:`CommitUnknownError`
        (errors before it propagate as they are: the transaction did not take effect)."""
        with self._sessions() as session:
            try:
                yield session
                session.flush()
            except BaseException:
                session.rollback()
                raise
            try:
                session.commit()
            except DBAPIError as exc:
                with contextlib.suppress(DBAPIError):
                    session.rollback()
                raise CommitUnknownError(exc) from exc

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()
