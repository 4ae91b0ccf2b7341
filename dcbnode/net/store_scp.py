"""The C-STORE SCP: received datasets go into the archive, outcomes become PS3.4 B.2.3 statuses.

Success (0000) is answered only after :meth:`Archive.store` returned, i.e. after the record was fsynced
into its volume and the index committed: an acknowledged instance survives a crash.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
import time
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.events import Event
from sqlalchemy.exc import DBAPIError

from ..archive import DuplicateInstanceError, StoreOutcome
from ..dcbs import (
    InvalidDatasetError,
    UndecodablePixelDataError,
    UnsupportedTransferSyntaxError,
    VolumeFullError,
    is_valid_uid,
)
from ..dcbs.file_meta import received_file_meta
from ..index.database import reason
from .access import operation_refusal
from .context import NodeContext

log = logging.getLogger("dcbnode.store")

SUCCESS: Final = 0x0000
#: PS3.4 Table B.2-1 "Refused: Out of Resources" — the sender may retry later.
OUT_OF_RESOURCES: Final = 0xA700
#: "Error: Data Set does not match SOP Class": missing or invalid attributes.
DATASET_MISMATCH: Final = 0xA900
#: "Error: Cannot understand" (Cxxx, low bits ours). CD0x keeps clear of the C0xx-C6xx values
#: pynetdicom uses for its own failures, and next to config.DUPLICATE_STATUS["reject"] (0xCD01).
CANNOT_UNDERSTAND: Final = 0xCD02
INTERNAL_ERROR: Final = 0xCD03
#: Error Comment of a failure whose cause only the log can tell.
_SEE_LOG: Final = "internal error in the archive; the node's log has the details"
#: Error Comment is LO: at most 64 characters (PS3.5 Table 6.2-1).
_COMMENT_MAX: Final = 64


class InFlight:
    """Counts C-STOREs being processed, so a graceful stop can wait for them to finish; once closed, no
    new one may begin."""

    def __init__(self) -> None:
        self._count = 0
        self._closed = False
        self._idle = threading.Condition()

    @property
    def count(self) -> int:
        """C-STOREs in progress now."""
        with self._idle:
            return self._count

    def begin(self) -> bool:
        """Count one more C-STORE; False (nothing counted) once :meth:`close` was called."""
        with self._idle:
            if self._closed:
                return False
            self._count += 1
            return True

    def end(self) -> None:
        """One C-STORE is done."""
        with self._idle:
            self._count -= 1
            if not self._count:
                self._idle.notify_all()

    def close(self) -> None:
        """Refuse every C-STORE that has not begun yet."""
        with self._idle:
            self._closed = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no C-STORE is in progress; False if ``timeout`` expired first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


def status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE response status, with an Error Comment cut to its 64-character limit."""
    ds = Dataset()
    ds.Status = code
    if comment:
        # LO forbids backslash and control characters.
        clean = "".join(ch if " " <= ch <= "~" and ch != "\\" else " " for ch in comment)
        ds.ErrorComment = clean[:_COMMENT_MAX]
    return ds


def handle_store(event: Event, context: NodeContext, in_flight: InFlight) -> Dataset | int:
    """``evt.EVT_C_STORE`` handler: store the dataset, answer with the status of the outcome."""
    started = time.perf_counter()
    request = event.request
    requested_uid = str(request.AffectedSOPInstanceUID or "").strip("\0 ")
    syntax = UID(event.context.transfer_syntax)
    calling_aet = event.assoc.requestor.ae_title.strip()
    if not in_flight.begin():
        result = status(OUT_OF_RESOURCES, "the node is stopping; retry later")
    else:
        try:
            result = _store(event, context, requested_uid, syntax, calling_aet)
        finally:
            in_flight.end()
    elapsed_ms = (time.perf_counter() - started) * 1000
    code = result if isinstance(result, int) else int(result.Status)
    level = logging.INFO if code == 0 else logging.WARNING
    if log.isEnabledFor(level):
        log.log(level, "C-STORE from %s: %s %s [%s] status 0x%04X%s %.1f ms", calling_aet,
                _sop_class_name(str(request.AffectedSOPClassUID or "")), requested_uid, syntax.name, code,
                f" ({result.ErrorComment})" if isinstance(result, Dataset) and "ErrorComment" in result else "",
                elapsed_ms)
    stats = getattr(event.assoc, "dcbnode_stats", None)
    if stats is not None:
        stats.count(code)
    return result


def _store(event: Event, context: NodeContext, requested_uid: str, syntax: UID, calling_aet: str) -> Dataset | int:
    """Everything that can fail, turned into a status (an int for Success, a Dataset with an Error Comment
    otherwise); never raises (an exception would end in pynetdicom's generic 0xC211 without a useful
    comment)."""
    archive = context.archive
    config = context.config  # read once: SIGHUP may swap it
    refused = operation_refusal(event, context, "store")
    if refused is not None:
        return refused
    try:
        if not (is_valid_uid(requested_uid) and is_valid_uid(str(event.request.AffectedSOPClassUID or ""))):
            return status(DATASET_MISMATCH, "the C-STORE request's SOP UIDs are not valid UIDs")
        # The file meta is dcbnode's own and names the sender in Source Application Entity Title
        # (PS3.10 7.1), which pynetdicom leaves out; recovery re-indexes the source AE from it.
        request = event.request
        file_meta = received_file_meta(str(request.AffectedSOPClassUID), requested_uid, syntax, calling_aet)
        stored = archive.store(request.DataSet.getbuffer(), file_meta=file_meta, source_ae_title=calling_aet,
                               transfer_syntax=syntax, expected_sop_instance_uid=requested_uid,
                               defer_compression=config.node.compression == "deferred")
    except (UndecodablePixelDataError, UnsupportedTransferSyntaxError) as exc:
        return status(CANNOT_UNDERSTAND, _comment(exc, requested_uid, calling_aet))
    except InvalidDatasetError as exc:
        return status(DATASET_MISMATCH, _comment(exc, requested_uid, calling_aet))
    except DuplicateInstanceError:
        return status(config.node.duplicate_status, "SOP Instance UID is already stored")
    except VolumeFullError as exc:
        log.error("volume full while storing %s: %s", requested_uid, exc)
        return status(OUT_OF_RESOURCES, "archive storage is full")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("disk full while storing %s: %s", requested_uid, exc)
            return status(OUT_OF_RESOURCES, "archive storage is full")
        log.exception("I/O error while storing %s", requested_uid)
        # strerror is the C library's text for a person ("Permission denied"); str(exc) is Python's.
        return status(INTERNAL_ERROR, f"archive I/O error: {exc.strerror}" if exc.strerror else _SEE_LOG)
    except DBAPIError as exc:  # the index database is unreachable, restarting, locked: nothing was kept
        log.error("index database unavailable while storing %s: %s", requested_uid, reason(exc))
        return status(OUT_OF_RESOURCES, "index database unavailable; retry later")
    except Exception:
        log.exception("unexpected error while storing %s", requested_uid)
        return status(INTERNAL_ERROR, _SEE_LOG)
    if stored.outcome is StoreOutcome.DUPLICATE_IGNORED:  # docs/configuration.md: keep_first warns
        log.warning("SOP Instance %s was already stored: the new copy from %s was discarded",
                    requested_uid, calling_aet)
    elif stored.outcome is StoreOutcome.REPLACED:
        log.info("SOP Instance %s was already stored: replaced by the copy from %s", requested_uid, calling_aet)
    return SUCCESS


def _comment(exc: InvalidDatasetError, requested_uid: str, calling_aet: str) -> str:
    """The Error Comment for a refused dataset: written for a person; the technical detail (a library's
    exception text) goes to the log."""
    comment = exc.comment
    if comment != exc.reason:
        log.warning("C-STORE from %s: %s refused: %s", calling_aet, requested_uid, exc.reason)
    return comment


@functools.lru_cache(maxsize=256)
def _sop_class_name(uid: str) -> str:
    """The SOP class's name for log lines (the UID if pydicom does not know it)."""
    return UID(uid).name or uid
