"""The index schema's version, kept by Alembic (the SQLAlchemy project's migration tool).

The migrations ship inside the package (``dcbnode/index/migrations/versions``) and run on the index's
own engine: Alembic is configured here, in code, and no ``alembic.ini`` exists.  The revision an
index is at is in its ``alembic_version`` table.

- an empty database is brought to the latest revision by whoever opens it first (``dcbnode serve``
  on a fresh install, ``dcbnode-admin init``);
- an index at an older revision, or one written by dcbnode 0.1.0 (tables but no version table), is
  upgraded only by ``dcbnode-admin upgrade``: the node refuses to start on it;
- an index at a revision this code does not know was upgraded by a newer dcbnode: refused too.

Upgrades are serialized between processes: a PostgreSQL advisory lock held by the upgrade's
transaction, or an ``flock`` on the folder of the SQLite database file.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from .models import Base

#: Where the migration scripts are, as a package resource (works from a wheel and from a checkout).
MIGRATIONS = "dcbnode.index:migrations"
#: PostgreSQL advisory lock key of schema upgrades (any constant; "dcbnode" in ASCII).
_PG_LOCK_KEY = 0x6463626E6F6465
#: Shown in messages for an index that has tables but no version: what dcbnode 0.1.0 wrote.
LEGACY = "0.1.0 (unversioned)"


class SchemaError(Exception):
    """The index schema does not fit this dcbnode; the message says what to do."""


class SchemaOutdatedError(SchemaError):
    """The index is at an older revision than this code: run ``dcbnode-admin upgrade``."""


class SchemaTooNewError(SchemaError):
    """The index was upgraded by a newer dcbnode than this one."""


@dataclass(frozen=True)
class SchemaState:
    """Where an index stands: ``current`` revision (None without a version table), the ``head`` this
    code knows, and whether any of dcbnode's tables exist."""

    current: str | None
    head: str
    has_tables: bool
    known: bool

    @property
    def empty(self) -> bool:
        """A database dcbnode never wrote to."""
        return self.current is None and not self.has_tables

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def described(self) -> str:
        """The current revision for messages."""
        if self.current is not None:
            return f"revision {self.current}"
        return "empty" if not self.has_tables else LEGACY


@dataclass(frozen=True)
class UpgradeResult:
    """What :func:`upgrade` did: ``before`` as :attr:`SchemaState.described`, ``after`` a revision, and
    the revisions applied in order."""

    before: str
    after: str
    applied: list[str]


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the shipped migrations; ``connection`` is what ``env.py`` runs them on."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The latest revision this code knows."""
    head = _scripts().get_current_head()
    assert head is not None, "no migrations shipped"
    return head


def _state(connection: Connection) -> SchemaState:
    scripts = _scripts()
    current = MigrationContext.configure(connection).get_current_revision()
    ours = set(Base.metadata.tables) & set(inspect(connection).get_table_names())
    known = current is None or _is_known(scripts, current)
    return SchemaState(current, scripts.get_current_head() or "", bool(ours), known)


def _is_known(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for an unknown or ambiguous id
        return False


def schema_state(engine: Engine) -> SchemaState:
    """Read where the index stands (no lock, no change)."""
    with engine.connect() as connection:
        return _state(connection)


def check(state: SchemaState, where: str) -> None:
    """Raise :class:`SchemaError` with what to do unless the index at ``where`` is at this code's revision
    (an empty index passes: the caller creates it)."""
    if state.up_to_date or state.empty:
        return
    if not state.known:
        raise SchemaTooNewError(
            f"the index {where} is at schema revision {state.current}, which this dcbnode does not know (it "
            f"knows up to {state.head}): a newer dcbnode upgraded it. Run that version (or a newer one); "
            "an older dcbnode cannot use this index")
    raise SchemaOutdatedError(
        f"the index {where} is at schema {state.described}, this dcbnode needs revision {state.head}: stop every "
        "node using it, back it up, then run 'dcbnode-admin upgrade' (with the same --config)")


def ensure(engine: Engine, where: str) -> None:
    """Create the schema on an empty database; otherwise check that it is at this code's revision
    (raises :class:`SchemaError`).  ``where`` names the index in messages."""
    state = schema_state(engine)
    if state.empty:
        with _exclusive(engine) as connection:
            state = _state(connection)  # another process may have created it meanwhile
            if state.empty:
                command.upgrade(alembic_config(connection), "head")
                return
    check(state, where)


def upgrade(engine: Engine, where: str) -> UpgradeResult:
    """Apply every migration the index lacks, in one transaction where the database allows it (PostgreSQL);
    raises :class:`SchemaTooNewError` for an index a newer dcbnode upgraded."""
    with _exclusive(engine) as connection:
        state = _state(connection)
        if not state.known:
            check(state, where)
        # newest first, down to (not including) the current revision
        pending = _scripts().iterate_revisions(state.head, state.current or "base")
        applied = [script.revision for script in reversed(list(pending))]
        if applied:
            command.upgrade(alembic_config(connection), "head")
    return UpgradeResult(state.described, state.head, applied)


@contextmanager
def _exclusive(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that no other process's schema change runs beside (committed at the end)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            yield connection
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        with engine.begin() as connection:
            yield connection
        return
    # The folder, never the database file: closing any descriptor of the file would drop the POSIX locks
    # SQLite's own connections in this process hold on it, and another process could then delete the WAL.
    fd = os.open(os.path.dirname(os.path.abspath(database)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with engine.begin() as connection:
            yield connection
    finally:
        os.close(fd)  # releases the flock
