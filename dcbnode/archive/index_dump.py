"""Copying the index database as one consistent snapshot while the node writes to it, and loading one.

- SQLite: the online backup API (``sqlite3.Connection.backup``) in a single step, which reads the
  database in one read transaction (WAL lets the node go on writing meanwhile).  The copy is switched to
  rollback-journal mode so that it is one self-contained file.
- PostgreSQL: ``pg_dump --format=custom`` (a snapshot taken at its start), loaded back with
  ``pg_restore --single-transaction``.  The PostgreSQL client programs must be installed, of the
  server's major version or newer.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

#: The name of the index copy inside a backup, by database kind.
DUMP_NAMES = {"sqlite": "index.sqlite", "postgresql": "index.pgdump"}


class IndexDumpError(Exception):
    """The index could not be copied or loaded; the message says what to do."""


def database_kind(url: str) -> str:
    """``sqlite`` or ``postgresql`` (the index databases dcbnode supports)."""
    kind = make_url(url).get_backend_name()
    if kind not in DUMP_NAMES:
        raise IndexDumpError(f"cannot back up a {kind} index: dcbnode backs up SQLite and PostgreSQL")
    return kind


def dump(url: str, target: Path) -> None:
    """Write a consistent copy of the index at ``url`` to the new file ``target``."""
    if database_kind(url) == "sqlite":
        _sqlite_copy(_sqlite_file(url), target, journal_mode="DELETE")
    else:
        _run("pg_dump", ["--format=custom", f"--file={target}"], make_url(url))


def load(url: str, source: Path) -> None:
    """Load the copy ``source`` into the (empty) index at ``url``, all or nothing."""
    if database_kind(url) == "sqlite":
        target = _sqlite_file(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_copy(source, target, journal_mode="WAL")  # SQLite syncs its commit
    else:
        _run("pg_restore", ["--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error", "--clean",
                            "--if-exists", str(source)], make_url(url))


def instance_count(url: str) -> int | None:
    """How many instances the index at ``url`` holds; None when it has no index tables (or no file)."""
    if database_kind(url) == "sqlite" and not _sqlite_file(url).exists():
        return None
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("instances"):
                return None
            return int(connection.execute(text("SELECT count(*) FROM instances")).scalar_one())
    finally:
        engine.dispose()


def _sqlite_file(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise IndexDumpError(f"the SQLite index {url} is not a file")
    return Path(database)


def _sqlite_copy(source: Path, target: Path, *, journal_mode: str) -> None:
    """Copy the SQLite database ``source`` into ``target`` with the online backup API, in one step."""
    source_connection = sqlite3.connect(source, timeout=30)
    try:
        target_connection = sqlite3.connect(target, timeout=30)
        try:
            source_connection.backup(target_connection)  # pages=-1: one step, one read transaction
            target_connection.execute(f"PRAGMA journal_mode={journal_mode}")
        finally:
            target_connection.close()
    except sqlite3.Error as exc:
        raise IndexDumpError(f"copying the SQLite index {source} to {target} failed: {exc}") from exc
    finally:
        source_connection.close()


def _run(program: str, arguments: list[str], url: URL) -> None:
    """Run a PostgreSQL client program on the database at ``url`` (the password goes in the environment,
    never on the command line)."""
    executable = shutil.which(program)
    if executable is None:
        raise IndexDumpError(f"{program} not found: install the PostgreSQL client programs (Debian: apt-get install "
                             "postgresql-client), of the server's major version or newer")
    conninfo = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    environment = dict(os.environ)
    if url.password:
        environment["PGPASSWORD"] = str(url.password)
    result = subprocess.run([executable, *arguments, f"--dbname={conninfo}"], env=environment,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = " ".join(result.stderr.strip().splitlines()[-3:]) or f"exit status {result.returncode}"
        raise IndexDumpError(f"{program} failed: {detail}")

