"""Verification: every checksum in every volume, and agreement between the index and the volumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from ..dcbs import CorruptRecordError, DcbsError, StoredInstance, Volume, VolumeNotFoundError
from ..dcbs.dictionary import read_dictionary
from ..dcbs.format import FILE_HEADER_SIZE, RecordKind
from ..dcbs.record import unpack_tombstone
from ..index.models import Instance, VolumeRow
from .archive import Archive
from .recovery import Progress, resolve_generations, volume_files


@dataclass
class VerifyReport:
    """What :func:`verify` found."""

    volumes: int = 0
    records: int = 0
    frames: int = 0
    problems: list[str] = field(default_factory=list)
    #: files removed first: the losing half of a compaction interrupted by a crash
    repaired: list[str] = field(default_factory=list)


def _check_volume(path: Path, report: VerifyReport) -> tuple[dict[str, int], int] | None:
    """Read every record of a volume with every checksum; returns live ``{uid: offset}`` and bytes walked,
    or None if the file is gone (a compaction replaced it since it was listed)."""
    live: dict[str, int] = {}
    try:
        volume = Volume.open(path)
    except VolumeNotFoundError:
        return None
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
                    if entry.header.kind == RecordKind.DICTIONARY:
                        read_dictionary(volume, offset)
                        continue
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


def verify_instance(archive: Archive, sop_instance_uid: str) -> str:
    """Check one stored instance as a retrieval would read it: indexed (so durable: the index is committed
    only after the record was fsynced), its record's metadata and every frame against their checksums.

    Returns its SOP Class UID as stored.  Raises ``KeyError`` if the instance is not in the index, and
    :class:`~dcbnode.dcbs.DcbsError` (or ``OSError``) if its record cannot be read or fails a checksum.
    """
    with archive.open_instance(sop_instance_uid) as stored:
        for _ in stored.iter_frames():
            pass
        return stored.meta.sop_class_uid


def verify(archive: Archive, progress: Progress | None = None) -> VerifyReport:
    """Check every checksum of every record, and that the index and the volumes agree."""
    report = VerifyReport()
    report.repaired = [str(p) for p in resolve_generations(archive)]
    files = volume_files(archive)
    volumes: dict[str, tuple[dict[str, int], int]] = {}
    for number, path in enumerate(files, 1):
        if (checked := _check_volume(path, report)) is not None:
            volumes[archive.index_path(path)] = checked
        if progress:
            progress(number, len(files))
    with archive.index.session() as session:
        rows = session.execute(select(Instance.sop_instance_uid, VolumeRow.path, Instance.record_offset)
                               .join(VolumeRow, Instance.volume)).all()
    # A compaction while this ran (the node compresses series in the background) moved instances to a
    # generation that was not listed yet: check it too.  The file it replaced is gone, and no longer
    # indexed: its copies are no stale copies.
    indexed_paths = {path for _, path, _ in rows}
    for path in sorted(indexed_paths - set(volumes)):
        if (checked := _check_volume(archive.volume_file(path), report)) is not None:
            volumes[path] = checked
    for path in set(volumes) - indexed_paths:
        if not archive.volume_file(path).exists():
            del volumes[path]
    report.volumes = len(volumes)
    indexed: set[tuple[str, str]] = set()
    indexed_in: dict[str, str] = {}
    for uid, path, offset in rows:
        indexed.add((path, uid))
        indexed_in[uid] = path
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
            if (path, uid) in indexed:
                continue
            if uid in indexed_in:  # a replacement elsewhere superseded it; compaction drops it
                report.problems.append(f"{archive.data_dir / path} offset {offset}: stale copy of instance {uid}, "
                                       f"which the index has in {indexed_in[uid]}; 'dcbnode-admin compact' removes it")
            else:
                report.problems.append(f"{archive.data_dir / path} offset {offset}: live instance {uid} is not indexed")
    return report


# -- compaction ------------------------------------------------------------------------------------------
