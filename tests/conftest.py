"""Fixtures for end-to-end node tests: the node runs as a subprocess, exactly as a user starts it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import LOOPBACK, free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
NODE_AET = "DCBNODE"
POSTGRES_ENV = "DCBNODE_TEST_POSTGRES_URL"


class RunningNode(NamedTuple):
    """A started node: where to reach it, where it stores, and its process (stderr in ``log_path``)."""

    host: str
    port: int
    aet: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path

    def log(self) -> str:
        """Everything the node logged so far."""
        return self.log_path.read_text(errors="replace")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """Write ``{"node": {...}, "access": {...}}`` as TOML."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def start_node(tmp_path: Path, *, access: dict[str, Any] | None = None, name: str = "node",
               data_dir: Path | None = None, port: int | None = None,
               tables: dict[str, dict[str, Any]] | None = None, **node: Any) -> RunningNode:
    """Start ``python -m dcbnode.cli.node serve --config <tmp>.toml`` and wait until it listens.

    ``node`` keys go to ``[node]`` (defaults: loopback, a free port, ``tmp_path/name-data``); ``tables``
    are more tables, e.g. ``{"storage": {...}, "peers.STORESCP": {"host": ..., "port": ...}}``.
    """
    port = free_port() if port is None else port
    data_dir = data_dir or tmp_path / f"{name}-data"
    settings = {"ae_title": NODE_AET, "bind": LOOPBACK, "port": port, "data_dir": str(data_dir), **node}
    config_tables: dict[str, dict[str, Any]] = {"node": settings}
    if access:
        config_tables["access"] = access
    config_tables.update(tables or {})
    config_path = write_config(tmp_path / f"{name}.toml", config_tables)
    log_path = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "dcbnode.cli.node", "serve", "--config", str(config_path)],
                                   cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        # port 0: TLS only ([tls] port)
        wait_for_port(LOOPBACK, port or int(config_tables["tls"]["port"]), 30.0, process)
    except (RuntimeError, TimeoutError) as exc:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(5)
        raise RuntimeError(f"{exc}\n{log_path.read_text(errors='replace')[-3000:]}") from None
    return RunningNode(LOOPBACK, port, str(settings["ae_title"]), data_dir, process, config_path, log_path)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a node's workers and compressor)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                # The command name in field 2 may hold spaces and parentheses: the parent pid follows the last ")".
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry))
    return children


def stop_node(node: RunningNode, timeout: float = 30.0) -> int:
    """SIGTERM the node and wait; returns its exit status (killed after ``timeout``)."""
    if node.process.poll() is None:
        node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(5)
            raise AssertionError(f"node did not stop on SIGTERM\n{node.log()[-3000:]}") from None
    return int(node.process.returncode)


#: Per-test PostgreSQL databases are named ``dcbnode_test_<unix time>_<random>``; the time lets any run
#: drop the ones a killed run left behind, without touching those of runs still going in parallel.
_PG_PREFIX = "dcbnode_test_"
_PG_STALE_SECONDS = 6 * 3600
_pg_swept = False


def _sweep_stale_databases(admin: Any) -> None:
    """Drop per-test databases older than :data:`_PG_STALE_SECONDS` (left by a run that was killed).

    Without FORCE: a database somebody still uses is skipped, never pulled from under them.
    """
    from sqlalchemy import text

    now = time.time()
    with admin.connect() as conn:
        names = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                             {"p": _PG_PREFIX.replace("_", r"\_") + "%"}).scalars().all()
    for name in names:
        stamp = name[len(_PG_PREFIX):].split("_", 1)[0]
        if stamp.isdigit() and now - int(stamp) > _PG_STALE_SECONDS:
            with contextlib.suppress(Exception), admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


def _postgres_database(base_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards (even while a node still holds
    connections to it). Safe for concurrent test runs against one server: every name is unique."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    global _pg_swept
    url = make_url(base_url)
    name = f"{_PG_PREFIX}{int(time.time())}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        if not _pg_swept:
            _pg_swept = True
            _sweep_stale_databases(admin)
        # "source database template1 is being accessed by other users": somebody (another run, an
        # admin) is connected to the template for a moment; CREATE DATABASE needs it alone.
        _admin_statement(admin, f'CREATE DATABASE "{name}"', "being accessed by other users", attempts=5)
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            _drop_database(admin, name)
    finally:
        admin.dispose()


def _drop_database(admin: Any, name: str) -> None:
    """DROP DATABASE … WITH (FORCE), tried again while it fails on an autovacuum worker in the database:
    PostgreSQL 15 refuses to terminate it for a user that is not a superuser ("must be a member of the
    role whose process is being terminated"); the worker ends by itself within moments."""
    _admin_statement(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', "must be a member of the role",
                     attempts=20)


def _admin_statement(admin: Any, statement: str, passing: str, *, attempts: int) -> None:
    """Run ``statement`` (autocommit), again after a growing pause while it fails with an error whose
    text holds ``passing`` (a transient conflict with another session), at most ``attempts`` times."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts):
        try:
            with admin.connect() as conn:
                conn.execute(text(statement))
            return
        except DBAPIError as exc:
            if passing not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(min(0.2 * (attempt + 1), 1.0))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """"" (the built-in SQLite index) or a fresh PostgreSQL database when $DCBNODE_TEST_POSTGRES_URL is set."""
    if request.param == "sqlite":
        yield ""
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"set {POSTGRES_ENV} to run the PostgreSQL variant")
    yield from _postgres_database(base)


@pytest.fixture
def running_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """``running_node(**config) -> RunningNode``; every node started is stopped with SIGTERM at the end
    of the test, and must exit 0."""
    started: list[RunningNode] = []

    def start(**config: Any) -> RunningNode:
        node = start_node(tmp_path, **config)
        started.append(node)
        return node

    yield start
    failures = []
    for node in started:
        if node.process.poll() is None:
            code = stop_node(node)
            if code != 0:
                failures.append(f"exit {code}\n{node.log()[-3000:]}")
        elif node.process.returncode not in (0, -signal.SIGKILL):
            failures.append(f"exited early with {node.process.returncode}\n{node.log()[-3000:]}")
    assert not failures, failures


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- reading the archive back


def read_back(data_dir: Path, database_url: str = "") -> Any:
    """An :class:`~dcbnode.archive.Archive` on a node's data (read it after the node stopped, or
    concurrently: SQLite and the volumes allow readers). Close it when done."""
    from dcbnode.archive import Archive

    url = database_url or f"sqlite:///{data_dir / 'index.sqlite'}"
    return Archive(data_dir, url)


def compression_done(data_dir: Path, database_url: str = "") -> bool:
    """No volume of the archive waits for deferred compression any more (the index says so)."""
    archive = read_back(data_dir, database_url)
    try:
        return len(archive.pending) == 0
    finally:
        archive.close()


def rebuilt_part10(archive: Any, sop_instance_uid: str) -> bytes:
    """The stored instance rebuilt in the syntax it was received in, as Part-10 bytes (Explicit VR Little
    Endian if it cannot be: a lossless re-encoding the encoder refuses)."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dcbnode.dcbs import available_syntaxes, rebuild

    with archive.open_instance(sop_instance_uid) as stored:
        syntax = stored.meta.received_syntax
        if syntax not in available_syntaxes(stored.meta):
            syntax = ExplicitVRLittleEndian
        return rebuild(stored.meta, stored.blobs, stored.frame, syntax).part10()


def indexed_count(archive: Any) -> int:
    """Number of instances in the index."""
    from dcbnode.index.models import Instance

    with archive.index.session() as session:
        return int(session.query(Instance).count())


def volumes_size(data_dir: Path) -> int:
    """Total bytes of every volume file."""
    return sum(p.stat().st_size for p in (data_dir / "volumes").rglob("*.dcbs"))


# --------------------------------------------------------------------------- pynetdicom SCU


def scu_store(node: RunningNode, datasets: list[Any], *, calling_aet: str = "PYSCU",
              called_aet: str | None = None) -> list[Any]:
    """Send datasets (pydicom Datasets with file_meta, or paths) over ONE pynetdicom association,
    each in a context of its own transfer syntax; returns each response status Dataset."""
    import pydicom
    from pynetdicom import AE

    loaded = [d if isinstance(d, pydicom.Dataset) else pydicom.dcmread(d) for d in datasets]
    ae = AE(ae_title=calling_aet)
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in loaded}
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(node.host, node.port, ae_title=called_aet or node.aet)
    assert assoc.is_established, "association not established"
    try:
        return [assoc.send_c_store(ds) for ds in loaded]
    finally:
        assoc.release()


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs under ``tmp_path``, for a disk that fills up (mounting needs root, as in CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
