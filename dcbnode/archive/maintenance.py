"""Maintenance of an archive: statistics, selection, listing, import and export.

These are the library functions behind ``dcbnode-admin``; they know nothing about argument parsing or
output formatting, and nothing about the network.  Verification is in :mod:`.verification`, compaction in
:mod:`.compaction`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless
from sqlalchemy import func, select

from ..dcbs import (
    InvalidDatasetError,
    available_syntaxes,
    rebuild,
)
from ..index.models import Instance, Patient, Series, Study
from .archive import Archive, StoreResult
from .recovery import volume_files

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
    files = volume_files(archive)
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
