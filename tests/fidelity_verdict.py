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

_NOT_SENDABLE = "no SOP Class or SOP Instance UID to put in a C-STORE request"
#: Files the node refuses at C-STORE (or that no C-STORE can carry): name -> substring of the reason.
EXPECTED_STORE_REFUSALS: dict[str, str] = {
    # Cut short.
    "pydicom/MR_truncated.dcm": "dataset is truncated: element (7FE0,0010) needs 8192 bytes, 8130",
    "pydicom/rtplan_truncated.dcm": "dataset is truncated: element (300A,00B0) needs 976 bytes, 711",
    # Missing or invalid UIDs, non-numeric image attributes.
    "pydicom/JPEGLSNearLossless_08.dcm": "StudyInstanceUID is missing",
    "pydicom/JPEGLSNearLossless_16.dcm": "StudyInstanceUID is missing",
    "pydicom/SC_rgb_jls_lossy_line.dcm": "StudyInstanceUID is missing",
    "pydicom/SC_rgb_jls_lossy_sample.dcm": "StudyInstanceUID is missing",
    "pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm": "has no Sequence Delimitation Item",
    "pydicom-data/bad_sequence.dcm": "SOP UIDs are not valid UIDs",
    "pydicom/badVR.dcm": "NumberOfFrames is not a number",
    # Datasets without SOP Class UID, sent with the UIDs of their file meta.
    "pydicom/UN_sequence.dcm": "SOPClassUID is missing",
    "pydicom/no_meta_group_length.dcm": "SOPClassUID is missing",
    "pydicom/priv_SQ.dcm": "SOPClassUID is missing",
    # Media Storage Directory (DICOMDIR) is no storage SOP class.
    **{f"pydicom/dicomdirtests/{name}": "presentation context rejected: abstract syntax not supported"
       for name in ("DICOMDIR", "DICOMDIR-bigEnd", "DICOMDIR-empty.dcm", "DICOMDIR-implicit", "DICOMDIR-nooffset",
                    "DICOMDIR-nopatient", "DICOMDIR-reordered", "TINY_ALPHA/DICOMDIR")},
    # Neither the dataset nor a file meta names the instance: no C-STORE request can be built.
    "pydicom/empty_charset_LEI.dcm": _NOT_SENDABLE,
    "pydicom/nested_priv_SQ.dcm": _NOT_SENDABLE,
    "pydicom/no_meta.dcm": _NOT_SENDABLE,
    "pydicom/meta_missing_tsyntax.dcm": "file meta without Transfer Syntax UID",
}

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
    photometric = str(header.get("PhotometricInterpretation", ""))
    if item.syntax in NATIVE_SYNTAXES and photometric.startswith(("YBR_FULL", "YBR_PARTIAL")):
        return f"native {photometric} pixels are kept as zstd: HTJ2K output is for grey and RGB"
    if item.syntax in NATIVE_SYNTAXES and not _canonical(item, header):
        return "bits above BitsStored are not zero or the sign: kept as zstd, HTJ2K would not give them back"
    return None


def _canonical(item: Prepared, header: pydicom.Dataset) -> bool:
    """Whether the stored sample containers hold nothing above BitsStored but zeros or the sign (raw bytes,
    not pydicom's masked array)."""
    import numpy as np
    import rawdicom

    element = rawdicom.find(rawdicom.parse_dataset(item.dataset, item.syntax or ""), rawdicom.PIXEL_DATA)
    bits, stored = int(header.BitsAllocated), int(header.get("BitsStored", header.BitsAllocated))
    if element is None or bits - stored <= 0:
        return True
    kind = "i" if header.get("PixelRepresentation") == 1 else "u"
    order = "<" if item.syntax != rawdicom.EXPLICIT_BE else ">"
    usable = len(element.value) - len(element.value) % (bits // 8)
    samples = np.frombuffer(element.value[:usable], dtype=f"{order}{kind}{bits // 8}")
    unused = bits - stored
    canonical = (samples << unused) >> unused if kind == "i" else samples & ((1 << stored) - 1)
    return bool(np.array_equal(canonical, samples))


def undecodable(item: Prepared) -> bool:
    """Whether neither pydicom's decoders nor imagecodecs read the original's pixels."""
    import faithful

    try:
        faithful.decoded_pixels(item.part10())
    except Exception:
        return True
    return False


def documented_refusal(item: Prepared, column: str, cell: Cell) -> str | None:
    """The documented limit that explains a refusal, or None."""
    target = column.split("/")[1]
    if target != "own" and cell.syntax != item.syntax and item.syntax not in NATIVE_SYNTAXES and undecodable(item):
        return "no installed decoder reads the codestream: kept as received, served in its own syntax only"
    if target == "htj2k" or (column == "library/frame" and cell.syntax == HTJ2K_LOSSLESS):
        return no_htj2k_form(item)
    return None


def verdict(item: Prepared, column: str, cell: Cell) -> str | None:
    """None when the cell is as required or explained; else what is wrong."""
    if cell.kind == "identical":
        return None
    if cell.kind == "re-encoded":
        if cell.syntax == item.syntax and item.syntax not in NATIVE_SYNTAXES | LOSSY_SYNTAXES:
            return None  # lossless input stored as HTJ2K, re-encoded into its own syntax (issue 17)
        return "frames re-encoded where the received codestreams must come back"
    if cell.kind == "value-bytes":
        if cell.syntax == item.syntax and item.encoded_as is None:
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
    if name in EXPECTED_STORE_REFUSALS and cells.get(COLUMNS[0], Cell("")).kind != "not-stored":
        problems["all"] = f"expected a refusal at store ({EXPECTED_STORE_REFUSALS[name]}), but it was stored"
    for column, cell in cells.items():
        if (problem := verdict(item, column, cell)) is not None:
            problems[column] = problem
    return problems


# --------------------------------------------------------------------------- the report

SYMBOLS = {"identical": "=", "value-bytes": "≈", "re-encoded": "≈p", "refused": "—", "not-stored": "✗", "differs": "≠"}


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
            symbols.append(SYMBOLS.get(cell.kind, "?") + ("!" if problem else ""))
            where = "all" if cell.kind == "not-stored" else column
            if cell.kind == "not-stored" and column != COLUMNS[0]:
                continue  # one line for a file the node did not store
            if problem:
                failures.append(f"| `{item.name}` | {where} | {_cell_text(problem)} |")
            elif cell.kind in ("refused", "not-stored"):
                why = documented_refusal(item, column, cell) or cell.detail
                notes.append(f"| `{item.name}` | {where} | {_cell_text(why)} |")
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
        "- `≈p` same syntax, frames re-encoded: lossless compressed input is stored as HTJ2K and encoded again",
        "  into its own syntax (issue 17); every byte outside Pixel Data identical, pixels decoded equal;",
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


def _cell_text(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:400]


def _syntax_name(uid: str | None) -> str:
    if not uid:
        return "?"
    try:
        return str(pydicom.uid.UID(uid).name)
    except Exception:
        return uid
