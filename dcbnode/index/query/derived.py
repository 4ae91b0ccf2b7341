"""Attributes computed per batch of matches: counts, ModalitiesInStudy, SOPClassesInStudy, first instances."""

from __future__ import annotations

from functools import cache

from sqlalchemy import Connection, Select, bindparam, func, literal, select

from ..models import Instance, Series, Study
from .keys import DERIVED_COUNTS

#: the primary keys of a batch of matches, in the cached per-batch statements
_PKS = bindparam("pks", expanding=True)


def derived_values(conn: Connection, owner: str, keywords: set[str], pks: list[int]) -> dict[int, dict]:
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


def first_instances(conn: Connection, level: str, pks: list[int]) -> dict[int, str]:
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
