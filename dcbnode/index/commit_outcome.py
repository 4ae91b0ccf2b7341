"""After a COMMIT that failed: did it take effect?

A store's index transaction is committed after its volume record is durable.  If the COMMIT itself fails
(:class:`~.database.CommitUnknownError`), the server may have applied it or not; cutting the record back
on a guess could leave a committed index row pointing at bytes that are gone (and a re-send of the
instance answered "duplicate ignored").  So the archive asks the index again, on a fresh connection, where
it places the instance.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError

from .database import Index
from .models import VolumeRow
from .writer import instance_location

#: Between two attempts to reach an index that is unavailable.
_RETRY_PAUSE = 0.25
_VOLUMES = VolumeRow.__table__


def commit_took_effect(index: Index, sop_instance_uid: str, volume_path: str, offset: int,
                       budget: float) -> bool | None:
    """Whether the index places ``sop_instance_uid`` at ``offset`` in ``volume_path`` now: True if the failed
    COMMIT of the transaction that put it there took effect, False if not; None if the index could not
    be asked within ``budget`` seconds (unreachable meanwhile, or the transaction still running).

    PostgreSQL: the failed transaction may still be running in its server process (which has not noticed
    that the client went away, or is finishing the COMMIT), so the question is asked only once it ended,
    which the locks it held show: every store's transaction updates its volume's row, or inserts it for a
    new volume.  SQLite: the transaction ended with the failed COMMIT, in this process.
    """
    deadline = time.monotonic() + budget
    while True:
        try:
            with index.engine.connect() as connection:
                if connection.dialect.name == "postgresql":
                    _wait_for_writers(connection, volume_path, deadline)
                location = instance_location(connection, sop_instance_uid)
                connection.rollback()  # nothing written: _wait_for_writers' row is undone
            return location == (volume_path, offset)
        except DBAPIError:  # unavailable, or a lock not granted in time
            if time.monotonic() >= deadline:
                return None
            time.sleep(_RETRY_PAUSE)


def _wait_for_writers(connection: Connection, volume_path: str, deadline: float) -> None:
    """Wait (until ``deadline``, then raise) for every transaction that inserted or updated the volume's
    row to end: an insert of the same path waits for an uncommitted insert of it, a row lock for an
    uncommitted update.  The caller rolls back."""
    milliseconds = max(1, int((deadline - time.monotonic()) * 1000))
    connection.execute(select(func.set_config("lock_timeout", f"{milliseconds}ms", True)))
    connection.execute(postgresql.insert(_VOLUMES).values(path=volume_path, indexed_end=0)
                       .on_conflict_do_nothing(index_elements=["path"]))
    connection.execute(select(_VOLUMES.c.id).where(_VOLUMES.c.path == volume_path).with_for_update())
