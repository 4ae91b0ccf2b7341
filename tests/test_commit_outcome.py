"""A C-STORE whose index COMMIT fails: the archive asks the index whether it took effect before it cuts
the record back (``dcbnode/index/commit_outcome.py``, ``Archive._settle_failed_commit``).

End to end, on a private PostgreSQL cluster (``pg_cluster.py``): a COMMIT that really took effect while
its connection broke.  The cluster is made to wait in every COMMIT for a synchronous standby that does not
exist; the node's server process, seen waiting so, is terminated: PostgreSQL has committed the transaction
locally, and the node's driver gets "server closed the connection unexpectedly" from the COMMIT.  Before
this fix the node cut the record back and answered A700 while the index kept the row: the instance was
lost, and a re-send was answered "duplicate ignored".

A COMMIT that broke *without* taking effect cannot be produced at a chosen instant without mocks (the
server process would have to die between the last statement and the COMMIT); the decision is tested on
real databases instead, with rows committed and not, and with the failed transaction still running.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from conftest import (
    POSTGRES_ENV,
    _postgres_database,
    indexed_count,
    read_back,
    rebuilt_part10,
    scu_store,
    wait_until,
)
from peers import free_port
from pg_cluster import private_cluster, server_binaries
from pydicom.uid import generate_uid
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from test_archive import _ct_copy
from test_hostile_identifiers import _ct

from dcbnode.archive import Archive, StoreOutcome
from dcbnode.dcbs import Volume, append_instance, encode_instance
from dcbnode.index.commit_outcome import commit_took_effect
from dcbnode.index.database import Index

# --------------------------------------------------------------------------- the decision, on real databases


def _archive_of_one(data_dir: Path, database_url: str) -> Iterator[tuple[Archive, str, str, int]]:
    """An archive holding one instance: (archive, its UID, volume path, offset)."""
    archive = Archive(data_dir, database_url or f"sqlite:///{data_dir / 'index.sqlite'}")
    try:
        uid = archive.store(_ct_copy()).sop_instance_uid
        path, offset = archive.instance_locations([uid])[uid]
        yield archive, uid, path, offset
    finally:
        archive.close()


@pytest.fixture
def stored(tmp_path: Path, database_url: str) -> Iterator[tuple[Archive, str, str, int]]:
    """An archive on SQLite or PostgreSQL holding one instance."""
    yield from _archive_of_one(tmp_path / "data", database_url)


@pytest.fixture
def pg_stored(tmp_path: Path) -> Iterator[tuple[Archive, str, str, int]]:
    """An archive on PostgreSQL (a fresh database of the test server) holding one instance."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"set {POSTGRES_ENV} to run the PostgreSQL tests")
    for url in _postgres_database(base):
        yield from _archive_of_one(tmp_path / "data", url)


def test_a_committed_row_is_told_from_one_that_is_not(stored) -> None:
    archive, uid, path, offset = stored
    assert commit_took_effect(archive.index, uid, path, offset, 5.0) is True
    assert commit_took_effect(archive.index, uid, path, offset + 1, 5.0) is False  # the row points elsewhere
    assert commit_took_effect(archive.index, generate_uid(), path, offset, 5.0) is False  # no row at all


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_unreachable_index_tells_nothing(tmp_path: Path, database: str) -> None:
    """Nothing listens on the port / the SQLite file cannot be opened: None once the budget is spent."""
    url = (f"postgresql+psycopg://dcbnode:x@127.0.0.1:{free_port()}/dcbnode" if database == "postgresql"
           else f"sqlite:///{tmp_path / 'missing-folder' / 'index.sqlite'}")
    index = Index(url)
    try:
        assert commit_took_effect(index, generate_uid(), "volumes/x.dcbs", 64, 0.5) is None
    finally:
        index.dispose()


def _holder(archive: Archive) -> Engine:
    return create_engine(make_url(archive.index.url), poolclass=NullPool)


def _waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND wait_event_type = 'Lock'")).scalar())


@pytest.mark.parametrize("volume", ["known volume", "new volume"])
@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_postgresql_waits_for_the_failed_transaction_to_end(pg_stored, volume: str, ending: str) -> None:
    """The transaction that moved the instance is still open in another connection (its server process
    has not noticed the client is gone): the decision waits for it to end, then sees its outcome.  It
    moved the instance within its volume (updating the volume's row, as every store does) or into a new
    volume (inserting the volume's row, as the first store into a series does)."""
    archive, uid, path, offset = pg_stored
    holder = _holder(archive)
    target = path if volume == "known volume" else f"volumes/{uuid.uuid4().hex}.dcbs"
    outcome: list[bool | None] = []
    try:
        with holder.connect() as conn:
            if volume == "known volume":
                conn.execute(text("UPDATE volumes SET indexed_end = indexed_end + 1 WHERE path = :p"), {"p": path})
            else:
                conn.execute(text("INSERT INTO volumes (path, indexed_end) VALUES (:p, 0)"), {"p": target})
            conn.execute(text("UPDATE instances SET record_offset = :o, volume_pk = (SELECT id FROM volumes "
                              "WHERE path = :p) WHERE sop_instance_uid = :u"), {"o": offset + 8, "p": target, "u": uid})
            asking = threading.Thread(target=lambda: outcome.append(
                commit_took_effect(archive.index, uid, target, offset + 8, 60.0)))
            asking.start()
            assert wait_until(lambda: _waiting_on_a_lock(holder), timeout=30)
            assert not outcome  # still waiting for the transaction
            conn.commit() if ending == "commit" else conn.rollback()
            asking.join(60)
    finally:
        holder.dispose()
    assert outcome == [ending == "commit"]


def test_postgresql_tells_nothing_while_the_failed_transaction_runs_on(pg_stored) -> None:
    archive, uid, path, offset = pg_stored
    holder = _holder(archive)
    try:
        with holder.connect() as conn:
            conn.execute(text("UPDATE volumes SET indexed_end = indexed_end + 1 WHERE path = :p"), {"p": path})
            assert commit_took_effect(archive.index, uid, path, offset, 1.0) is None
            conn.rollback()
    finally:
        holder.dispose()
    assert commit_took_effect(archive.index, uid, path, offset, 1.0) is True


@pytest.mark.parametrize("next_store", ["another instance", "the same instance again"])
def test_a_kept_record_that_the_index_lacks_is_indexed_by_the_next_store(tmp_path: Path, database_url: str,
                                                                        next_store: str) -> None:
    """A record kept after a COMMIT of unknown outcome that did not take effect (here: written to the
    volume and never indexed, then handed to the archive as kept) is indexed by the next store into its
    series, as recovery would index it; a re-send of that instance is then a duplicate of it."""
    archive = Archive(tmp_path / "data", database_url or f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    try:
        series = generate_uid()
        first = archive.store(_ct_copy(series)).sop_instance_uid
        relative, _ = archive.instance_locations([first])[first]
        data = _ct_copy(series)
        encoded = encode_instance(data)
        with Volume.open(archive.volume_file(relative), writable=True) as volume:
            location, _ = append_instance(volume, encoded)
        archive.unsettled.keep(archive.indexed_record(encoded, relative, location, "SCU"))
        kept = encoded.meta.sop_instance_uid
        assert archive.instance_locations([kept]) == {}

        result = archive.store(data if next_store == "the same instance again" else _ct_copy(series))
        assert archive.instance_locations([kept]) == {kept: (relative, location.offset)}
        if next_store == "the same instance again":
            assert result.outcome is StoreOutcome.DUPLICATE_IGNORED
        assert indexed_count(archive) == (2 if next_store == "the same instance again" else 3)
        with archive.open_instance(kept) as stored:
            assert stored.meta.sop_instance_uid == kept
        archive.store(_ct_copy(series))  # settled once: nothing left to do
    finally:
        archive.close()


# --------------------------------------------------------------------------- end to end, a private cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A private PostgreSQL cluster (its superuser URL)."""
    if server_binaries() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the broken-COMMIT tests: install PostgreSQL's server (initdb, pg_ctl)")
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    with private_cluster() as url:
        yield url


@pytest.fixture
def cluster_database(cluster: str) -> Iterator[tuple[Engine, str]]:
    """A fresh database in the private cluster: (an AUTOCOMMIT superuser engine on the cluster, its URL)."""
    admin = create_engine(make_url(cluster), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"commit_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin, make_url(cluster).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _standby(admin: Engine, name: str) -> None:
    """Make every COMMIT of the cluster wait for a synchronous standby called ``name`` ("": none)."""
    with admin.connect() as conn:
        if name:
            conn.execute(text(f"ALTER SYSTEM SET synchronous_standby_names = '{name}'"))
        else:
            conn.execute(text("ALTER SYSTEM RESET synchronous_standby_names"))
        conn.execute(text("SELECT pg_reload_conf()"))


@contextmanager
def _commits_cut(admin: Engine, database: str, *, then_refuse: bool = False) -> Iterator[list[int]]:
    """While the block runs, every COMMIT waits for a standby that does not exist; the first server process
    of ``database`` seen waiting so is terminated — its transaction took effect — and COMMITs are left to
    finish again.  ``then_refuse``: the database refuses new connections from just before that instant
    (the caller lets them in again).  Yields the pids terminated (one, once it happened)."""
    terminated: list[int] = []
    done = threading.Event()

    def cut() -> None:
        with admin.connect() as conn:
            conn.execute(text("SET synchronous_commit = local"))  # its own ALTER DATABASE must not wait
            while not done.is_set():
                pid = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :db "
                                        "AND wait_event = 'SyncRep'"), {"db": database}).scalar()
                if pid is not None:
                    if then_refuse:
                        conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
                    conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                    terminated.append(pid)
                    _standby(admin, "")
                    return
                time.sleep(0.02)

    _standby(admin, "dcbnode_absent_standby")
    cutter = threading.Thread(target=cut)
    cutter.start()
    try:
        yield terminated
    finally:
        done.set()
        cutter.join(30)
        _standby(admin, "")


def _store_until_cut(node, terminated: list[int], study: str, series: str) -> tuple[pydicom.Dataset, int]:
    """Store new instances of one series until one's COMMIT was cut (the cluster applies the standby
    setting a moment after it is asked to); that instance and its C-STORE status."""
    for _ in range(10):
        dataset = _ct(StudyInstanceUID=study, SeriesInstanceUID=series)
        (status,) = scu_store(node, [dataset])
        if terminated:
            return dataset, int(status.Status)
        assert status.Status == 0
    raise AssertionError("no C-STORE's COMMIT was caught waiting for the standby")


def _assert_archived(node, database_url: str, dataset: pydicom.Dataset) -> None:
    """``dataset`` comes back from the archive: the same UID and pixels."""
    archive = read_back(node.data_dir, database_url)
    try:
        back = pydicom.dcmread(BytesIO(rebuilt_part10(archive, dataset.SOPInstanceUID)))
    finally:
        archive.close()
    assert back.SOPInstanceUID == dataset.SOPInstanceUID
    assert back.PixelData == dataset.PixelData


def test_a_commit_cut_after_it_took_effect_answers_success(cluster_database, running_node) -> None:
    """The COMMIT took effect but its connection broke: the node asks the index again, finds the row
    pointing at the record, keeps it and answers Success; the instance comes back."""
    admin, url = cluster_database
    node = running_node(database_url=url, workers=1, compression_delay=3600)
    study, series = generate_uid(), generate_uid()
    assert [s.Status for s in scu_store(node, [_ct(StudyInstanceUID=study, SeriesInstanceUID=series)])] == [0]
    with _commits_cut(admin, make_url(url).database) as terminated:
        dataset, status = _store_until_cut(node, terminated, study, series)
    assert status == 0, node.log()[-3000:]
    assert f"index commit of {dataset.SOPInstanceUID} failed (" in node.log()
    assert "but it took effect: stored at" in node.log()
    _assert_archived(node, url, dataset)


def test_a_commit_cut_then_the_index_gone_keeps_the_record(cluster_database, running_node) -> None:
    """The COMMIT took effect, its connection broke, and the database refuses connections for longer than
    ``index_busy_timeout``: the node cannot tell, answers A700 and keeps the record (it does not cut back
    bytes the index may point at).  Once the database is back the instance is archived, intact, and a
    re-send of it is answered Success as a duplicate."""
    admin, url = cluster_database
    database = make_url(url).database
    node = running_node(database_url=url, workers=1, compression_delay=3600, index_busy_timeout=1.0)
    study, series = generate_uid(), generate_uid()
    assert [s.Status for s in scu_store(node, [_ct(StudyInstanceUID=study, SeriesInstanceUID=series)])] == [0]
    try:
        with _commits_cut(admin, database, then_refuse=True) as terminated:
            dataset, status = _store_until_cut(node, terminated, study, series)
        assert status == 0xA700, node.log()[-3000:]
        assert "the index could not tell within 1 s whether it took effect: kept at" in node.log()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
    _assert_archived(node, url, dataset)
    assert [s.Status for s in scu_store(node, [dataset])] == [0]
    assert f"SOP Instance {dataset.SOPInstanceUID} was already stored" in node.log()
    _assert_archived(node, url, dataset)
