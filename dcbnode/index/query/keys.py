"""What a C-FIND query is made of: levels, the keys the index holds, derived keys, matches, failures."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import InstrumentedAttribute

from ..models import Instance, Patient, Series, Study

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: the levels of each information model, by the name pynetdicom/DCMTK use for it
MODELS = {"PATIENT": LEVELS, "STUDY": LEVELS[1:]}
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}
STATUS_IDENTIFIER_MISMATCH = 0xA900  #: "Identifier does not match SOP Class"
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_UNABLE_TO_PROCESS = 0xC000


class QueryError(Exception):
    """A query that cannot be answered: ``status`` is the C-FIND failure status, ``comment`` the reason."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]  # Error Comment is LO


@dataclass(frozen=True, slots=True)
class Key:
    """An attribute the index holds: its level, VR and column (and folded column for PN)."""

    level: str
    vr: str
    column: InstrumentedAttribute
    folded: InstrumentedAttribute | None = None


INDEX_KEYS: dict[str, Key] = {
    "PatientID": Key("PATIENT", "LO", Patient.patient_id),
    "IssuerOfPatientID": Key("PATIENT", "LO", Patient.issuer_of_patient_id),
    "PatientName": Key("PATIENT", "PN", Patient.patient_name, Patient.patient_name_folded),
    "PatientBirthDate": Key("PATIENT", "DA", Patient.patient_birth_date),
    "PatientSex": Key("PATIENT", "CS", Patient.patient_sex),
    "StudyInstanceUID": Key("STUDY", "UI", Study.study_instance_uid),
    "StudyDate": Key("STUDY", "DA", Study.study_date),
    "StudyTime": Key("STUDY", "TM", Study.study_time),
    "AccessionNumber": Key("STUDY", "SH", Study.accession_number),
    "StudyID": Key("STUDY", "SH", Study.study_id),
    "StudyDescription": Key("STUDY", "LO", Study.study_description),
    "ReferringPhysicianName": Key("STUDY", "PN", Study.referring_physician_name,
                                  Study.referring_physician_name_folded),
    "SeriesInstanceUID": Key("SERIES", "UI", Series.series_instance_uid),
    "Modality": Key("SERIES", "CS", Series.modality),
    "SeriesNumber": Key("SERIES", "IS", Series.series_number),
    "SeriesDescription": Key("SERIES", "LO", Series.series_description),
    "BodyPartExamined": Key("SERIES", "CS", Series.body_part_examined),
    "SOPInstanceUID": Key("IMAGE", "UI", Instance.sop_instance_uid),
    "SOPClassUID": Key("IMAGE", "UI", Instance.sop_class_uid),
    "InstanceNumber": Key("IMAGE", "IS", Instance.instance_number),
    "NumberOfFrames": Key("IMAGE", "IS", Instance.number_of_frames),
}


#: derived counts, computed per batch of matches by one grouped query (see :func:`.derived.derived_values`):
#: keyword -> (level of the entity counted for, what is counted)
DERIVED_COUNTS: dict[str, tuple[str, str]] = {
    "NumberOfPatientRelatedStudies": ("PATIENT", "studies"),
    "NumberOfPatientRelatedSeries": ("PATIENT", "series"),
    "NumberOfPatientRelatedInstances": ("PATIENT", "instances"),
    "NumberOfStudyRelatedSeries": ("STUDY", "series"),
    "NumberOfStudyRelatedInstances": ("STUDY", "instances"),
    "NumberOfSeriesRelatedInstances": ("SERIES", "instances"),
}
#: derived per-study lists: keyword -> column aggregated over the study's series/instances
DERIVED_LISTS = {"ModalitiesInStudy": Series.modality, "SOPClassesInStudy": Instance.sop_class_uid}


@dataclass(frozen=True, slots=True)
class Match:
    """One matching condition: ``kind`` is single, wild, list, range or datetime (C.2.2.2)."""

    keyword: str
    kind: str
    values: tuple[str, ...]


@dataclass
class Query:
    """A parsed C-FIND identifier."""

    model: str  #: "PATIENT" (Patient Root) or "STUDY" (Study Root)
    level: str
    matches: list[Match]
    #: requested attributes in identifier order: (tag, keyword or "", VR)
    returned: list[tuple[int, str, str]]
    case_insensitive_names: bool = True
    header_keys: set[int] = field(default_factory=set)  #: tags to read from a stored header


def level_of(keyword: str) -> str | None:
    """The query level an attribute belongs to, or None when the index does not know it."""
    if keyword in INDEX_KEYS:
        return INDEX_KEYS[keyword].level
    if keyword in DERIVED_COUNTS:
        return DERIVED_COUNTS[keyword][0]
    return "STUDY" if keyword in DERIVED_LISTS else None
