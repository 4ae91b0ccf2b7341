"""Start-up problems an operator meets: each is one line naming the cause, and a known exit status.

An unusable data folder (a file, a place nothing can be created, a folder another node serves) exits 2;
a taken port exits 1 and is reported before the archive's recovery runs; ``--version`` answers from the
installed package's metadata.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import POSTGRES_ENV, REPO, _postgres_database, scu_store, stop_node, write_config
from peers import LOOPBACK, free_port
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def _serve(tmp_path: Path, data_dir: Path | str, port: int, **node: object) -> subprocess.CompletedProcess[str]:
    """Run ``dcbnode serve`` to completion (it is expected to refuse to start)."""
    config = write_config(tmp_path / f"serve-{port}.toml", {"node": {
        "bind": LOOPBACK, "port": port, "data_dir": str(data_dir), **node}})
    return subprocess.run([sys.executable, "-m", "dcbnode.cli.node", "serve", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines that are not the "starting ..." banner, and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if " starting " not in line]


@pytest.mark.parametrize("where", ["a file", "inside /proc", "/proc itself"])
def test_unusable_data_dir_is_one_line_and_exit_2(tmp_path: Path, where: str) -> None:
    data_dir = {"a file": tmp_path / "not-a-folder", "inside /proc": Path("/proc/dcbnode-test/data"),
                "/proc itself": Path("/proc")}[where]
    if where == "a file":
        data_dir.write_bytes(b"x")
    port = free_port()
    result = _serve(tmp_path, data_dir, port)
    assert result.returncode == 2, result.stderr
    lines = _problem_lines(result)
    assert len(lines) == 1 and str(data_dir) in lines[0] and "node.data_dir" in lines[0], lines
    with socket.socket() as probe:
        assert probe.connect_ex((LOOPBACK, port)) != 0  # refused before anything was bound


def test_second_node_on_a_data_folder_in_use_is_refused(running_node, tmp_path: Path) -> None:
    first = running_node()
    result = _serve(tmp_path, first.data_dir, free_port())
    assert result.returncode == 2, result.stderr
    lines = _problem_lines(result)
    assert len(lines) == 1 and "in use by another dcbnode" in lines[0], lines
    assert f"pid {first.process.pid}" in lines[0]
    assert "recovery" not in result.stderr  # the live archive was not touched
    ds = dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.SOPInstanceUID = generate_uid()
    assert scu_store(first, [ds])[0].Status == 0  # the first node goes on serving


def test_taken_port_is_reported_before_recovery(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        result = _serve(tmp_path, tmp_path / "data", taken.getsockname()[1])
    assert result.returncode == 1, result.stderr
    lines = _problem_lines(result)
    assert len(lines) == 1 and "cannot listen" in lines[0] and "in use" in lines[0], lines
    assert "recovery" not in result.stderr  # the port is bound first: no waiting for a recovery to learn it


@pytest.mark.parametrize("module, program", [("dcbnode.cli.node", "dcbnode"), ("dcbnode.cli.admin", "dcbnode-admin")])
def test_version(module: str, program: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--version"], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=True)
    line = result.stdout.strip()
    assert line.startswith(f"{program} {version('dcbnode')} (Python ") and "pynetdicom " in line, line


def test_nodes_with_postgresql_share_a_folder_a_sqlite_node_does_not(running_node, tmp_path: Path) -> None:
    """PostgreSQL nodes hold the folder's lock shared (the scale-out design), SQLite nodes exclusively."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"set {POSTGRES_ENV} to run the PostgreSQL variant")
    database = _postgres_database(base)
    url = next(database)
    try:
        first = running_node(name="first", database_url=url)
        second = running_node(name="second", data_dir=first.data_dir, database_url=url)  # starts: shared lock
        result = _serve(tmp_path, first.data_dir, free_port())  # SQLite on the same folder
        assert result.returncode == 2 and "in use by another dcbnode" in result.stderr, result.stderr
        assert "PostgreSQL index" in result.stderr
        assert stop_node(second) == 0 and stop_node(first) == 0  # before their database goes
    finally:
        database.close()


def test_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind((LOOPBACK, 0))
        port = closed.getsockname()[1]
    url = f"postgresql+psycopg://dcbnode:s3cret-pw@{LOOPBACK}:{port}/dcbnode"
    result = _serve(tmp_path, tmp_path / "data", free_port(), database_url=url)
    assert result.returncode == 1, result.stderr
    lines = _problem_lines(result)
    assert len(lines) == 1 and "cannot open the index postgresql+psycopg://dcbnode:***@" in lines[0], lines
    assert "s3cret-pw" not in result.stderr
