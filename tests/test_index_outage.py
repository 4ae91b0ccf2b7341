"""Nothing lost when the index database goes away: PostgreSQL connections cut under load (every backend of
the node's database terminated, again and again, while C-STOREs arrive): each C-STORE is answered Success
only once indexed, otherwise A700 (the sender retries); the node recovers by itself, without a restart.

The test database is the node's own (a fresh one per test), so the first test cuts only its connections;
``test_postgresql_restart_under_load`` stops and starts the whole cluster (root and ``pg_ctlcluster`` only).
``test_workers_that_cannot_reach_the_index_back_off_and_the_node_says_so``: workers that die while the
index refuses connections cannot start again; they are restarted with a growing pause, the node says that
it cannot serve, and serves again by itself once the index is back."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import POSTGRES_ENV, _postgres_database, indexed_count, read_back, scu_store, wait_until
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from test_hostile_identifiers import _ct
from test_service import NotifyListener, path_listener  # noqa: F401 - the fixture, used by name


@pytest.fixture
def postgres_url():
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"set {POSTGRES_ENV} to run the PostgreSQL outage test")
    yield from _postgres_database(base)


def _cut_connections(admin, database: str) -> int:
    with admin.connect() as conn:
        return len(conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database}).all())


@contextmanager
def _storing(node) -> Iterator[dict[str, int]]:
    """Two SCUs storing fresh CT instances in batches of 5 until the block ends; yields (and keeps filling)
    SOP Instance UID -> C-STORE status.  A sender's exception fails the test when the block ends."""
    outcomes: dict[str, int] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            while not stop.is_set():
                datasets = [_ct(SOPInstanceUID=generate_uid()) for _ in range(5)]
                for dataset, status in zip(datasets, scu_store(node, datasets), strict=True):
                    outcomes[dataset.SOPInstanceUID] = int(status.Status)
        except BaseException as exc:  # reported below
            errors.append(exc)

    senders = [threading.Thread(target=send) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for sender in senders:
            sender.join(60)
    assert not errors, errors


def test_postgresql_connections_cut_under_load(running_node, postgres_url):
    node = running_node(database_url=postgres_url)
    admin = create_engine(make_url(postgres_url), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with _storing(node) as outcomes:
            cut = 0
            for _ in range(8):
                time.sleep(0.3)
                cut += _cut_connections(admin, make_url(postgres_url).database)
    finally:
        admin.dispose()
    assert cut > 0
    assert set(outcomes.values()) <= {0x0000, 0xA700}, {hex(s) for s in outcomes.values()}
    # The node recovered by itself: a store now succeeds.
    after = _ct()
    assert [s.Status for s in scu_store(node, [after])] == [0]
    archive = read_back(node.data_dir, postgres_url)
    try:
        acknowledged = [uid for uid, status in outcomes.items() if status == 0]
        for uid in [*acknowledged, after.SOPInstanceUID]:  # never Success without the index
            with archive.open_instance(uid):
                pass
        assert indexed_count(archive) >= len(acknowledged) + 1
    finally:
        archive.close()
    print(f"{cut} connections cut, {len(outcomes)} C-STOREs: "
          f"{sum(1 for s in outcomes.values() if s == 0)} Success, {sum(1 for s in outcomes.values() if s)} A700")


def test_sqlite_index_locked_by_another_process(running_node):
    """Another process holds the SQLite index's write lock (``BEGIN EXCLUSIVE`` in a ``sqlite3``
    connection): each C-STORE waits ``index_busy_timeout``, then gets A700 with an Error Comment, never
    Success and never a hang; once the lock is released the node stores again, without a restart."""
    node = running_node(index_busy_timeout=1.0)
    first = _ct()
    assert [s.Status for s in scu_store(node, [first])] == [0]  # the index file exists and is in use
    locker = sqlite3.connect(node.data_dir / "index.sqlite", isolation_level=None, timeout=10)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        refused = [_ct(SOPInstanceUID=generate_uid()) for _ in range(2)]
        statuses = scu_store(node, refused)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert [int(s.Status) for s in statuses] == [0xA700, 0xA700]
    assert {str(s.ErrorComment) for s in statuses} == {"index database unavailable; retry later"}
    assert "database is locked" in node.log()
    after = _ct()
    assert [s.Status for s in scu_store(node, [after])] == [0]
    archive = read_back(node.data_dir)
    try:
        for uid in (first.SOPInstanceUID, after.SOPInstanceUID):
            with archive.open_instance(uid):
                pass
        assert indexed_count(archive) == 2  # the refused instances are not in the index
    finally:
        archive.close()


def _cluster_of(url: str) -> str | None:
    """The ``pg_ctlcluster`` version of the local cluster on ``url``'s port, when it can be restarted here."""
    if os.geteuid() != 0 or not shutil.which("pg_ctlcluster"):
        return None
    port = str(make_url(url).port or 5432)
    listing = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True).stdout
    return next((line.split()[0] for line in listing.splitlines() if line.split()[2:3] == [port]), None)


def test_postgresql_restart_under_load(running_node, postgres_url):
    """The PostgreSQL cluster itself stopped (fast: every client disconnected) and started again while two
    SCUs store: no Success without the index (A7xx while it is down), and the node stores again by itself
    once it is back.  Needs root and ``pg_ctlcluster`` (CI has both); other runs on the cluster see the
    outage too."""
    version = _cluster_of(postgres_url)
    if version is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the PostgreSQL restart test: needs root, pg_ctlcluster and a local cluster")
        pytest.skip("restarting PostgreSQL needs root, pg_ctlcluster and a local cluster on the test URL's port")
    node = running_node(database_url=postgres_url)
    assert [s.Status for s in scu_store(node, [_ct()])] == [0]
    with _storing(node) as outcomes:
        try:
            time.sleep(0.5)
            subprocess.run(["pg_ctlcluster", version, "main", "stop", "--mode", "fast"], check=True, timeout=60)
            down = len(outcomes)
            for _ in range(100):  # a few stores answered while it is down (bounded: a hung node fails below)
                if len(outcomes) >= down + 4:
                    break
                time.sleep(0.2)
        finally:
            subprocess.run(["pg_ctlcluster", version, "main", "start"], check=True, timeout=60)
    refused = [status for status in outcomes.values() if status]
    assert refused, "no C-STORE arrived while PostgreSQL was down"
    assert all(0xA700 <= status <= 0xA7FF for status in refused), {hex(s) for s in refused}
    after = _ct()  # the node stores again by itself (its pool reconnects), without a restart
    statuses = []
    for _ in range(20):
        statuses = [int(s.Status) for s in scu_store(node, [after])]
        if statuses == [0]:
            break
        time.sleep(0.5)
    assert statuses == [0], node.log()[-2000:]
    archive = read_back(node.data_dir, postgres_url)
    try:
        for uid in [uid for uid, status in outcomes.items() if status == 0] + [after.SOPInstanceUID]:
            with archive.open_instance(uid):  # never Success without the index
                pass
    finally:
        archive.close()
    print(f"PostgreSQL {version} restarted under load: {len(outcomes)} C-STOREs, "
          f"{len(outcomes) - len(refused)} Success, {len(refused)} A7xx")


def _notifications(listener: NotifyListener) -> list[str]:
    """The datagrams the node sent to the notify socket since the last call."""
    received = []
    listener.sock.setblocking(False)
    try:
        while True:
            received.append(listener.sock.recv(65536).decode())
    except BlockingIOError:
        return received
    finally:
        listener.sock.settimeout(2.0)


def test_workers_that_cannot_reach_the_index_back_off_and_the_node_says_so(postgres_url, path_listener,  # noqa: F811
                                                                          running_node):
    """Both workers die (``kill -9``) while the index database refuses every connection
    (``ALLOW_CONNECTIONS false``, its backends terminated): each restart fails at once, and the next one
    waits 1 s, 2 s, 4 s…; once every worker has failed three times in a row the node logs that it cannot
    serve and says so in its systemd status; with the database back, a worker starts, the node says so,
    and a C-STORE succeeds, without a restart of the node.  The compressor, which keeps running, says
    once that it pauses (no traceback every round) and once that it resumes."""
    node = running_node(database_url=postgres_url, workers=2)
    assert [s.Status for s in scu_store(node, [_ct()])] == [0]
    database = make_url(postgres_url).database
    admin = create_engine(make_url(os.environ[POSTGRES_ENV]), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        try:
            _cut_connections(admin, database)
            for pid in re.findall(r"started w\d+ \(pid (\d+)\)", node.log()):
                with contextlib.suppress(ProcessLookupError):  # one still starting may have died already
                    os.kill(int(pid), signal.SIGKILL)
            assert wait_until(lambda: "no worker can serve" in node.log(), timeout=120), node.log()[-3000:]
            log = node.log()
            for worker in ("w1", "w2"):
                pauses = re.findall(rf"{worker} \(pid \d+\) died: (?:killed by SIGKILL|exit status 1), [\d.]+ s after "
                                    r"its start(?:, before it was ready)?; restarting it in (\d+) s", log)
                assert pauses[:3] == ["1", "2", "4"], (worker, pauses)
                assert (f"{worker} cannot start: index database unavailable: "
                        f'connection failed: ') in log and "is not currently accepting connections" in log
            assert "all 2 worker(s) failed 3 or more times in a row" in log
            assert ("STATUS=not serving: every worker fails at start (see the log); retrying"
                    in _notifications(path_listener))
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()
    # The pause is at most 30 s: a worker is back well within this bound.
    assert wait_until(lambda: "a worker serves again" in node.log(), timeout=120), node.log()[-3000:]
    assert f"STATUS=accepting associations on port {node.port}" in "\n".join(_notifications(path_listener))
    # The compressor, unless it was still starting when the connections were cut (then it was restarted
    # like the workers), said once that it paused, and that it resumed.
    paused = node.log().count("deferred compression paused: index database unavailable")
    assert paused <= 1, node.log()[-5000:]
    assert not paused or wait_until(lambda: "deferred compression resumed" in node.log(), timeout=30)
    assert "Traceback" not in node.log(), node.log()[-5000:]
    after = _ct()
    assert [s.Status for s in scu_store(node, [after])] == [0]
    archive = read_back(node.data_dir, postgres_url)
    try:
        with archive.open_instance(after.SOPInstanceUID):
            pass
    finally:
        archive.close()
