"""Extract the attributes the index keeps from a received dataset."""

from __future__ import annotations

import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, replace

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from ..dcbs.dataset_split import raw_values


def fold_name(name: str) -> str:
    """Case-folded, NFC-normalised person name: the form case-insensitive PN matching compares."""
    return unicodedata.normalize("NFC", name).casefold()


@dataclass(frozen=True, slots=True)
class IndexAttributes:
    """Patient, study, series and instance level attributes of one instance (PS3.4 C.6)."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    specific_character_set: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    number_of_frames: int


def _text(dataset: Dataset, keyword: str, limit: int = 64) -> str:
    """A value as text (person names decoded with the dataset's character set); '' if unreadable."""
    try:
        value = dataset.get(keyword)
    except Exception:  # a malformed optional attribute must not stop the store
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit]


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


#: The patient, study and series attributes (and the character set their text is decoded with).
_LEVEL_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
                   "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
                   "ReferringPhysicianName", "SpecificCharacterSet", "SeriesInstanceUID", "Modality",
                   "SeriesNumber", "SeriesDescription", "BodyPartExamined")
_LEVEL_TAGS = tuple(Tag(keyword) for keyword in _LEVEL_KEYWORDS)


class LevelAttributeCache:
    """The patient, study and series attributes last read for a few series, by the raw bytes of their
    elements: the instances of a series nearly always repeat them, and decoding ~18 values per received
    instance costs more than the rest of its index write."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[bytes | str | None, ...], IndexAttributes] = OrderedDict()

    def attributes(self, dataset: Dataset) -> IndexAttributes:
        """:func:`index_attributes` of ``dataset``, reusing the level attributes of an earlier instance
        whose level elements were byte for byte the same."""
        key = raw_values(dataset, _LEVEL_TAGS)
        with self._lock:
            cached = self._entries.get(key) if key is not None else None
            if cached is not None:
                self._entries.move_to_end(key)
        if cached is None:
            attributes = index_attributes(dataset)
            if key is not None:
                with self._lock:
                    self._entries[key] = attributes
                    if len(self._entries) > self._size:
                        self._entries.popitem(last=False)
            return attributes
        return replace(cached, **_instance_level(dataset))


def _instance_level(dataset: Dataset) -> dict[str, str | int | None]:
    return {
        "sop_instance_uid": str(dataset.SOPInstanceUID),
        "sop_class_uid": str(dataset.SOPClassUID),
        "instance_number": _integer(dataset, "InstanceNumber"),
        "number_of_frames": _integer(dataset, "NumberOfFrames") or 1,
    }


def index_attributes(dataset: Dataset) -> IndexAttributes:
    """Read the index attributes; the four UIDs must already have been validated."""
    return IndexAttributes(
        patient_id=_text(dataset, "PatientID"),
        issuer_of_patient_id=_text(dataset, "IssuerOfPatientID"),
        patient_name=_text(dataset, "PatientName", 324),
        patient_birth_date=_text(dataset, "PatientBirthDate", 8),
        patient_sex=_text(dataset, "PatientSex", 16),
        study_instance_uid=str(dataset.StudyInstanceUID),
        study_date=_text(dataset, "StudyDate", 8),
        study_time=_text(dataset, "StudyTime", 16),
        accession_number=_text(dataset, "AccessionNumber", 16),
        study_id=_text(dataset, "StudyID", 16),
        study_description=_text(dataset, "StudyDescription"),
        referring_physician_name=_text(dataset, "ReferringPhysicianName", 324),
        specific_character_set=_text(dataset, "SpecificCharacterSet", 128),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        modality=_text(dataset, "Modality", 16),
        series_number=_integer(dataset, "SeriesNumber"),
        series_description=_text(dataset, "SeriesDescription"),
        body_part_examined=_text(dataset, "BodyPartExamined", 16),
        **_instance_level(dataset),
    )
