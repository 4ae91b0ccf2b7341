"""A private PostgreSQL cluster, started for a test module and removed after it.

For faults that need a superuser and cluster-wide settings — a COMMIT left waiting for a synchronous
standby that does not exist, then its server process terminated — which the shared test server
(``DCBNODE_TEST_POSTGRES_URL``) must never get: other runs use it at the same time.  Uses the server
binaries of the installed PostgreSQL (Debian: ``/usr/lib/postgresql/<version>/bin``); as root, the
cluster runs as the ``postgres`` user (the server refuses to run as root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peers import free_port


def server_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest installed version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def private_cluster() -> Iterator[str]:
    """Start a cluster on a free loopback port (trust authentication, superuser ``postgres``); yield its
    URL (database ``postgres``); stop and delete it at the end."""
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Short, under /tmp: the server's Unix socket path must fit in 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="dcbn-pg-", dir="/tmp"))
    try:
        home.chmod(0o755)
        if as_postgres:
            shutil.chown(home, "postgres", "postgres")
        data = home / "data"
        subprocess.run([*as_postgres, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        port = free_port()
        options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*as_postgres, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"),
                        "-w", "-t", "60", "-o", options, "start"], check=True, capture_output=True, timeout=90)
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*as_postgres, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(home, ignore_errors=True)
