"""Maintenance of an archive: statistics, import, export, selection, verification and compaction.

These are the library functions behind ``dcbnode-admin``; they know nothing about argument parsing or
output formatting, and nothing about the network.

Compaction rewrites a volume that holds dead records (superseded or tombstoned) into a new
*generation* of the same volume: ``<hash>.dcbs`` → ``<hash>.g2.dcbs`` → ``<hash>.g3.dcbs`` … The new
file keeps the old file's volume id, which is how :mod:`.recovery` recognises the two files of an
interrupted compaction (the one the index points to wins).  Steps, each crash-safe:

1. take the old volume's ``flock`` (appenders wait), copy every live record verbatim into a hidden
   temporary file, ``fsync`` it (a crash leaves only a ``.*.tmp`` that recovery deletes);
2. link it into place under the new generation name, ``fsync`` the directory (a crash leaves two
   generations, the index points to the old one: recovery removes the new one);
3. one index transaction moves every instance row to the new path and offsets and drops the old
   volume row (a crash after it leaves the old file unreferenced: recovery removes it);
4. unlink the old file and ``fsync`` the directory.  Readers that already hold the old file open keep
   reading its (unchanged) inode until they close it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ..dcbs import (
    CorruptRecordError,
    DcbsError,
    InvalidDatasetError,
    StoredInstance,
    Volume,
    available_syntaxes,
    rebuild,
)
from ..dcbs.format import FILE_HEADER_SIZE, RecordKind, pack_file_header
from ..dcbs.record import unpack_tombstone
from ..dcbs.volume import fsync_directory
from ..index.models import Instance, Patient, Series, Study, VolumeRow
from ..index.writer import volume_row
from .archive import VOLUMES_DIR, Archive, StoreResult
from .recovery import resolve_generations

Progress = Callable[[int, int], None]
_GENERATION = re.compile(r"^(?P<stem>[0-9a-f]+)(?:\.g(?P<gen>\d+))?\.dcbs$")
_COPY_CHUNK = 8 << 20


def all_volume_files(archive: Archive) -> list[Path]:
    """Every volume file (all generations), sorted; temporaries are not included."""
    return sorted(p for p in (archive.data_dir / VOLUMES_DIR).rglob("*.dcbs") if not p.name.startswith("."))


def relative(archive: Archive, path: Path) -> str:
    """The index path (relative to the data directory) of a volume file."""
    return path.relative_to(archive.data_dir).as_posix()


# -- statistics ------------------------------------------------------------------------------------------


def stats(archive: Archive) -> dict:
    """Counts, sizes and per-modality break-down of the archive."""
    with archive.index.session() as session:
        count = lambda model: session.scalar(select(func.count()).select_from(model)) or 0  # noqa: E731
        totals = session.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.number_of_frames), 0),
                                        func.coalesce(func.sum(Instance.received_bytes), 0),
                                        func.coalesce(func.sum(Instance.stored_bytes), 0))).one()
        modality_rows = session.execute(
            select(Series.modality, func.count(func.distinct(Series.id)), func.count(Instance.id),
                   func.coalesce(func.sum(Instance.received_bytes), 0),
                   func.coalesce(func.sum(Instance.stored_bytes), 0))
            .join(Instance, Instance.series_pk == Series.id).group_by(Series.modality).order_by(Series.modality)
        ).all()
        result = {"patients": count(Patient), "studies": count(Study), "series": count(Series),
                  "instances": totals[0], "frames": int(totals[1])}
    files = all_volume_files(archive)
    on_disk = sum(path.stat().st_size for path in files)
    received = int(totals[2])
    result.update(volumes=len(files), received_bytes=received, stored_bytes=int(totals[3]), on_disk_bytes=on_disk,
                  ratio=round(received / on_disk, 3) if on_disk else None)
    result["modalities"] = {
        (modality or "(none)"): {"series": series, "instances": instances, "received_bytes": int(rec),
                                 "stored_bytes": int(stored)}
        for modality, series, instances, rec, stored in modality_rows
    }
    return result


# -- selection and listing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which instances a command acts on: exactly one of the four keys is set."""

    patient: str | None = None
    study: str | None = None
    series: str | None = None
    instance: str | None = None


def select_instances(archive: Archive, selection: Selection) -> list[tuple[str, str]]:
    """``(sop_instance_uid, series_instance_uid)`` of the selected instances, in a stable order."""
    query = (select(Instance.sop_instance_uid, Series.series_instance_uid).select_from(Instance)
             .join(Instance.series).join(Series.study).join(Study.patient))
    if selection.patient is not None:
        query = query.where(Patient.patient_id == selection.patient)
    if selection.study is not None:
        query = query.where(Study.study_instance_uid == selection.study)
    if selection.series is not None:
        query = query.where(Series.series_instance_uid == selection.series)
    if selection.instance is not None:
        query = query.where(Instance.sop_instance_uid == selection.instance)
    query = query.order_by(Study.study_instance_uid, Series.series_instance_uid, Instance.instance_number,
                           Instance.sop_instance_uid)
    with archive.index.session() as session:
        return [(row[0], row[1]) for row in session.execute(query)]


def list_series(archive: Archive, *, patient: str | None = None, date_from: str | None = None,
                date_to: str | None = None, modality: str | None = None) -> list[dict]:
    """Studies with their series (instance counts), filtered; dates are ``YYYYMMDD`` strings."""
    query = (select(Patient, Study, Series, func.count(Instance.id)).select_from(Series).join(Series.study)
             .join(Study.patient).join(Series.instances)
             .group_by(Patient.id, Study.id, Series.id)
             .order_by(Study.study_date, Study.study_instance_uid, Series.series_number, Series.series_instance_uid))
    if patient:
        query = query.where(Patient.patient_id == patient)
    if date_from:
        query = query.where(Study.study_date >= date_from)
    if date_to:
        query = query.where(Study.study_date <= date_to, Study.study_date != "")
    if modality:
        query = query.where(func.upper(Series.modality) == modality.upper())
    studies: dict[str, dict] = {}
    with archive.index.session() as session:
        for patient_row, study, series, instances in session.execute(query):
            entry = studies.setdefault(study.study_instance_uid, {
                "patient_id": patient_row.patient_id, "patient_name": patient_row.patient_name,
                "study_instance_uid": study.study_instance_uid, "study_date": study.study_date,
                "study_description": study.study_description, "accession_number": study.accession_number,
                "series": []})
            entry["series"].append({"series_instance_uid": series.series_instance_uid, "modality": series.modality,
                                    "series_number": series.series_number,
                                    "series_description": series.series_description, "instances": instances})
    return list(studies.values())


# -- import and export -----------------------------------------------------------------------------------


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named, and every file below the folders named, in a stable order (hidden files skipped)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


def import_file(archive: Archive, path: Path) -> StoreResult:
    """Store one file through exactly the C-STORE path (:meth:`Archive.store`).

    Raises :class:`InvalidDatasetError` with a clear reason for a file that is not DICOM at all.
    """
    data = path.read_bytes()
    try:
        return archive.store(data)
    except InvalidDatasetError as exc:
        if data[128:132] != b"DICM":
            raise InvalidDatasetError(f"not a DICOM file (no DICM marker at byte 128; {exc.reason})") from exc
        raise


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def export_instance(archive: Archive, sop_instance_uid: str, series_uid: str, directory: Path, *,
                    uncompressed: bool = False) -> tuple[Path, str]:
    """Write one instance as a Part-10 file under ``directory``; returns its path and transfer syntax.

    HTJ2K Lossless when available, else the best available form (the original lossy syntax, or Explicit
    VR Little Endian); Explicit VR Little Endian with ``uncompressed``.  Names are hashes of the UIDs.
    """
    with archive.open_instance(sop_instance_uid) as stored:
        syntaxes = available_syntaxes(stored.meta)
        best = HTJ2KLossless if HTJ2KLossless in syntaxes else syntaxes[0]
        syntax = ExplicitVRLittleEndian if uncompressed else best
        data = rebuild(stored.meta, stored.blobs, stored.frame, syntax).part10()
    target = directory / _digest(series_uid, 16) / f"{_digest(sop_instance_uid, 20)}.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)
    return target, str(syntax)


# -- verification ----------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What :func:`verify` found."""

    volumes: int = 0
    records: int = 0
    frames: int = 0
    problems: list[str] = field(default_factory=list)
    #: files removed first: the losing half of a compaction interrupted by a crash
    repaired: list[str] = field(default_factory=list)


def _check_volume(path: Path, report: VerifyReport) -> tuple[dict[str, int], int]:
    """Read every record of a volume with every checksum; returns live ``{uid: offset}`` and bytes walked."""
    live: dict[str, int] = {}
    try:
        volume = Volume.open(path)
    except DcbsError as exc:
        report.problems.append(f"{path}: {exc}")
        return live, 0
    with volume:
        size = volume.size()
        try:
            for entry in volume.walk_from(FILE_HEADER_SIZE):
                report.records += 1
                offset = entry.location.offset
                try:
                    if entry.header.kind == RecordKind.TOMBSTONE:
                        live.pop(unpack_tombstone(volume.read_meta(offset)[1])["sop_instance_uid"], None)
                        continue
                    stored = StoredInstance.read(volume, offset)
                    for _ in stored.iter_frames():
                        report.frames += 1
                    live.pop(stored.meta.sop_instance_uid, None)
                    live[stored.meta.sop_instance_uid] = offset
                except CorruptRecordError as exc:
                    report.problems.append(f"{path} offset {exc.offset}: {exc.reason}")
                except (ValueError, KeyError) as exc:
                    report.problems.append(f"{path} offset {offset}: unreadable tombstone: {exc}")
        except CorruptRecordError as exc:
            report.problems.append(f"{path} offset {exc.offset}: {exc.reason} (rest of the volume unreadable)")
    return live, size


def verify(archive: Archive, progress: Progress | None = None) -> VerifyReport:
    """Check every checksum of every record, and that the index and the volumes agree."""
    report = VerifyReport()
    report.repaired = [str(p) for p in resolve_generations(archive)]
    files = all_volume_files(archive)
    volumes: dict[str, tuple[dict[str, int], int]] = {}
    for number, path in enumerate(files, 1):
        volumes[relative(archive, path)] = _check_volume(path, report)
        if progress:
            progress(number, len(files))
    report.volumes = len(files)
    with archive.index.session() as session:
        rows = session.execute(select(Instance.sop_instance_uid, VolumeRow.path, Instance.record_offset)
                               .join(VolumeRow, Instance.volume)).all()
    indexed: set[tuple[str, str]] = set()
    for uid, path, offset in rows:
        indexed.add((path, uid))
        if path not in volumes:
            report.problems.append(f"{archive.data_dir / path}: missing, but the index places instance {uid} in it")
            continue
        live, walked = volumes[path]
        if offset >= walked:
            continue  # appended by a running node after this volume was read
        if live.get(uid) != offset:
            where = "is not live in the volume" if uid not in live else f"is live at offset {live[uid]}"
            report.problems.append(f"{archive.data_dir / path} offset {offset}: indexed instance {uid} {where}")
    for path, (live, _) in volumes.items():
        for uid, offset in live.items():
            if (path, uid) not in indexed:
                report.problems.append(f"{archive.data_dir / path} offset {offset}: live instance {uid} is not indexed")
    return report


# -- compaction ------------------------------------------------------------------------------------------


def generation(path: Path) -> tuple[str, int] | None:
    """``(stem, generation)`` of a volume file name (``<hash>.dcbs`` is generation 1), or None."""
    match = _GENERATION.match(path.name)
    return (match["stem"], int(match["gen"] or 1)) if match else None


def _next_generation_path(path: Path) -> Path:
    stem, current = generation(path) or (path.name.removesuffix(".dcbs"), 1)
    taken = [g[1] for p in path.parent.glob(f"{stem}*.dcbs") if (g := generation(p)) and g[0] == stem]
    return path.with_name(f"{stem}.g{max([current, *taken]) + 1}.dcbs")


@dataclass
class CompactResult:
    """What compaction did to one volume."""

    volume: str
    new_volume: str | None
    records_before: int
    live_records: int
    bytes_before: int
    bytes_after: int


def dead_records(path: Path) -> tuple[int, int]:
    """``(records, live records)`` of a volume, without reading frame data."""
    with Volume.open(path) as volume:
        by_uid: dict[str, int] = {}
        records = 0
        for entry in volume.records():
            records += 1
            if entry.header.kind == RecordKind.TOMBSTONE:
                by_uid.pop(unpack_tombstone(volume.read_meta(entry.location.offset)[1])["sop_instance_uid"], None)
            else:
                by_uid[StoredInstance.read(volume, entry.location.offset).meta.sop_instance_uid] = entry.location.offset
    return records, len(by_uid)


def compact_volume(archive: Archive, path: Path, *, pause: Callable[[str], None] | None = None) -> CompactResult | None:
    """Rewrite one volume without its dead records (see the module docstring); None if nothing to do.

    ``pause(step)`` is called between the steps (tests use it to crash at a chosen moment).
    """
    old_relative = relative(archive, path)
    lock_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # appenders to this volume wait until we are done
        with Volume.open(path) as volume:
            entries = list(volume.records())
            live: dict[str, StoredInstance] = {}
            for entry in entries:
                if entry.header.kind == RecordKind.TOMBSTONE:
                    live.pop(unpack_tombstone(volume.read_meta(entry.location.offset)[1])["sop_instance_uid"], None)
                else:
                    stored = StoredInstance.read(volume, entry.location.offset)
                    live.pop(stored.meta.sop_instance_uid, None)
                    live[stored.meta.sop_instance_uid] = stored
            size_before = volume.size()
            if len(live) == len(entries):
                return None
            old_offsets = {uid: s.location.offset for uid, s in live.items()}
            _check_index_agrees(archive, old_relative, old_offsets)
            target = _next_generation_path(path)
            new_offsets = _write_generation(volume, target, list(live.values()), pause) if live else {}
        if pause:
            pause("linked")
        new_relative = relative(archive, target) if live else None
        try:
            with archive.index.session() as session:
                _move_rows(session, old_relative, new_relative, old_offsets, new_offsets,
                           target.stat().st_size if live else 0)
        except SQLAlchemyError as exc:  # e.g. the index changed under us: undo step 2, keep the old file
            if live:
                target.unlink(missing_ok=True)
            problem = f"index update failed, volume left as it was ({type(exc).__name__}); retry"
            raise DcbsError(f"{path}: {problem}") from exc
        if pause:
            pause("committed")
        path.unlink()
        fsync_directory(path.parent)
    finally:
        os.close(lock_fd)  # releases the flock
    archive.volumes.forget(path)
    return CompactResult(old_relative, new_relative, len(entries), len(live), size_before,
                         target.stat().st_size if live else 0)


def _check_index_agrees(archive: Archive, path: str, live: dict[str, int]) -> None:
    with archive.index.session() as session:
        rows = dict(session.execute(select(Instance.sop_instance_uid, Instance.record_offset)
                                    .join(VolumeRow, Instance.volume).where(VolumeRow.path == path)).all())
    if rows != live:
        raise DcbsError(f"{archive.data_dir / path}: index and volume disagree; run 'dcbnode-admin verify' "
                        "and 'dcbnode-admin reindex' before compacting")


def _write_generation(volume: Volume, target: Path, live: list[StoredInstance],
                      pause: Callable[[str], None] | None) -> dict[str, int]:
    """Copy the live records verbatim into ``target`` (same volume id); returns new offsets by UID."""
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    offsets: dict[str, int] = {}
    try:
        header = pack_file_header(volume.volume_id)
        os.write(fd, header)
        position = len(header)
        for stored in sorted(live, key=lambda s: s.location.offset):
            for _ in stored.iter_frames():  # never copy a damaged record into the new generation
                pass
            offsets[stored.meta.sop_instance_uid] = position
            start, length = stored.location.offset, stored.location.length
            for chunk_start in range(0, length, _COPY_CHUNK):
                chunk = memoryview(volume.read_exact(start + chunk_start, min(_COPY_CHUNK, length - chunk_start)))
                while chunk:
                    chunk = chunk[os.write(fd, chunk):]
            position += length
            if pause:
                pause("copying")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if pause:
            pause("synced")
        os.link(temporary, target)  # fails rather than clobber an existing generation
        fsync_directory(target.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        temporary.unlink(missing_ok=True)
    return offsets


def _move_rows(session: Session, old: str, new: str | None, old_offsets: dict[str, int],
               offsets: dict[str, int], new_size: int) -> None:
    """Point every instance of volume ``old`` at its record in ``new``, and drop ``old``'s row.

    Only rows that still point at the record that was copied move (a concurrent "replace" may have
    re-filed an instance elsewhere meanwhile).
    """
    old_row = session.scalar(select(VolumeRow).where(VolumeRow.path == old))
    if new is not None and old_row is not None:
        new_row = volume_row(session, new)
        new_row.indexed_end = new_size
        for instance in session.scalars(select(Instance).where(Instance.volume_pk == old_row.id)):
            if old_offsets.get(instance.sop_instance_uid) == instance.record_offset:
                instance.volume = new_row
                instance.record_offset = offsets[instance.sop_instance_uid]
        session.flush()
    if old_row is not None:
        session.delete(old_row)
    session.flush()


def compactable_volumes(archive: Archive) -> list[Path]:
    """Volumes that hold at least one dead record (after finishing any interrupted compaction)."""
    resolve_generations(archive)
    result = []
    for path in all_volume_files(archive):
        try:
            records, live = dead_records(path)
        except DcbsError:
            continue  # damaged: verify reports it, compaction leaves it alone
        if records != live:
            result.append(path)
    return result
