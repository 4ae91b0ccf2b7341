"""The index schema's version (Alembic): fresh indexes, the previous release's index, and a newer one.

The fixture ``tests/data/release-0.1.0`` is a data folder written by dcbnode 0.1.0 (see its README): the
node refuses it until ``dcbnode-admin upgrade`` ran, then serves every instance with the bytes 0.1.0
served, and compresses the series 0.1.0 left waiting.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import REPO, read_back, scu_store, wait_until, write_config
from faithful import ct_series, dataset_bytes
from peers import LOOPBACK, free_port
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import create_engine, text
from test_admin import admin, admin_json, make_config

from dcbnode.dcbs import available_syntaxes, rebuild
from dcbnode.index import Index
from dcbnode.index.models import Base
from dcbnode.index.schema import LEGACY, alembic_config, head_revision, schema_state

PREVIOUS_RELEASE = Path(__file__).resolve().parent / "data" / "release-0.1.0"


def copy_previous_release(data_dir: Path) -> dict[str, str]:
    """Copy the archive 0.1.0 wrote to ``data_dir``; the SHA-256 of the dataset bytes it served, by SOP
    Instance UID (see the fixture's README)."""
    shutil.copytree(PREVIOUS_RELEASE, data_dir, ignore=shutil.ignore_patterns("*.md", "*.py", "*.json"))
    expected = json.loads((PREVIOUS_RELEASE / "expected.json").read_text())
    return {uid: entry["dataset_sha256"] for uid, entry in expected.items()}


def served_digests(data_dir: Path, uids: list[str]) -> dict[str, str]:
    """The SHA-256 of the dataset bytes each instance is served with now, in the form the fixture records."""
    archive = read_back(data_dir)
    try:
        digests = {}
        for uid in uids:
            with archive.open_instance(uid) as stored:
                syntaxes = available_syntaxes(stored.meta)
                syntax = ExplicitVRLittleEndian if ExplicitVRLittleEndian in syntaxes else stored.meta.received_syntax
                part10 = rebuild(stored.meta, stored.blobs, stored.frame, syntax).part10()
            digests[uid] = hashlib.sha256(dataset_bytes(part10)).hexdigest()
        return digests
    finally:
        archive.close()


def _schema_differences(url: str) -> list:
    """What Alembic's autogenerate would change to make the database match the models (empty: nothing)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def _serve_once(tmp_path: Path, data_dir: Path, **node: object) -> subprocess.CompletedProcess[str]:
    """Run ``dcbnode serve`` on ``data_dir`` expecting it to refuse to start (it must exit by itself)."""
    config = write_config(tmp_path / "serve.toml", {"node": {"data_dir": str(data_dir), "bind": LOOPBACK,
                                                              "port": free_port(), **node}})
    return subprocess.run([sys.executable, "-m", "dcbnode.cli.node", "serve", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_previous_release_index_is_refused_then_upgraded_and_serves_every_instance(running_node,
                                                                                     tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    expected = copy_previous_release(data_dir)
    config = make_config(tmp_path, data_dir)

    refused = _serve_once(tmp_path, data_dir)
    assert refused.returncode == 2, refused.stderr
    assert "dcbnode-admin upgrade" in refused.stderr and LEGACY in refused.stderr
    refused_admin = admin(config, "stats", check=2)
    assert "dcbnode-admin upgrade" in refused_admin.stderr

    result = admin_json(config, "upgrade")
    # 0.1.0 had no version table: every revision is applied, in order, ending at the latest one.
    revisions = [script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()]
    assert result["before"] == LEGACY and result["applied"] == revisions[::-1]
    assert result["after"] == head_revision() == revisions[0]
    assert admin_json(config, "upgrade")["applied"] == []  # twice is harmless
    url = f"sqlite:///{data_dir / 'index.sqlite'}"
    assert _schema_differences(url) == []  # 0.1.0's tables are exactly the first revision's

    assert served_digests(data_dir, list(expected)) == expected
    # The node starts on it, and compresses the two series 0.1.0 left waiting without changing a byte.
    node = running_node(data_dir=data_dir, compression_delay=0.1)
    with sqlite3.connect(data_dir / "index.sqlite") as connection:
        assert wait_until(lambda: not connection.execute("SELECT count(*) FROM pending_compression").fetchone()[0],
                          timeout=60), node.log()
    assert served_digests(data_dir, list(expected)) == expected
    assert admin_json(config, "verify")["ok"]


def test_a_fresh_index_is_created_at_the_latest_revision(database_url: str, tmp_path: Path) -> None:
    url = database_url or f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = Index(url)
    try:
        assert schema_state(index.engine).empty
        index.prepare_schema()
        index.prepare_schema()  # and opened again
        state = schema_state(index.engine)
    finally:
        index.dispose()
    assert state.current == head_revision() and state.up_to_date
    assert _schema_differences(url) == []  # the migrations make exactly what the models describe


def test_an_unversioned_index_is_adopted(database_url: str, tmp_path: Path) -> None:
    """What 0.1.0 created with ``create_all``, in either database: refused, upgraded, then used."""
    url = database_url or f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}"
    (tmp_path / "data").mkdir()
    engine = create_engine(url)
    first = ScriptDirectory.from_config(alembic_config()).get_revision("0001")
    first.module.tables().create_all(engine)  # 0.1.0's tables, no version table
    engine.dispose()
    config = make_config(tmp_path, tmp_path / "data", database_url=url)
    assert "dcbnode-admin upgrade" in admin(config, "stats", check=2).stderr
    assert admin_json(config, "upgrade")["before"] == LEGACY
    admin(config, "import", get_testdata_file("CT_small.dcm", download=False))
    assert admin_json(config, "stats")["instances"] == 1
    assert _schema_differences(url) == []


def test_an_index_upgraded_by_a_newer_dcbnode_is_refused(database_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url = database_url or f"sqlite:///{data_dir / 'index.sqlite'}"
    config = make_config(tmp_path, data_dir, database_url=url)
    admin(config, "init")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    refused = _serve_once(tmp_path, data_dir, database_url=url)
    assert refused.returncode == 2
    assert "revision 9999" in refused.stderr and "a newer dcbnode upgraded it" in refused.stderr
    for name in ("upgrade", "stats"):
        assert "a newer dcbnode upgraded it" in admin(config, name, check=2).stderr


def test_upgrade_without_an_index_says_so(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "nowhere")
    result = admin(config, "upgrade", check=2)
    assert "no index at" in result.stderr and "dcbnode-admin init" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_upgrade_refuses_while_a_node_runs(running_node, tmp_path: Path) -> None:
    node = running_node()
    result = admin(make_config(tmp_path, node.data_dir), "upgrade", check=2)
    assert "in use by another dcbnode" in result.stderr and "before upgrading the index" in result.stderr


def test_a_node_that_created_its_index_keeps_its_sqlite_locks(running_node) -> None:
    """Creating the schema must not drop the POSIX locks SQLite holds in the node's process (closing any
    descriptor of the database file would): else the next process to close a connection to the index
    thinks it is the last one and deletes the WAL under the running node."""
    node = running_node()  # a fresh folder: the node creates the index
    assert all(status.Status == 0 for status in scu_store(node, ct_series(2)))
    wal = node.data_dir / "index.sqlite-wal"
    assert wal.exists()
    connection = sqlite3.connect(node.data_dir / "index.sqlite")
    assert connection.execute("SELECT count(*) FROM instances").fetchone() == (2,)
    connection.close()
    assert wal.exists(), "another process deleted the WAL of the running node"


def test_an_index_at_an_older_revision_is_refused_then_upgraded(database_url: str, tmp_path: Path) -> None:
    """The step every later release takes: an index one revision behind (written by the release before)."""
    oldest_first = [script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()][::-1]
    assert len(oldest_first) >= 2, "needs two revisions"
    (tmp_path / "data").mkdir()
    url = database_url or f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), oldest_first[-2])
    engine.dispose()
    config = make_config(tmp_path, tmp_path / "data", database_url=url)
    refused = admin(config, "stats", check=2).stderr
    assert f"schema revision {oldest_first[-2]}" in refused and "dcbnode-admin upgrade" in refused
    result = admin_json(config, "upgrade")
    assert result["before"] == f"revision {oldest_first[-2]}" and result["applied"] == oldest_first[-1:]
    assert _schema_differences(url) == []
    admin(config, "import", get_testdata_file("CT_small.dcm", download=False))
