"""The fidelity sweep: every test file through a real node and through the library, compared by bytes.

Files: pydicom's ``test_files`` (subfolders included), the files pydicom-data registers, the vendor files
of heudiconv (Siemens MR), dicompyler-core (CT, RT) and deid-data (US) that scripts/install-test-deps
extracts into ``$DCBNODE_VENDOR_DATA`` (default ``~/.cache/dcbnode/vendor-data``), and the crafted
instances of :mod:`crafted`.  Files sharing a SOP Instance UID go to different groups; each group gets a
fresh node.

Per group (:func:`run_group`): the node starts with a long ``compression_delay``; a stock pynetdicom
peer (:mod:`fidelity_peer`, its own process) sends every file as its own bytes in its own syntax, then
C-GETs each instance proposing exactly one syntax each time (its own, Explicit VR LE, Implicit VR LE,
HTJ2K Lossless): column group ``received``.  The node restarts with a short ``compression_delay``, the
test waits until its compressor has compressed every pending volume, and the same C-GETs run again:
``compressed``.  The library route stores each file with ``dcbs.save`` and reads it back with
``DcbStreamingReader.get_dicom_for_frame`` (and ``force_uncompressed``, and ``rebuild`` in the file's
own syntax): ``library``.

Each cell is compared with the original by :func:`faithful.difference` and classified (:class:`Cell`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crafted
import faithful
import rawdicom
from conftest import read_back, start_node, stop_node, wait_until
from pydicom.data import data_manager

HERE = Path(__file__).resolve().parent
VENDOR_ENV = "DCBNODE_VENDOR_DATA"
#: Files beside the datasets that are not DICOM.
NON_DICOM_SUFFIXES = frozenset({".py", ".txt", ".json", ".dump", ".gz", ".icc", ".zip", ".md", ".nii"})
NON_DICOM_NAMES = frozenset({"README"})
#: What each vendor package must provide (relative folder under the vendor data directory).
VENDOR_PACKAGES = ("heudiconv", "dicompyler-core", "deid-data")

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
TARGETS = {"own": None, "explicit": rawdicom.EXPLICIT_LE, "implicit": rawdicom.IMPLICIT_LE,
           "htj2k": HTJ2K_LOSSLESS}
NETWORK_ROUTES = ("received", "compressed")
LIBRARY_COLUMNS = ("frame", "native", "own")
COLUMNS = tuple(f"{route}/{target}" for route in NETWORK_ROUTES for target in TARGETS) + tuple(
    f"library/{column}" for column in LIBRARY_COLUMNS)


# --------------------------------------------------------------------------- the files


def vendor_dir() -> Path:
    """Where scripts/install-test-deps extracted the vendor packages' DICOM files."""
    return Path(os.environ.get(VENDOR_ENV) or Path.home() / ".cache" / "dcbnode" / "vendor-data")


@dataclass
class Source:
    """One file of the sweep: a unique name, and its bytes (read when needed)."""

    name: str
    path: Path | None = None
    blob: bytes | None = None

    def data(self) -> bytes:
        return self.blob if self.blob is not None else Path(self.path or "").read_bytes()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in NON_DICOM_SUFFIXES
                  and p.name not in NON_DICOM_NAMES and "__pycache__" not in p.parts)


def catalogue(*, vendor: bool = True) -> list[Source]:
    """Every file of the sweep (no download ever; the vendor files only if ``vendor``)."""
    root = Path(data_manager.DATA_ROOT, "test_files")
    sources = [Source(f"pydicom/{p.relative_to(root)}", p) for p in _files(root)]
    external = data_manager.external_data_sources().get("pydicom-data")
    if external is not None:
        paths = sorted(Path(p) for p in external.get_paths("*", data_manager.DataTypes.DATASET))
        sources += [Source(f"pydicom-data/{p.name}", p) for p in paths
                    if p.suffix.lower() not in NON_DICOM_SUFFIXES]
    if vendor:
        for package in VENDOR_PACKAGES:
            folder = vendor_dir() / package
            sources += [Source(f"{package}/{p.relative_to(folder)}", p) for p in _files(folder)]
    sources += [Source(name, blob=blob) for name, blob in crafted.CRAFTED.items()]
    return sources


def missing_vendor_packages() -> list[str]:
    """Vendor packages with no file in the vendor data directory."""
    return [p for p in VENDOR_PACKAGES if not (vendor_dir() / p).is_dir() or not _files(vendor_dir() / p)]


@dataclass
class Prepared:
    """What the oracle reads of a source: its syntax and SOP UIDs, and the Part-10 file to send."""

    source: Source
    syntax: str | None = None
    sop_class: str | None = None
    sop_instance: str | None = None
    dataset: bytes = b""
    encoded_as: str | None = None  # the syntax the dataset is really encoded in, when not ``syntax``
    unsendable: str | None = None  # why no C-STORE can carry it
    oracle_error: str | None = None  # why the oracle cannot walk it

    @property
    def name(self) -> str:
        return self.source.name

    def part10(self) -> bytes:
        """The file to send and to store: the dataset bytes as they are, behind a minimal file meta."""
        assert self.syntax and self.sop_class and self.sop_instance
        return rawdicom.part10(self.dataset, self.syntax, self.sop_class, self.sop_instance)


def prepare(source: Source) -> Prepared:
    """Split a source into syntax and dataset bytes and find its SOP UIDs (raw, padding stripped)."""
    prepared = Prepared(source)
    data = source.data()
    try:
        meta, prepared.syntax, prepared.dataset = rawdicom.split_part10(data)
    except (rawdicom.RawError, UnicodeDecodeError, IndexError) as exc:
        prepared.unsendable = prepared.oracle_error = f"no file meta the oracle can read: {exc}"
        return prepared
    try:
        parsed = rawdicom.parse_part10(data, lenient=True)
        prepared.sop_class = rawdicom.text(parsed, faithful.SOP_CLASS)
        prepared.sop_instance = rawdicom.text(parsed, faithful.SOP_INSTANCE)
        if parsed.syntax != rawdicom.Syntax.of(prepared.syntax):  # Implicit VR labelled explicit
            prepared.encoded_as = rawdicom.IMPLICIT_LE  # (pydicom's SC_rgb_jpeg.dcm)
    except (rawdicom.RawError, ValueError) as exc:
        prepared.oracle_error = f"not a dataset in {prepared.syntax}: {exc}"
    if meta and not (prepared.sop_class and prepared.sop_instance):
        # The file meta still names the instance: send it anyway, the node must refuse what is wrong.
        elements = rawdicom.meta_elements(meta)
        prepared.sop_class = prepared.sop_class or rawdicom.text(elements, 0x00020002)
        prepared.sop_instance = prepared.sop_instance or rawdicom.text(elements, 0x00020003)
    if not prepared.sop_class or not prepared.sop_instance:
        prepared.unsendable = "no SOP Class or SOP Instance UID to put in a C-STORE request"
    return prepared


def groups(prepared: list[Prepared]) -> list[list[Prepared]]:
    """Sendable files split so that no group holds two files with one SOP Instance UID."""
    seen: Counter[str] = Counter()
    out: list[list[Prepared]] = []
    for item in prepared:
        if item.unsendable:
            continue
        index = seen[item.sop_instance or ""]
        seen[item.sop_instance or ""] += 1
        while len(out) <= index:
            out.append([])
        out[index].append(item)
    return out


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One file through one route in one syntax.

    ``kind``: identical (dataset bytes equal), value-bytes (every value's bytes equal, headers rewritten),
    differs (``detail`` is the first difference), refused (``detail`` says why), not-stored.
    """

    kind: str
    detail: str = ""
    syntax: str = ""

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "detail": self.detail, "syntax": self.syntax}


def compare(original: Prepared, rebuilt: bytes, syntax: str) -> Cell:
    """Classify rebuilt bytes (Part-10, or a bare dataset in ``syntax``) against the original."""
    if rebuilt[128:132] != b"DICM":
        rebuilt = rawdicom.part10(rebuilt, syntax, original.sop_class or "", original.sop_instance or "")
    try:
        found = faithful.difference(original.part10(), rebuilt)
    except Exception as exc:  # the oracle or pydicom cannot read one side: a difference too
        return Cell("differs", f"cannot compare: {type(exc).__name__}: {exc}", syntax)
    if found is not None and original.syntax == syntax and syntax not in rawdicom.NATIVE:
        # Same compressed syntax: were only the frames encoded again (lossless input stored as HTJ2K)?
        again = faithful.difference(original.part10(), rebuilt, reencoded_frames=True)
        if again is None:
            return Cell("re-encoded", "frames encoded again, decoded equal; all else byte-identical", syntax)
    if found is not None:
        detail = str(found)
        if faithful.is_group_length(int(found.path.rsplit("(", 1)[-1][:9].replace(",", ""), 16)
                                    if found.path.endswith(")") else 1):
            beyond = faithful.difference(original.part10(), rebuilt, skip_group_lengths=True)
            detail += f"; beyond group lengths: {beyond or 'nothing else'}"
        return Cell("differs", detail, syntax)
    same = original.syntax == syntax and original.dataset == rawdicom.split_part10(rebuilt)[2]
    inflated_same = original.syntax == syntax == rawdicom.DEFLATED
    return Cell("identical" if same or inflated_same else "value-bytes", "", syntax)


# --------------------------------------------------------------------------- the network route


def _run_peer(job: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    job_path, out_path = workdir / f"{name}-job.json", workdir / f"{name}-out.json"
    job_path.write_text(json.dumps(job))
    result = subprocess.run([sys.executable, str(HERE / "fidelity_peer.py"), str(job_path), str(out_path)],
                            capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fidelity peer failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return dict(json.loads(out_path.read_text()))


def _gets(items: list[Prepared], keys: dict[str, str], workdir: Path, route: str) -> list[dict[str, Any]]:
    """One request per target syntax (all files), and one per own syntax that is no target (its files)."""
    labels = {target: syntax for target, syntax in TARGETS.items() if syntax}
    for own in sorted({item.syntax or "" for item in items} - set(labels.values())):
        labels[f"own:{own}"] = own
    requests = []
    for label, syntax in labels.items():
        chosen = [i for i in items if i.syntax == syntax] if label.startswith("own:") else items
        requests.append({"syntax": syntax, "label": label, "out": str(workdir / route / label.replace(":", "-")),
                         "items": [{"key": keys[i.name], "sop_class": i.sop_class, "uid": i.sop_instance}
                                   for i in chosen]})
    return requests


def _node_reasons(log: str) -> dict[str, str]:
    """The node's 'cannot send UID: reason' lines, by UID (last one wins)."""
    reasons = {}
    for line in log.splitlines():
        if "cannot send " in line:
            rest = line.split("cannot send ", 1)[1]
            uid, _, reason = rest.partition(": ")
            reasons[uid.strip()] = reason.strip()
    return reasons


def _network_cells(items: list[Prepared], keys: dict[str, str], requests: list[dict[str, Any]],
                   output: dict[str, Any], route: str, log: str, results: dict[str, dict[str, Cell]]) -> None:
    reasons = _node_reasons(log)
    for request, get in zip(requests, output["gets"], strict=True):
        syntax, label = request["syntax"], request["label"]
        for item in items:
            result = get["results"].get(keys[item.name])
            if result is None:
                continue
            if result.get("received"):
                cell = compare(item, Path(result["received"]).read_bytes(), result["syntax"])
                if result["syntax"] != syntax:
                    cell = Cell("differs", f"sent in {result['syntax']}, only {syntax} was proposed", syntax)
            elif "refused" in result:
                cell = Cell("refused", result["refused"], syntax)
            else:
                why = reasons.get(item.sop_instance or "", result.get("comment") or "")
                cell = Cell("refused", f"C-GET status 0x{result['status'] or 0:04X}: {why}", syntax)
            if label.startswith("own:") or item.syntax == syntax:
                results[item.name][f"{route}/own"] = cell
            if not label.startswith("own:"):
                results[item.name][f"{route}/{label}"] = cell


def run_group(items: list[Prepared], workdir: Path, results: dict[str, dict[str, Cell]]) -> None:
    """Store one group on a fresh node, retrieve before and after deferred compression, and the library."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys = {item.name: f"f{index}" for index, item in enumerate(items)}
    store = []
    for item in items:
        path = workdir / "in" / f"{keys[item.name]}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(item.part10())
        store.append({"key": keys[item.name], "path": str(path)})
    data_dir = workdir / "data"
    node = start_node(workdir, name="received", data_dir=data_dir, compression_delay=3600)
    try:
        job = {"host": node.host, "port": node.port, "aet": node.aet, "store": store, "gets": []}
        stored = _run_peer(job, workdir, "store")["store"]
        accepted = []
        for item in items:
            outcome = stored.get(keys[item.name], {"refused": "not attempted"})
            if outcome.get("status") in (0x0000, 0xB000, 0xB006, 0xB007):
                accepted.append(item)
            else:
                why = outcome.get("refused") or f"C-STORE status 0x{outcome.get('status') or 0:04X}: " \
                                                 f"{outcome.get('comment', '')}"
                results[item.name] = {column: Cell("not-stored", why) for column in COLUMNS}
        job = {**job, "store": [], "gets": _gets(accepted, keys, workdir, "received")}
        output = _run_peer(job, workdir, "received")
        _network_cells(accepted, keys, job["gets"], output, "received", node.log(), results)
    finally:
        assert stop_node(node) == 0, node.log()[-3000:]
    node = start_node(workdir, name="compressed", data_dir=data_dir, compression_delay=0.2)
    try:
        assert wait_until(lambda: _nothing_pending(data_dir), timeout=300), "the node did not compress"
        job = {"host": node.host, "port": node.port, "aet": node.aet, "store": [],
               "gets": _gets(accepted, keys, workdir, "compressed")}
        output = _run_peer(job, workdir, "compressed")
        _network_cells(accepted, keys, job["gets"], output, "compressed", node.log(), results)
    finally:
        assert stop_node(node) == 0, node.log()[-3000:]
    for item in accepted:
        results[item.name].update(library_cells(item, workdir / "in" / f"{keys[item.name]}.dcm", workdir))


def _nothing_pending(data_dir: Path) -> bool:
    from dcbnode.index.writer import compression_pending

    archive = read_back(data_dir)
    try:
        with archive.index.engine.connect() as connection:
            return not compression_pending(connection)
    finally:
        archive.close()


# --------------------------------------------------------------------------- the library route


def library_cells(item: Prepared, path: Path, workdir: Path) -> dict[str, Cell]:
    """``dcbs.save`` of the one file, then ``get_dicom_for_frame`` (default and force_uncompressed) and
    ``rebuild`` in the file's own syntax."""
    from dcbnode import dcbs

    volume = workdir / "library" / f"{path.stem}.dcbs"
    volume.parent.mkdir(exist_ok=True)
    try:
        dcbs.save(dcbs.DicomSeries(item.sop_instance or "", (path,)), volume)
    except dcbs.DcbsError as exc:
        return {f"library/{c}": Cell("refused", f"dcbs.save: {exc}") for c in LIBRARY_COLUMNS}
    cells = {}
    with dcbs.DcbStreamingReader(volume) as reader:
        for column, syntax, make in (
                ("frame", "", lambda: reader.get_dicom_for_frame(0)),
                ("native", rawdicom.EXPLICIT_LE, lambda: reader.get_dicom_for_frame(0, force_uncompressed=True)),
                ("own", item.syntax or "", lambda: reader.rebuild(0, item.syntax or "").part10())):
            try:
                blob = make()
            except dcbs.DcbsError as exc:
                cells[f"library/{column}"] = Cell("refused", f"{type(exc).__name__}: {exc}", syntax)
                continue
            cells[f"library/{column}"] = compare(item, blob, rawdicom.split_part10(blob)[1])
    return cells


# --------------------------------------------------------------------------- the whole sweep


@dataclass
class Sweep:
    """Every file's cells, and the files that could not be sent at all."""

    prepared: list[Prepared]
    results: dict[str, dict[str, Cell]] = field(default_factory=dict)


def chunks(prepared: list[Prepared], parts: int) -> list[list[Prepared]]:
    """The groups of :func:`groups`, the first (every file whose UID is unique) split into ``parts`` chunks
    of about equal bytes, so that chunks can run side by side; largest first."""
    found = groups(prepared)
    if not found:
        return []
    first: list[list[Prepared]] = [[] for _ in range(parts)]
    sizes = [0] * parts
    for item in sorted(found[0], key=lambda i: -len(i.dataset)):
        smallest = sizes.index(min(sizes))
        first[smallest].append(item)
        sizes[smallest] += len(item.dataset)
    return [c for c in first if c] + found[1:]


def _run_chunk(args: tuple[list[Prepared], Path]) -> dict[str, dict[str, Cell]]:
    items, workdir = args
    results: dict[str, dict[str, Cell]] = {item.name: {} for item in items}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test files are full of deliberately invalid values
        run_group(items, workdir, results)
    return results


def run_sweep(workdir: Path, *, vendor: bool = True, only: frozenset[str] | None = None,
              workers: int = 2) -> Sweep:
    """Prepare every file (or those named in ``only``), run the chunks on fresh nodes, ``workers`` chunks at a
    time (each in a forked process of its own: codecs are not all thread-safe)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = [prepare(s) for s in catalogue(vendor=vendor) if only is None or s.name in only]
    sweep = Sweep(prepared)
    for item in prepared:
        sweep.results[item.name] = {}
        if item.unsendable:
            sweep.results[item.name] = {c: Cell("not-stored", f"not sendable: {item.unsendable}") for c in COLUMNS}
    work = [(chunk, workdir / f"chunk{index}") for index, chunk in enumerate(chunks(prepared, workers + 1))]
    context = multiprocessing.get_context("fork")  # spawn would re-run the caller's __main__
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for results in pool.map(_run_chunk, work):
            sweep.results.update(results)
    return sweep
