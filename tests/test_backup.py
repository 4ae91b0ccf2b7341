"""``dcbnode-admin backup`` and ``restore`` end to end, on a node that ingests and compresses meanwhile.

A separate process sends series after series over real associations and logs each SOP Instance UID the
node answered Success for.  The backup runs while it sends and while the node compresses the series that
went quiet (held for a moment after its index copy, when a compaction would otherwise replace volume
files the copy points to).  Restored into an empty folder, a node starts on it, and every instance
acknowledged before the backup started comes back with the dataset bytes that were sent; ``verify`` is
clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    POSTGRES_ENV,
    REPO,
    RunningNode,
    _postgres_database,
    read_back,
    rebuilt_part10,
    stop_node,
    wait_until,
)
from faithful import ct_series, dataset_bytes
from sqlalchemy import create_engine, text
from test_admin import admin, admin_json, make_config
from test_schema import copy_previous_release, served_digests

#: Sends every series folder under argv[3] over one association each (argv[1:3]: port, called AE) and
#: appends the SOP Instance UID of each instance answered Success to argv[4].
_SENDER = """
import sys, time
from pathlib import Path
import pydicom
from pynetdicom import AE
port, aet, folder, log = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), open(sys.argv[4], "a")
for series in sorted(folder.iterdir()):
    datasets = [pydicom.dcmread(path) for path in sorted(series.iterdir())]
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=aet)
    assert association.is_established
    for dataset in datasets:
        status = association.send_c_store(dataset)
        if status and status.Status == 0:
            log.write(dataset.SOPInstanceUID + "\\n")
            log.flush()
    association.release()
    time.sleep(0.3)  # the series goes quiet: the node compresses it
"""


def _series_folders(directory: Path, series: int, instances: int) -> dict[str, bytes]:
    """``series`` CT series of ``instances`` each, as files; the dataset bytes of each by SOP Instance UID."""
    sent = {}
    for number in range(series):
        folder = directory / f"{number:02d}"
        folder.mkdir(parents=True)
        for index, dataset in enumerate(ct_series(instances)):
            path = folder / f"{index:03d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            sent[dataset.SOPInstanceUID] = dataset_bytes(path.read_bytes())
    return sent


def _generations(data_dir: Path) -> int:
    """How many volume files compaction wrote (``<hash>.gN.dcbs``)."""
    return sum(1 for path in (data_dir / "volumes").rglob("*.g*.dcbs"))


def _acknowledged(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_backup_while_the_node_ingests_and_compresses_then_restore(running_node, database_url: str,
                                                                    tmp_path: Path) -> None:
    sent = _series_folders(tmp_path / "series", series=10, instances=5)
    node: RunningNode = running_node(compression="deferred", compression_delay=0.2, database_url=database_url)
    log = tmp_path / "acknowledged.txt"
    script = tmp_path / "sender.py"
    script.write_text(_SENDER)
    sender = subprocess.Popen([sys.executable, str(script), str(node.port), node.aet, str(tmp_path / "series"),
                               str(log)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: len(_acknowledged(log)) >= 10 and _generations(node.data_dir) >= 1, 120), \
            node.log()[-2000:]
        acknowledged = _acknowledged(log)  # before the backup starts
        config = make_config(tmp_path / "live", node.data_dir, database_url=database_url)
        backup = admin(config, "backup", tmp_path / "backup", json_out=True,
                       env={"DCBNODE_ADMIN_BACKUP_HOLD": "2"})
        assert "holding after: index copied" in backup.stderr
        # the node's compressor found a quiet series while the backup held it, and waited
        assert "deferred compression waits while a backup copies the volumes" in node.log()
        assert sender.poll() is None or len(_acknowledged(log)) > len(acknowledged)  # ingest went on
    finally:
        sender_error = sender.communicate(timeout=300)[1]
    assert sender.returncode == 0, sender_error
    report = json.loads(backup.stdout)
    assert report["database"] == ("postgresql" if database_url else "sqlite") and report["volumes"] >= 2
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert all(os.stat(tmp_path / "backup" / volume["path"]).st_nlink == 1 for volume in manifest["volumes"])

    with contextlib.ExitStack() as stack:
        restored_url = stack.enter_context(contextlib.contextmanager(_postgres_database)(
            os.environ[POSTGRES_ENV])) if database_url else ""
        restored_dir = tmp_path / "restored"
        restored_config = make_config(tmp_path / "restored-config", restored_dir, database_url=restored_url)
        assert admin_json(restored_config, "restore", tmp_path / "backup")["volumes"] == report["volumes"]
        # Every volume the index copy points to came back, and every acknowledged instance is indexed in it.
        engine = create_engine(restored_url or f"sqlite:///{restored_dir / 'index.sqlite'}")
        with engine.connect() as connection:
            indexed_paths = set(connection.execute(text("SELECT path FROM volumes")).scalars())
            indexed_uids = set(connection.execute(text("SELECT sop_instance_uid FROM instances")).scalars())
        engine.dispose()
        assert indexed_paths <= {volume["path"] for volume in manifest["volumes"]}
        assert set(acknowledged) <= indexed_uids

        # A node starts on it (its recovery indexes what arrived while the backup ran); then every
        # acknowledged instance is there with the bytes sent, and verify is clean.
        restored = running_node(data_dir=restored_dir, name="restored", compression_delay=0.2,
                                database_url=restored_url)
        assert wait_until(lambda: "accepting associations" in restored.log(), 60), restored.log()
        assert stop_node(restored) == 0
        assert admin_json(restored_config, "verify")["ok"]
        archive = read_back(restored_dir, restored_url)
        try:
            for uid in acknowledged:
                assert dataset_bytes(rebuilt_part10(archive, uid)) == sent[uid], uid
        finally:
            archive.close()


def test_restore_refuses_a_damaged_backup_and_changes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = make_config(tmp_path / "live", data_dir)
    _series_folders(tmp_path / "series", series=2, instances=2)
    admin(config, "import", tmp_path / "series")
    admin(config, "backup", tmp_path / "backup")
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    damaged = tmp_path / "backup" / manifest["volumes"][-1]["path"]
    content = bytearray(damaged.read_bytes())
    content[-1] ^= 0x01
    damaged.write_bytes(bytes(content))
    target = make_config(tmp_path / "target", tmp_path / "target-data")
    result = admin(target, "restore", tmp_path / "backup", check=1)
    assert "is damaged" in result.stderr and "use another backup" in result.stderr
    assert not list((tmp_path / "target-data").rglob("*.dcbs"))
    assert not (tmp_path / "target-data" / "index.sqlite").exists()


@pytest.mark.parametrize("case", ["destination not empty", "no manifest", "archive not empty"])
def test_backup_and_restore_say_what_to_do(tmp_path: Path, case: str) -> None:
    config = make_config(tmp_path / "live", tmp_path / "data")
    admin(config, "init")
    (tmp_path / "backup").mkdir()
    if case == "destination not empty":
        (tmp_path / "backup" / "something").write_text("x")
        result = admin(config, "backup", tmp_path / "backup", check=1)
        assert "is not an empty folder: give a new folder" in result.stderr
    elif case == "no manifest":
        result = admin(config, "restore", tmp_path / "backup", check=1)
        assert "not a complete dcbnode backup" in result.stderr
    else:
        (tmp_path / "backup").rmdir()
        _series_folders(tmp_path / "series", series=1, instances=1)
        admin(config, "import", tmp_path / "series")
        admin(config, "backup", tmp_path / "backup")
        result = admin(config, "restore", tmp_path / "backup", check=1)  # onto the archive it came from
        assert "holds volumes already: restore into an empty data folder" in result.stderr
        assert admin_json(config, "stats")["instances"] == 1


def test_an_archive_of_the_previous_release_is_backed_up_restored_and_upgraded(tmp_path: Path) -> None:
    """The upgrade procedure of docs/deployment.md: back up first (the new code backs up an index it cannot
    serve yet), restore, upgrade; every instance is served with the bytes the previous release served."""
    expected = copy_previous_release(tmp_path / "data")
    backup = admin_json(make_config(tmp_path / "live", tmp_path / "data"), "backup", tmp_path / "backup")
    assert backup["schema_revision"] is None  # unversioned, as 0.1.0 left it
    config = make_config(tmp_path / "target", tmp_path / "target-data")
    assert admin_json(config, "restore", tmp_path / "backup")["needs_upgrade"]
    assert "dcbnode-admin upgrade" in admin(config, "stats", check=2).stderr
    admin(config, "upgrade")
    assert admin_json(config, "verify")["ok"]
    assert served_digests(tmp_path / "target-data", list(expected)) == expected
