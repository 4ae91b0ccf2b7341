"""What the fidelity sweep expects of each cell, and its report (docs/fidelity.md).

A cell passes when it is byte-identical (required in the file's own syntax) or value-bytes identical
(another syntax), or when its refusal is explained: by :data:`EXPECTED_STORE_REFUSALS` (files the node
refuses to store, with the reason it must give) or by one of the documented limits of
:func:`documented_refusal` (no HTJ2K form for such pixels; no original codestream kept for lossless
compressed input).  Everything else, a difference above all, is unexplained and fails.
"""

from __future__ import annotations

import datetime
import warnings
from collections import Counter
from io import BytesIO

import pydicom
from fidelity import COLUMNS, HTJ2K_LOSSLESS, Cell, Prepared, Sweep

#: Files the node refuses at C-STORE (or that no C-STORE can carry): name -> substring of the reason.
EXPECTED_STORE_REFUSALS: dict[str, str] = {}

LOSSY_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                            "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.100",
                            "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103",
                            "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.106"})
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                             "1.2.840.10008.1.2.1.99"})


def _header(item: Prepared) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(BytesIO(item.part10()), stop_before_pixels=False, defer_size=64)
    except Exception:
        return None


def no_htj2k_form(item: Prepared) -> str | None:
    """Why the instance has no HTJ2K Lossless form (docs/conformance-statement.md), or None."""
    if item.syntax in LOSSY_SYNTAXES:
        return "lossy input is kept as received, never re-encoded"
    header = _header(item)
    if header is None:
        return None
    if "FloatPixelData" in header or "DoubleFloatPixelData" in header:
        return "float pixels: HTJ2K holds integers"
    if "PixelData" not in header:
        return "no pixel data"
    bits = header.get("BitsAllocated")
    if bits not in (8, 16):
        return f"BitsAllocated {bits}: kept as zstd, HTJ2K output is for 8 and 16 bits"
    return None


def documented_refusal(item: Prepared, column: str, cell: Cell) -> str | None:
    """The documented limit that explains a refusal, or None."""
    target = column.split("/")[1]
    if target == "htj2k" or (column == "library/frame" and cell.syntax == HTJ2K_LOSSLESS):
        return no_htj2k_form(item)
    if target == "own" and item.syntax not in NATIVE_SYNTAXES | LOSSY_SYNTAXES | {HTJ2K_LOSSLESS}:
        return "lossless compressed input is stored as HTJ2K; its original codestream is not kept"
    return None


def verdict(item: Prepared, column: str, cell: Cell) -> str | None:
    """None when the cell is as required or explained; else what is wrong."""
    if cell.kind == "identical":
        return None
    if cell.kind == "value-bytes":
        if cell.syntax == item.syntax:
            return "same syntax in and out, but the dataset bytes differ (value bytes equal)"
        return None
    if cell.kind == "not-stored":
        expected = EXPECTED_STORE_REFUSALS.get(item.name)
        if expected is not None and expected in cell.detail:
            return None
        return f"refused at store, unexplained: {cell.detail}"
    if cell.kind == "refused" and documented_refusal(item, column, cell):
        return None
    return f"{cell.kind}: {cell.detail}"


def unexplained(sweep: Sweep, name: str) -> dict[str, str]:
    """Column -> problem, for one file."""
    item = next(p for p in sweep.prepared if p.name == name)
    cells = sweep.results[name]
    problems = {c: "no result" for c in COLUMNS if c not in cells}
    for column, cell in cells.items():
        if (problem := verdict(item, column, cell)) is not None:
            problems[column] = problem
    return problems


# --------------------------------------------------------------------------- the report

SYMBOLS = {"identical": "=", "value-bytes": "≈", "refused": "—", "not-stored": "✗", "differs": "≠"}


def report(sweep: Sweep, *, commit: str = "") -> str:
    """docs/fidelity.md: the table, the refusals with their reasons, and every unexplained cell."""
    counts: Counter[str] = Counter()
    rows, notes, failures = [], [], []
    for item in sweep.prepared:
        cells = sweep.results[item.name]
        symbols = []
        for column in COLUMNS:
            cell = cells.get(column, Cell("missing"))
            counts[cell.kind] += 1
            problem = verdict(item, column, cell)
            symbol = SYMBOLS.get(cell.kind, "?") + ("!" if problem else "")
            symbols.append(symbol)
            if problem:
                failures.append(f"| `{item.name}` | {column} | {problem.replace('|', '/')} |")
            elif cell.kind in ("refused", "not-stored"):
                why = documented_refusal(item, column, cell) or cell.detail
                notes.append(f"| `{item.name}` | {column} | {why.replace('|', '/')} |")
        rows.append(f"| `{item.name}` | {_syntax_name(item.syntax)} | " + " | ".join(symbols) + " |")
    header = "| file | received as | " + " | ".join(c.replace("/", " ") for c in COLUMNS) + " |"
    lines = [
        "# Fidelity report",
        "",
        "Generated by the fidelity sweep (`tests/test_fidelity_sweep.py`, code in `tests/fidelity*.py`); do not",
        "edit by hand.  Regenerate with `python bench/fidelity_report.py` (writes this file), or run the sweep",
        "with `DCBNODE_FIDELITY_REPORT=docs/fidelity.md python -m pytest tests/test_fidelity_sweep.py`.",
        "",
        f"Run: {datetime.date.today().isoformat()}{f' on {commit}' if commit else ''}; "
        f"{len(sweep.prepared)} files, {sum(counts.values())} cells: "
        + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) + ".",
        "",
        "Each file is sent to a fresh dcbnode as its own bytes in its own transfer syntax by a stock pynetdicom",
        "peer, then retrieved with C-GET proposing exactly one transfer syntax: its own, Explicit VR LE,",
        "Implicit VR LE, HTJ2K Lossless; first as received (`received`), then after the node's deferred",
        "compression (`compressed`); and through the library (`dcbs.save`, then",
        "`DcbStreamingReader.get_dicom_for_frame(0)` = `frame`, with `force_uncompressed` = `native`, and",
        "`rebuild` in the file's own syntax = `own`).  Compared by bytes with an independent element walker",
        "(`tests/rawdicom.py`, `tests/faithful.py`):",
        "",
        "- `=` byte-identical: the dataset bytes after the file meta are equal (Deflated: compared inflated);",
        "- `≈` value-bytes identical: another syntax; same elements, same value bytes (Big Endian swapped by VR),",
        "  only element headers and group-length values differ; pixels decoded equal where they were",
        "  decoded or encoded;",
        "- `—` refused: the node or library does not offer that syntax for the file (reason below);",
        "- `✗` not stored: refused at C-STORE (reason below); `≠` differs (first differing element below);",
        "- `!` marks a cell that is not as required and not explained.",
        "",
        header,
        "|" + "---|" * (len(COLUMNS) + 2),
        *rows,
        "",
        "## Not as required",
        "",
        "| file | column | first difference or unexplained refusal |",
        "|---|---|---|",
        *(failures or ["| – | – | none |"]),
        "",
        "## Refusals and their reasons",
        "",
        "| file | column | reason |",
        "|---|---|---|",
        *(notes or ["| – | – | none |"]),
        "",
    ]
    return "\n".join(lines)


def _syntax_name(uid: str | None) -> str:
    if not uid:
        return "?"
    try:
        return str(pydicom.uid.UID(uid).name)
    except Exception:
        return uid
