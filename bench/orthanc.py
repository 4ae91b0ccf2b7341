"""Debian's Orthanc as a bench peer: located (or installed on request), run by hand on loopback ports.

Orthanc is a bench-only anchor (tests do not need it), so it is not in ``scripts/install-test-deps``:
``python bench/orthanc.py --install`` runs ``apt-get install -y orthanc`` (root). The packaged service is
never started; each peer is ``Orthanc CONFIG.json`` with its own storage and index directories in a temp
dir, DICOM and HTTP on free ports, no plugins, ``TCP_NODELAY=1`` in its environment (without it every
C-STORE waits ~40 ms on Nagle/delayed ACK: 19/s instead of ~100/s), and it is stopped (SIGTERM to its
process group, then SIGKILL) when the context manager exits.

Run: ``python bench/orthanc.py [--install]`` says where Orthanc is, or how to get it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._benchlib import SourceFactory, Target, TargetFactory
from tests.peers import _dcmtk_server, free_port

__all__ = ["MISSING", "orthanc", "orthanc_binary", "orthanc_source", "orthanc_target"]

AET = "ORTHANC"
MISSING = "Orthanc not found: install it with `python bench/orthanc.py --install` (apt-get install -y orthanc)"


def orthanc_binary() -> str | None:
    """Path of the ``Orthanc`` executable, or None."""
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)


def _config(tmp: Path, dicom_port: int) -> dict[str, object]:
    return {
        "Name": "dcbnode-bench", "StorageDirectory": str(tmp / "storage"), "IndexDirectory": str(tmp / "index"),
        "DicomAet": AET, "DicomPort": dicom_port, "HttpPort": free_port(), "RemoteAccessAllowed": False,
        "Plugins": [], "DicomAlwaysAllowStore": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowFind": True,
        "StorageCompression": False,
    }


@contextlib.contextmanager
def orthanc() -> Iterator[Target]:
    """A fresh Orthanc on a free loopback port; yields ``(host, port, aet)``; stopped on exit."""
    binary = orthanc_binary()
    if binary is None:
        raise RuntimeError(MISSING)
    with tempfile.TemporaryDirectory(prefix="bench-orthanc-") as tmp:
        config = Path(tmp) / "orthanc.json"

        def make_cmd(port: int) -> list[str]:
            config.write_text(json.dumps(_config(Path(tmp), port), indent=1))
            return [binary, str(config)]

        # _dcmtk_server: own session, TCP_NODELAY=1 in the environment, bounded stop of the process group
        with _dcmtk_server("Orthanc", make_cmd, None, Path(tmp)) as (_proc, port, _log):
            yield "127.0.0.1", port, AET


def orthanc_target(expected: int | None = None) -> TargetFactory:
    """Store-bench factory: a fresh empty Orthanc per run (the sender's statuses are the check)."""
    return orthanc


def orthanc_source(associations: int = 4) -> SourceFactory:
    """Retrieve-bench factory: Orthanc loaded (untimed) with the files over ``associations`` storescu."""
    from bench.peer_store_rates import send_concurrently

    @contextlib.contextmanager
    def factory(files: Sequence[Path]) -> Iterator[Target]:
        with orthanc() as target:
            send_concurrently(target, files, associations)
            yield target

    return factory


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: report (or install) Orthanc."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="apt-get install -y orthanc if missing (root)")
    args = parser.parse_args(argv)
    if orthanc_binary() is None and args.install:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "orthanc"], check=False, timeout=900)
    binary = orthanc_binary()
    print(binary or MISSING)
    return 0 if binary else 1


if __name__ == "__main__":
    sys.exit(main())
