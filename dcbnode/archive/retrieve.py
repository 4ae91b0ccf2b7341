"""Resolve a C-MOVE / C-GET identifier to the instances to send (PS3.4 C.4.2.2.1, C.4.3.2.1).

No network code: :func:`parse_retrieve_identifier` validates an identifier into a :class:`RetrieveRequest`
(or raises :class:`RetrieveError` with the failure status and Error Comment to answer), and
:func:`resolve` lists the matching instances in a stable order (patient, study, series number, instance
number, UID).  Baseline hierarchical retrieve: the unique key of the retrieve level may hold a list of UIDs;
the unique keys above it, when given, must be single values and are matched too.  Other keys are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import select

from ..dcbs import is_valid_uid
from ..index import Index
from ..index.models import Instance, Patient, Series, Study
from ..index.query import (
    MODELS,
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_UNABLE_TO_PROCESS,
    UNIQUE_KEYS,
    QueryError,
)

__all__ = ["RetrieveError", "RetrieveMatch", "RetrieveRequest", "find_retrieve_matches",
           "parse_retrieve_identifier", "resolve"]

#: Index column holding each level's unique key.
_KEY_COLUMNS = {"PATIENT": Patient.patient_id, "STUDY": Study.study_instance_uid,
                "SERIES": Series.series_instance_uid, "IMAGE": Instance.sop_instance_uid}
#: SQL bound-parameter lists are split into chunks of this size (SQLite's limit is 32766, keep margin).
_IN_CHUNK = 500


class RetrieveError(QueryError):
    """An identifier that cannot be retrieved: ``status`` (A900 or C000) and ``comment`` to answer with."""


@dataclass(frozen=True, slots=True)
class RetrieveRequest:
    """A validated retrieve identifier."""

    model: str  #: "PATIENT" (Patient Root) or "STUDY" (Study Root)
    level: str  #: PATIENT, STUDY, SERIES or IMAGE
    #: unique key values by level: the retrieve level may hold several, the levels above one each
    keys: dict[str, tuple[str, ...]]
    issuer_of_patient_id: str | None = None


@dataclass(frozen=True, slots=True)
class RetrieveMatch:
    """An instance to send."""

    sop_instance_uid: str
    sop_class_uid: str
    received_syntax: str  #: the transfer syntax it arrived in


def _values(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    """The values of a string element, empty when absent or zero-length."""
    if keyword not in identifier:
        return ()
    try:
        value = identifier[keyword].value
    except Exception as exc:  # undecodable bytes, bad VR …
        raise RetrieveError(STATUS_IDENTIFIER_MISMATCH, f"Unreadable {keyword}") from exc
    if value is None or value == "":
        return ()
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    items = value.split("\\") if isinstance(value, str) else [str(v) for v in value]
    return tuple(item.strip(" \0") for item in items if item.strip(" \0"))


def parse_retrieve_identifier(identifier: Dataset, model: str) -> RetrieveRequest:
    """Validate a retrieve identifier of the Patient Root (``model="PATIENT"``) or Study Root model."""
    if model not in MODELS:
        raise RetrieveError(STATUS_IDENTIFIER_MISMATCH, f"Unknown information model {model!r}")
    levels = MODELS[model]
    raw_level = _values(identifier, "QueryRetrieveLevel")
    if not raw_level:
        raise RetrieveError(STATUS_IDENTIFIER_MISMATCH, "QueryRetrieveLevel is missing")
    level = raw_level[0].upper()
    if len(raw_level) != 1 or level not in levels:
        raise RetrieveError(STATUS_IDENTIFIER_MISMATCH, f"Bad QueryRetrieveLevel {level[:16]!r} for this model")
    keys: dict[str, tuple[str, ...]] = {}
    for key_level in levels[: levels.index(level) + 1]:
        keyword = UNIQUE_KEYS[key_level]
        values = _values(identifier, keyword)
        if key_level == level:
            if not values:
                raise RetrieveError(STATUS_IDENTIFIER_MISMATCH, f"{keyword} missing at {level} level")
        elif len(values) > 1:
            raise RetrieveError(STATUS_IDENTIFIER_MISMATCH, f"{keyword} must be one value above {level}")
        elif not values:
            continue  # tolerated: some SCUs send only the retrieve level's key
        if any("*" in v or "?" in v for v in values):
            raise RetrieveError(STATUS_IDENTIFIER_MISMATCH, f"Wildcards not allowed in {keyword}")
        if keyword != "PatientID" and not all(is_valid_uid(v) for v in values):
            raise RetrieveError(STATUS_IDENTIFIER_MISMATCH, f"Invalid UID in {keyword}")
        keys[key_level] = tuple(dict.fromkeys(values))  # drop repeats, keep order
    issuer = _values(identifier, "IssuerOfPatientID") if "PATIENT" in keys else ()
    return RetrieveRequest(model, level, keys, issuer[0] if issuer else None)


def _chunks(values: Sequence[str]) -> list[Sequence[str]]:
    return [values[i : i + _IN_CHUNK] for i in range(0, len(values), _IN_CHUNK)] or [values]


def resolve(index: Index, request: RetrieveRequest) -> list[RetrieveMatch]:
    """The matching instances, ordered by patient, study, series number, instance number and UID."""
    level_values = request.keys[request.level]
    matches: dict[str, RetrieveMatch] = {}
    try:
        with index.session() as session:
            for chunk in _chunks(level_values):
                statement = (
                    select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid)
                    .join(Series, Instance.series_pk == Series.id)
                    .join(Study, Series.study_pk == Study.id)
                    .join(Patient, Study.patient_pk == Patient.id)
                    .where(_KEY_COLUMNS[request.level].in_(chunk))
                )
                for key_level, values in request.keys.items():
                    if key_level != request.level:
                        statement = statement.where(_KEY_COLUMNS[key_level] == values[0])
                if request.issuer_of_patient_id is not None:
                    statement = statement.where(Patient.issuer_of_patient_id == request.issuer_of_patient_id)
                statement = statement.order_by(Patient.id, Study.id, Series.series_number, Series.id,
                                               Instance.instance_number, Instance.sop_instance_uid)
                for uid, sop_class, syntax in session.execute(statement):
                    matches.setdefault(uid, RetrieveMatch(uid, sop_class, syntax))
    except RetrieveError:
        raise
    except Exception as exc:  # database unavailable, …: the SCU gets "unable to process"
        raise RetrieveError(STATUS_UNABLE_TO_PROCESS, f"Index error: {type(exc).__name__}") from exc
    return list(matches.values())


def find_retrieve_matches(index: Index, identifier: Dataset, model: str) -> list[RetrieveMatch]:
    """Validate ``identifier`` and resolve it (raises :class:`RetrieveError`)."""
    return resolve(index, parse_retrieve_identifier(identifier, model))

