"""The short version of ``bench/soak.py``: three kill -9 cycles during ingest, retrieve, deferred
compression and ``dcbnode-admin compact``; every acknowledged instance back bit-exact, verify clean."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from soak import soak


def test_kill_9_cycles_lose_nothing(tmp_path: Path) -> None:
    result = soak(3, tmp_path, seed=13, log=lambda _line: None)
    assert result.cycles == 3 and result.acknowledged
    assert result.lost == [] and result.differing == []
    assert result.verify_status == 0, result.verify_output
