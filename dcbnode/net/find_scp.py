"""The C-FIND SCP (Patient Root and Study Root): maps pynetdicom events onto :mod:`dcbnode.index.query`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from ..archive import Archive
from ..dcbs.dataset_split import parse_explicit_le
from ..index.query import STATUS_UNABLE_TO_PROCESS, QueryError, parse_identifier, run_query
from .access import operation_refusal
from .context import NodeContext
from .guard import MAX_FIND_IDENTIFIER, oversized_identifier

_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
}
PENDING, CANCEL, SUCCESS = 0xFF00, 0xFE00, 0x0000


def stored_header_reader(archive: Archive) -> Callable[[str], Dataset | None]:
    """A reader of the stored header (non-pixel attributes) of an instance, for optional keys."""

    def read(sop_instance_uid: str) -> Dataset | None:
        try:
            with archive.open_instance(sop_instance_uid) as stored:
                return parse_explicit_le(stored.blobs.header)
        except KeyError:  # deleted meanwhile
            return None

    return read


def failure(status: int, comment: str) -> Dataset:
    """A failure status dataset carrying an Error Comment."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def negotiate_extended(event: Event) -> dict[str, bytes]:
    """``evt.EVT_SOP_EXTENDED`` handler: answer the C-FIND extended negotiation (PS3.4 C.5.1.1).

    Of its fields the node supports byte 2, combined date-time matching: it is accepted (1) when proposed.
    Relational queries (byte 1), fuzzy semantic matching of names (3), timezone adjustment (4) and the
    others are answered 0, field for field as proposed.  Other SOP classes get no reply item (not
    supported).  The accepted value is what :func:`handle_find` then reads from ``assoc.acceptor``.
    """
    replies = {}
    for sop_class, proposed in (event.app_info or {}).items():
        if str(sop_class) in _MODELS and proposed:
            replies[str(sop_class)] = bytes(1 if index == 1 and flag == 1 else 0 for index, flag in enumerate(proposed))
    return replies


def _combined_datetime(event: Event, sop_class: str) -> bool:
    """Whether combined date-time matching was negotiated (extended negotiation byte 2, PS3.4 C.5.1.1)."""
    info = getattr(event.assoc.acceptor, "sop_class_extended", {}) or {}
    value = info.get(sop_class) or b""
    return len(value) > 1 and value[1] == 1


def handle_find(event: Event, context: NodeContext) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """``evt.EVT_C_FIND`` handler: one pending response per match, then Success, Cancel or a failure."""
    config = context.config  # read once: SIGHUP may swap it
    sop_class = str(event.request.AffectedSOPClassUID)
    calling = event.assoc.requestor.ae_title.strip()
    model = _MODELS.get(sop_class)
    if model is None:
        yield failure(STATUS_UNABLE_TO_PROCESS, f"Unsupported SOP class {sop_class}"), None
        return
    refused = operation_refusal(event, context, "find")
    if refused is not None:
        yield refused, None
        return
    oversized = oversized_identifier(event.request, MAX_FIND_IDENTIFIER)
    if oversized:
        yield failure(STATUS_UNABLE_TO_PROCESS, oversized), None
        return
    try:
        query = parse_identifier(event.identifier, model, config.query,
                                 combined_datetime=_combined_datetime(event, sop_class))
    except QueryError as exc:  # logged with its status and comment by the association logger
        yield failure(exc.status, exc.comment), None
        return
    except Exception as exc:  # an undecodable identifier
        context.log.info("C-FIND from %s: unreadable identifier: %s", calling, exc)
        yield failure(0xA900, "Unreadable identifier"), None
        return
    cancelled = False
    results = run_query(context.archive.index, query, retrieve_ae_title=config.node.ae_title,
                        limit=config.query.max_responses, header_reader=stored_header_reader(context.archive))
    try:
        for identifier in results:
            if event.is_cancelled:  # pynetdicom forgets the C-CANCEL once asked: remember it
                cancelled = True
                break
            yield PENDING, identifier
    except QueryError as exc:
        yield failure(exc.status, exc.comment), None
        return
    except Exception as exc:
        context.log.exception("C-FIND from %s failed", calling)
        yield failure(STATUS_UNABLE_TO_PROCESS, f"Query failed: {type(exc).__name__}"), None
        return
    finally:
        results.close()  # ends the database cursor at once on cancel
    if cancelled or event.is_cancelled:
        yield CANCEL, None
        return
    yield SUCCESS, None
