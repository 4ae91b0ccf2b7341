"""C-FIND on the index: parse a query identifier, match it in SQL, build the responses (PS3.4 C.2.2, C.4.1).

No network code here: :func:`parse_identifier` turns an identifier into a :class:`Query` (or raises
:class:`QueryError` with the failure status and Error Comment to answer), :func:`run_query` streams one
response dataset per matching entity.  Every user value reaches SQL as a bound parameter; wildcards become
``LIKE … ESCAPE`` (or ``GLOB`` for case-sensitive matching on SQLite, whose ``LIKE`` ignores ASCII case).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache

from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import IS, PersonName
from sqlalchemy import ColumnElement, Connection, Select, and_, bindparam, exists, func, literal, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from ..config import QueryConfig
from .attributes import fold_name
from .database import Index
from .models import Instance, Patient, Series, Study

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: the levels of each information model, by the name pynetdicom/DCMTK use for it
MODELS = {"PATIENT": LEVELS, "STUDY": LEVELS[1:]}
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}
STATUS_IDENTIFIER_MISMATCH = 0xA900  #: "Identifier does not match SOP Class"
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_UNABLE_TO_PROCESS = 0xC000
_ESCAPE = "!"
_FETCH_BATCH = 200
_NO_VALIDATION = pydicom_config.IGNORE
#: the primary keys of a batch of matches, in the cached per-batch statements
_PKS = bindparam("pks", expanding=True)
_DA = re.compile(r"\d{8}$")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


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


#: derived counts, computed per batch of matches by one grouped query (see :func:`_derived_values`):
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
_LEVEL_PK = {"PATIENT": Patient.id, "STUDY": Study.id, "SERIES": Series.id, "IMAGE": Instance.id}
#: attributes answered without the index
_SPECIAL = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}


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


def _text_value(identifier: Dataset, tag: int) -> str:
    """The value of an identifier element as one string (multiple values joined by backslash)."""
    try:
        value = identifier[tag].value
    except Exception as exc:  # undecodable bytes, bad VR …
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"Unreadable value in {tag:08X}") from exc
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return value.decode("ascii", "replace").strip(" \0")
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip(" \0")


def parse_identifier(identifier: Dataset, model: str, config: QueryConfig | None = None, *,
                     combined_datetime: bool = False) -> Query:
    """Validate a hierarchical query (PS3.4 C.4.1.2.1) and turn it into a :class:`Query`.

    ``model`` is "PATIENT" or "STUDY" (the root); ``config`` says whether names match case-insensitively.
    ``combined_datetime``: match StudyDate and StudyTime ranges as one date-time range (C.2.2.2.5.2, when
    negotiated).  Raises :class:`QueryError`.
    """
    if model not in MODELS:
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"Unknown information model {model!r}")
    levels = MODELS[model]
    if "QueryRetrieveLevel" not in identifier:
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, "QueryRetrieveLevel is missing")
    level = _text_value(identifier, 0x00080052).upper()
    if level not in levels:
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"Bad QueryRetrieveLevel {level[:16]!r} for this model")
    depth = LEVELS.index(level)
    above = [UNIQUE_KEYS[lv] for lv in levels[: levels.index(level)]]
    query = Query(model, level, [], [], config.case_insensitive_names if config else True)
    values: dict[str, str] = {}
    for element in identifier:
        tag = int(element.tag)
        if element.tag.element == 0 or element.tag.group in (0x0000, 0x0002):
            continue
        keyword = keyword_for_tag(tag) if not element.tag.is_private else ""
        vr = dictionary_VR(tag) if keyword else (element.VR if element.VR != "UN" else "LO")
        if keyword == "SpecificCharacterSet":
            continue
        query.returned.append((tag, keyword, vr))
        if keyword in _SPECIAL:
            continue
        value = _text_value(identifier, tag) if vr != "SQ" else ""
        key_level = level_of(keyword)
        if key_level is None:
            query.header_keys.add(tag)  # optional key: returned from a stored header, not matched
            continue
        if LEVELS.index(key_level) > depth and value:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"{keyword} is below the {level} level")
        values[keyword] = value
    for keyword in above:
        value = values.get(keyword, "")
        if not value or "\\" in value or "*" in value or "?" in value:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH,
                             f"{keyword} must be one value at {level} level" if value else f"{keyword} missing")
    if UNIQUE_KEYS[level] not in values:  # the unique key of the level is always returned
        keyword = UNIQUE_KEYS[level]
        query.returned.append((_tag(keyword), keyword, INDEX_KEYS[keyword].vr))
    for keyword, value in values.items():
        if LEVELS.index(level_of(keyword) or "IMAGE") <= depth:
            match = _match(keyword, value)
            if match is not None:
                query.matches.append(match)
    if combined_datetime:
        _combine_date_time(query)
    return query


def _tag(keyword: str) -> int:
    return int(tag_for_keyword(keyword) or 0)


def _match(keyword: str, value: str) -> Match | None:
    """The matching a value asks for; None for universal matching."""
    if value == "" or (value.strip("*") == "" and keyword not in ("StudyDate", "StudyTime")):
        return None
    vr = INDEX_KEYS[keyword].vr if keyword in INDEX_KEYS else ("UI" if keyword == "SOPClassesInStudy" else "CS")
    if keyword in DERIVED_COUNTS:
        return None  # counts are returned, never matched
    if vr in ("DA", "TM"):
        check = _DA if vr == "DA" else _TM
        low, dash, high = value.partition("-")
        if any(part and not check.match(part) for part in (low, high)) or (dash and not (low or high)):
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"Malformed {keyword} {value[:24]!r}")
        if not dash:
            return Match(keyword, "single" if vr == "DA" else "range", (value, value))
        return Match(keyword, "range", (low, high))
    if "\\" in value or vr == "UI" or keyword in DERIVED_LISTS:
        parts = tuple(v.strip() for v in value.split("\\"))
        if vr == "UI" and any("*" in p or "?" in p for p in parts):
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"Wildcards are not allowed in {keyword}")
        if len(parts) > 1 or vr == "UI":
            return Match(keyword, "list", parts)
    if vr == "IS":
        try:
            return Match(keyword, "single", (str(int(value)),))
        except ValueError:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"Malformed {keyword} {value[:24]!r}") from None
    return Match(keyword, "wild" if ("*" in value or "?" in value) else "single", (value,))


def _combine_date_time(query: Query) -> None:
    """Replace StudyDate and StudyTime ranges by one date-time range (PS3.4 C.2.2.2.5.2)."""
    by_key = {m.keyword: m for m in query.matches}
    date, time = by_key.get("StudyDate"), by_key.get("StudyTime")
    if date is None or time is None or date.kind != "range" or time.kind != "range":
        return
    query.matches = [m for m in query.matches if m not in (date, time)]
    query.matches.append(Match("StudyDateTime", "datetime", date.values + time.values))


# -- SQL ---------------------------------------------------------------------------------------------------


def _escape_like(text: str) -> str:
    return text.replace(_ESCAPE, _ESCAPE * 2).replace("%", _ESCAPE + "%").replace("_", _ESCAPE + "_")


def _pattern(column: ColumnElement[str], value: str, glob: bool) -> ColumnElement[bool]:
    """``column`` matches a DICOM wildcard value (``*``, ``?``), as bound parameters only."""
    if glob:  # SQLite GLOB: case-sensitive; brackets make *, ? and [ literal
        literal = {"[": "[[]", "]": "]"}
        text = "".join(literal.get(c, c) for c in value)
        return column.op("GLOB")(text)
    text = "".join("%" if c == "*" else "_" if c == "?" else _escape_like(c) for c in value)
    return column.like(text, escape=_ESCAPE)


def _string_condition(column: ColumnElement[str], value: str, *, wild: bool, glob: bool,
                      person_name: bool) -> ColumnElement[bool]:
    if not person_name or "=" in value:
        return _pattern(column, value, glob) if wild else column == value
    # A PN value without "=" also matches any one component group of a multi-group stored name.
    first = _pattern(column, value, glob) if wild else column == value
    groups = (f"{value}=*", f"*={value}=*", f"*={value}")
    return or_(first, *(_pattern(column, group, glob) for group in groups))


_TM_PAD = {2: "5959.999999", 4: "59.999999", 6: ".999999"}


def _time_upper(value: str) -> str:
    """The latest time a (possibly truncated) TM upper bound includes."""
    return value + _TM_PAD[len(value)] if len(value) in _TM_PAD else value.ljust(13, "9")


def _condition(match: Match, query: Query, glob: bool) -> ColumnElement[bool]:
    if match.kind == "datetime":
        d_low, d_high, t_low, t_high = match.values
        low = or_(Study.study_date > d_low, and_(Study.study_date == d_low, Study.study_time >= t_low)) \
            if d_low else Study.study_date != ""
        high = or_(Study.study_date < d_high, and_(Study.study_date == d_high,
                                                    Study.study_time <= _time_upper(t_high or "23"))) \
            if d_high else Study.study_date != ""
        # the plain date bounds the OR-ed conditions imply, so that the study_date index bounds the search
        bounds = [Study.study_date >= d_low] if d_low else []
        bounds += [Study.study_date <= d_high] if d_high else []
        return and_(*bounds, low, high)
    if match.keyword in DERIVED_LISTS:
        column = DERIVED_LISTS[match.keyword]
        inner = (column.in_(match.values) if match.kind == "list"
                 else _string_condition(column, match.values[0], wild=match.kind == "wild", glob=glob,
                                        person_name=False))
        where = [Series.study_pk == Study.id, inner]
        if column is Instance.sop_class_uid:
            where.append(Instance.series_pk == Series.id)
        return exists(select(column).where(*where))
    key = INDEX_KEYS[match.keyword]
    column = key.column
    if match.kind == "list" and key.vr == "UI":
        return column.in_(match.values)
    if match.kind == "list":  # value list (C.2.2.2.8): any one value matches, each with its own wildcards
        return or_(*(_condition(_match(match.keyword, value) or Match(match.keyword, "wild", ("*",)), query, glob)
                     for value in match.values))
    if match.kind == "range":
        low, high = match.values
        upper = _time_upper(high) if key.vr == "TM" and high else high
        parts = [column >= low] if low else [column != ""]
        if high:
            parts.append(column <= upper)
        return and_(*parts)
    if key.vr == "IS":
        return column == int(match.values[0])
    value = match.values[0]
    if key.vr == "PN" and query.case_insensitive_names and key.folded is not None:
        return _string_condition(key.folded, fold_name(value), wild=match.kind == "wild", glob=False,
                                 person_name=True)
    return _string_condition(column, value, wild=match.kind == "wild", glob=glob and key.vr != "UI",
                             person_name=key.vr == "PN")


def _derived_needed(query: Query) -> dict[str, set[str]]:
    """Derived keywords the responses carry, grouped by the level of the entity they describe."""
    depth = LEVELS.index(query.level)
    needed: dict[str, set[str]] = {}
    for _, keyword, _ in query.returned:
        owner = level_of(keyword) if keyword in DERIVED_COUNTS or keyword in DERIVED_LISTS else None
        if owner is not None and LEVELS.index(owner) <= depth:
            needed.setdefault(owner, set()).add(keyword)
    return needed


def build_select(query: Query, dialect: str) -> tuple[object, list[str]]:
    """The SELECT of the matches (Core, one tuple per entity) and the names of its columns.

    Derived attributes are not in it: :func:`run_query` computes them per batch of rows.
    """
    depth = LEVELS.index(query.level)
    columns: dict[str, ColumnElement] = {"_pk": _LEVEL_PK[query.level].label("_pk")}
    for _, keyword, _ in query.returned:
        if keyword in INDEX_KEYS and LEVELS.index(INDEX_KEYS[keyword].level) <= depth:
            columns[keyword] = INDEX_KEYS[keyword].column.label(keyword)
    for owner in _derived_needed(query):
        columns[f"_{owner}_pk"] = _LEVEL_PK[owner].label(f"_{owner}_pk")
    if depth >= 1:
        columns["_charset"] = Study.specific_character_set.label("_charset")
    if depth == 3:
        columns["_sop"] = Instance.sop_instance_uid.label("_sop")
    stmt = select(*columns.values()).select_from(Patient)
    if depth >= 1:
        stmt = stmt.join(Study, Study.patient_pk == Patient.id)
    if depth >= 2:
        stmt = stmt.join(Series, Series.study_pk == Study.id)
    if depth >= 3:
        stmt = stmt.join(Instance, Instance.series_pk == Series.id)
    glob = dialect == "sqlite"
    stmt = stmt.where(*(_condition(m, query, glob) for m in query.matches)) if query.matches else stmt
    if depth == 3:
        stmt = stmt.order_by(Instance.instance_number, Instance.id)
    return stmt, list(columns)


# -- derived attributes, per batch -------------------------------------------------------------------------


def _derived_values(conn: Connection, owner: str, keywords: set[str], pks: list[int]) -> dict[int, dict]:
    """``{owner pk: {keyword: value}}`` for a batch of patients/studies/series: one grouped query per need.

    Counts come from one row per series (its owner, its study, its instance count), so a batch of 200
    studies costs one indexed query instead of 200 correlated subqueries or per-row look-ups.
    """
    values: dict[int, dict] = {pk: {} for pk in pks}
    counts = {DERIVED_COUNTS[k][1] for k in keywords if k in DERIVED_COUNTS}
    if counts or "ModalitiesInStudy" in keywords:
        per_series = _per_series(owner, with_instances="instances" in counts)
        studies: dict[int, set[int]] = {pk: set() for pk in pks}
        series: dict[int, int] = dict.fromkeys(pks, 0)
        instances: dict[int, int] = dict.fromkeys(pks, 0)
        modalities: dict[int, set[str]] = {pk: set() for pk in pks}
        for owner_pk, study_pk, series_pk, modality, count in conn.execute(per_series, {"pks": pks}):
            if study_pk is not None:
                studies[owner_pk].add(study_pk)
            if series_pk is not None:
                series[owner_pk] += 1
                instances[owner_pk] += count or 0
                if modality:
                    modalities[owner_pk].add(modality)
        by_count = {"studies": lambda pk: len(studies[pk]), "series": series.__getitem__,
                    "instances": instances.__getitem__}
        for keyword in keywords:
            if keyword in DERIVED_COUNTS:
                get = by_count[DERIVED_COUNTS[keyword][1]]
                for pk in pks:
                    values[pk][keyword] = get(pk)
        if "ModalitiesInStudy" in keywords:
            for pk in pks:
                values[pk]["ModalitiesInStudy"] = sorted(modalities[pk])
    if "SOPClassesInStudy" in keywords:
        classes: dict[int, set[str]] = {pk: set() for pk in pks}
        for study_pk, sop_class in conn.execute(_sop_classes(), {"pks": pks}):
            if sop_class:
                classes[study_pk].add(sop_class)
        for pk in pks:
            values[pk]["SOPClassesInStudy"] = sorted(classes[pk])
    return values


@cache
def _sop_classes() -> Select:
    """(study pk, SOP Class UID) of the studies of a batch."""
    return (select(Series.study_pk, Instance.sop_class_uid).distinct()
            .join(Instance, Instance.series_pk == Series.id).where(Series.study_pk.in_(_PKS)))


@cache
def _per_series(owner: str, *, with_instances: bool) -> Select:
    """(owner pk, study pk, series pk, modality, instance count) for every series of the owners.

    Outer joins keep owners without children (counts 0).  Instances are counted from the
    ``instances.series_pk`` index alone (``count(series_pk)``: no table access).
    """
    count = func.count(Instance.series_pk) if with_instances else literal(0)
    if owner == "SERIES":
        stmt = (select(Series.id, Series.study_pk, Series.id, Series.modality, count)
                .select_from(Series).where(Series.id.in_(_PKS)))
    elif owner == "STUDY":
        stmt = (select(Series.study_pk, Series.study_pk, Series.id, Series.modality, count)
                .select_from(Series).where(Series.study_pk.in_(_PKS)))
    else:
        stmt = (select(Study.patient_pk, Study.id, Series.id, Series.modality, count)
                .select_from(Study).outerjoin(Series, Series.study_pk == Study.id)
                .where(Study.patient_pk.in_(_PKS)))
    if with_instances:  # grouped by every plain column, as PostgreSQL wants
        stmt = stmt.outerjoin(Instance, Instance.series_pk == Series.id).group_by(*stmt.selected_columns[:4])
    return stmt


def _first_instances(conn: Connection, level: str, pks: list[int]) -> dict[int, str]:
    """The first-stored instance (lowest id) of each patient/study/series of a batch, for header keys."""
    return {owner_pk: sop for owner_pk, sop in conn.execute(_first_instance_stmt(level), {"pks": pks})}


@cache
def _first_instance_stmt(level: str) -> Select:
    if level == "SERIES":
        owner = Instance.series_pk
        first = select(owner.label("owner"), func.min(Instance.id).label("first"))
    else:
        owner = Series.study_pk if level == "STUDY" else Study.patient_pk
        first = select(owner.label("owner"), func.min(Instance.id).label("first")).join(
            Series, Instance.series_pk == Series.id)
        if level == "PATIENT":
            first = first.join(Study, Series.study_pk == Study.id)
    sub = first.where(owner.in_(_PKS)).group_by(owner).subquery()
    return select(sub.c.owner, Instance.sop_instance_uid).join(sub, Instance.id == sub.c.first)


# -- responses ---------------------------------------------------------------------------------------------

HeaderReader = Callable[[str], Dataset | None]
#: how a response attribute gets its value (see :class:`_ResponsePlan`)
_CONST, _COLUMN, _DERIVED, _HEADER, _EMPTY = range(5)


class _ResponsePlan:
    """Everything about building a response that does not depend on the row, worked out once per query."""

    def __init__(self, query: Query, names: list[str], retrieve_ae_title: str, headers: bool) -> None:
        position = {name: i for i, name in enumerate(names)}
        needed = _derived_needed(query)
        self.slots: list[tuple[BaseTag, str, bool, int, object]] = []
        for tag, keyword, vr in query.returned:
            if keyword == "QueryRetrieveLevel":
                slot: tuple[int, object] = (_CONST, query.level)
            elif keyword == "RetrieveAETitle":
                slot = (_CONST, retrieve_ae_title)
            elif keyword == "InstanceAvailability":
                slot = (_CONST, "ONLINE")
            elif keyword and keyword in position:
                slot = (_COLUMN, position[keyword])
            elif any(keyword in kws for kws in needed.values()):
                owner = level_of(keyword)
                slot = (_DERIVED, (position[f"_{owner}_pk"], owner, keyword))
            elif headers and tag in query.header_keys:
                slot = (_HEADER, None)
            else:
                slot = (_EMPTY, None)
            # plain elements go straight into the dataset's dict (what Dataset.__setitem__ ends up doing);
            # private, sequence and header elements take the checked path
            plain = not BaseTag(tag).is_private and vr != "SQ" and slot[0] != _HEADER
            self.slots.append((BaseTag(tag), vr, plain, *slot))
        self.level = query.level
        self.add_level = "QueryRetrieveLevel" not in {kw for _, kw, _ in query.returned}
        self.charset = position.get("_charset")


#: VRs whose one-value text pydicom keeps as the str itself (dates and times too, unless it converts them)
_TEXT_VRS = frozenset({"AE", "AS", "CS", "LO", "SH", "LT", "ST", "UT", "UC", "UR"})
_DATETIME_VRS = frozenset({"DA", "TM", "DT"})


def _element(tag: BaseTag, vr: str, value: object) -> DataElement:
    """A response element; values come from the index, so pydicom's value validation is skipped.

    Single text values get the type pydicom would convert them to (str, UID, PersonName) up front,
    which skips its generic conversion (the bulk of building a response otherwise).
    """
    if type(value) is str and "\\" not in value:
        if vr in _TEXT_VRS or (vr in _DATETIME_VRS and not pydicom_config.datetime_conversion):
            return DataElement(tag, vr, value, validation_mode=_NO_VALIDATION, already_converted=True)
        if vr == "UI":
            return DataElement(tag, vr, UID(value, _NO_VALIDATION), validation_mode=_NO_VALIDATION,
                               already_converted=True)
        if vr == "PN":
            return DataElement(tag, vr, PersonName(value, validation_mode=_NO_VALIDATION),
                               validation_mode=_NO_VALIDATION, already_converted=True)
    elif type(value) is int and vr == "IS":
        return DataElement(tag, vr, IS(value, _NO_VALIDATION), validation_mode=_NO_VALIDATION,
                           already_converted=True)
    elif type(value) is list and vr in _TEXT_VRS and len(value) > 1 and all(type(v) is str for v in value):
        return DataElement(tag, vr, MultiValue(str, value), validation_mode=_NO_VALIDATION, already_converted=True)
    return DataElement(tag, vr, value, validation_mode=_NO_VALIDATION)


def _build(plan: _ResponsePlan, row: tuple, derived: dict[str, dict[int, dict]], header: Dataset | None) -> Dataset:
    """The response dataset of one matching row."""
    ds = Dataset()
    elements = ds._dict
    texts: list[str] = []
    for tag, vr, plain, how, source in plan.slots:
        if how == _COLUMN:
            value = row[source]  # type: ignore[index]
            if value is None:
                value = ""
            elif not isinstance(value, (str, int)):
                value = str(value)
        elif how == _CONST:
            value = source
        elif how == _DERIVED:
            index, owner, keyword = source  # type: ignore[misc]
            value = derived[owner][row[index]][keyword]
        elif how == _HEADER and header is not None and tag in header:
            element = header[tag]
            vr, value = element.VR, element.value
            value = str(value) if vr == "PN" and value is not None else value
        else:
            value = None
        if plain:
            elements[tag] = _element(tag, vr, value)
        else:
            ds[tag] = _element(tag, vr, value)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            texts.extend(v for v in value if isinstance(v, str))
    if plan.add_level:
        ds.QueryRetrieveLevel = plan.level
    charset = _response_charset(texts, str(row[plan.charset] or "") if plan.charset is not None else "")
    if charset:
        ds.SpecificCharacterSet = charset
    return ds


def run_query(index: Index, query: Query, *, retrieve_ae_title: str = "", limit: int = 0,
              header_reader: HeaderReader | None = None) -> Iterator[Dataset]:
    """One response identifier per matching entity, streamed in batches as rows are fetched.

    Rows come from one Core SELECT (plain tuples, no ORM objects); for each batch of
    :data:`_FETCH_BATCH` rows, derived attributes (counts, ModalitiesInStudy, SOPClassesInStudy) take one
    grouped query per level they describe, and the first instance of each entity (for header keys) one more.

    ``limit`` > 0: raise :class:`QueryError` (0xA700) when more entities than that match, after
    yielding ``limit`` of them.  ``header_reader(sop_instance_uid)`` returns a stored header dataset for
    attributes the index lacks (empty values without it).
    """
    stmt, names = build_select(query, index.engine.dialect.name)
    headers = bool(query.header_keys) and header_reader is not None
    plan = _ResponsePlan(query, names, retrieve_ae_title, headers)
    needed = _derived_needed(query)
    owner_index = {owner: names.index(f"_{owner}_pk") for owner in needed}
    sop_index = names.index("_sop") if "_sop" in names else None
    count = 0
    with index.engine.connect() as conn:
        # PATIENT and STUDY matches can be a whole table: stream them (a server-side cursor on PostgreSQL);
        # SERIES and IMAGE matches are one study's or series' worth, fetched in one go (fewer round trips).
        # The per-batch look-ups below always use plain client-side cursors.
        streamed = {"stream_results": True, "yield_per": _FETCH_BATCH} if query.level in ("PATIENT", "STUDY") else {}
        result = conn.execute(stmt, execution_options=streamed)  # type: ignore[arg-type]
        for rows in result.partitions(_FETCH_BATCH):
            derived = {owner: _derived_values(conn, owner, needed[owner], list({row[i] for row in rows}))
                       for owner, i in owner_index.items()}
            first: dict[int, str] = {}
            if headers and sop_index is None:
                first = _first_instances(conn, query.level, [row[0] for row in rows])
            for row in rows:
                if limit and count >= limit:
                    raise QueryError(STATUS_OUT_OF_RESOURCES, f"More than {limit} matches: refine the query")
                count += 1
                header = None
                if headers:
                    sop = row[sop_index] if sop_index is not None else first.get(row[0])
                    header = header_reader(sop) if sop else None  # type: ignore[misc]
                yield _build(plan, row, derived, header)


def _response_charset(texts: list[str], stored: str) -> str:
    """"" for ASCII; the study's stored single-byte set when it encodes every value; else UTF-8."""
    if all(text.isascii() for text in texts):
        return ""
    codec = python_encoding.get(stored) if stored else None
    if codec and "\\" not in stored and stored != "ISO_IR 192":
        try:
            for text in texts:
                text.encode(codec)
            return stored
        except UnicodeEncodeError:
            pass
    return "ISO_IR 192"
