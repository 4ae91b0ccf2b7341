"""Output helpers of ``dcbnode-admin``: progress on stderr, plain tables and JSON on stdout."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TextIO


class Progress:
    """A progress bar on a terminal (stderr), plain ``label: n/total`` lines otherwise.

    Call it as ``progress(done, total)``.  Non-terminal output prints at most every 10 % (and at the
    end) so that logs stay short.  Disabled entirely in JSON mode.
    """

    def __init__(self, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._last_percent = -1
        self._last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        if self.tty:
            now = time.monotonic()
            if done < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 30
            filled = width * done // total
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
            return
        percent = 100 * done // total
        if done >= total or percent // 10 > self._last_percent // 10:
            self._last_percent = percent
            self.stream.write(f"{self.label}: {done}/{total}\n")
            self.stream.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain left-aligned text table."""
    cells = [[("" if value is None else str(value)) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def emit_json(value: object) -> None:
    """Print one JSON document on stdout."""
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def human_bytes(count: int | float) -> str:
    """1536 → '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
