"""The SQL of a C-FIND query: one SELECT of the matching entities, every user value a bound parameter.

Wildcards become ``LIKE … ESCAPE`` (or ``GLOB`` for case-sensitive matching on SQLite, whose ``LIKE``
ignores ASCII case).
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, exists, or_, select

from ..attributes import fold_name
from ..models import Instance, Patient, Series, Study
from .keys import DERIVED_COUNTS, DERIVED_LISTS, INDEX_KEYS, LEVELS, Match, Query, level_of
from .parse import value_match

_ESCAPE = "!"
_LEVEL_PK = {"PATIENT": Patient.id, "STUDY": Study.id, "SERIES": Series.id, "IMAGE": Instance.id}


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
        return or_(*(_condition(value_match(match.keyword, value) or Match(match.keyword, "wild", ("*",)), query, glob)
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


def derived_needed(query: Query) -> dict[str, set[str]]:
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
    for owner in derived_needed(query):
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
