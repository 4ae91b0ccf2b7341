"""Connecting to the index database: SQLite (WAL) by default, PostgreSQL through the same URL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from . import schema


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """WAL lets readers (C-FIND, retrieves) run while ingest writes.

    ``synchronous=NORMAL`` is enough: a volume record is fsynced before its index commit, and
    recovery re-indexes from the volumes whatever the index lost in a power cut.
    """
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


#: PostgreSQL's SQLSTATE for "disk_full" (Appendix A of its manual).
_PG_DISK_FULL = "53100"


def is_disk_full(exc: DBAPIError) -> bool:
    """Whether a database error means the database's disk (or quota) is full."""
    driver_error = exc.orig
    return (getattr(driver_error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or getattr(driver_error, "sqlstate", None) == _PG_DISK_FULL)


class Index:
    """The index database: engine, sessions and the schema's version check."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas)
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
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()
