"""Turning a C-FIND identifier into a :class:`~.keys.Query` (PS3.4 C.2.2.2, C.4.1.2.1), or a failure."""

from __future__ import annotations

import re

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ...config import QueryConfig
from ...dcbs import is_valid_uid
from .keys import (
    DERIVED_COUNTS,
    DERIVED_LISTS,
    INDEX_KEYS,
    LEVELS,
    MODELS,
    STATUS_IDENTIFIER_MISMATCH,
    UNIQUE_KEYS,
    Match,
    Query,
    QueryError,
    level_of,
)

_DA = re.compile(r"\d{8}$")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
#: attributes answered without the index
_SPECIAL = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}


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
            match = value_match(keyword, value)
            if match is not None:
                query.matches.append(match)
    if combined_datetime:
        _combine_date_time(query)
    return query


def _tag(keyword: str) -> int:
    return int(tag_for_keyword(keyword) or 0)


def value_match(keyword: str, value: str) -> Match | None:
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
        if vr == "UI" and not all(is_valid_uid(p) for p in parts):
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"{keyword} is not a valid UID")
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
