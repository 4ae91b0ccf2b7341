"""Sending stored instances over an association: which transfer syntax, and the bytes, one at a time.

Per instance the form is the first of :func:`~dcbnode.dcbs.available_syntaxes` (HTJ2K spliced without
decoding, then the original lossy codestream, then Explicit, then Implicit VR Little Endian) that the peer
accepted for its SOP class.  The rebuilt bytes go out as they are: an :class:`EncodedDataset` carries them
through pynetdicom's C-STORE (``Association.send_c_store``) and :func:`install_encode_hook` makes
pynetdicom's ``encode`` hand them over instead of re-encoding with pydicom.  Re-parsing the bytes into a
pydicom dataset instead costs 2.5–3 ms per 512² CT instance, more than the HTJ2K rebuild itself.

An instance that cannot be sent (no accepted form, unreadable record, vanished peer) becomes an
:class:`EncodedDataset` without bytes: pynetdicom's ``send_c_store`` then fails for it, which counts it
as a failed sub-operation and lists its UID, and the other instances continue.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import pynetdicom
import pynetdicom.association
import pynetdicom.dsutils
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import HTJ2K, UID, ExplicitVRLittleEndian, HTJ2KLossless, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext, build_context

from ..archive import Archive
from ..archive.retrieve import RetrieveMatch
from ..dcbs import DcbsError, available_syntaxes, rebuild

__all__ = ["MAX_CONTEXTS", "EncodedDataset", "accepted_storage_syntaxes", "choose_syntax",
           "install_encode_hook", "prepare", "prepared_instances", "storage_contexts"]

log = logging.getLogger("dcbnode.retrieve")

#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1–255.
MAX_CONTEXTS = 128
#: What a sub-association proposes for every SOP class, in the order contexts are kept when the
#: 128-context limit forces a choice (Explicit VR LE first: every instance can be rebuilt in it).
_PROPOSAL_ORDER = (ExplicitVRLittleEndian, HTJ2KLossless, None, ImplicitVRLittleEndian, HTJ2K)
_BASE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, HTJ2KLossless, HTJ2K})


class EncodedDataset(Dataset):
    """An instance already encoded in ``transfer_syntax``, for ``send_c_store`` to send unchanged.

    It holds only SOP Class/Instance UID and the file meta Transfer Syntax UID that pynetdicom reads to
    pick the presentation context; ``encoded`` is ``None`` for an instance that must fail.
    """

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                 encoded: bytes | None, reason: str = "") -> None:
        super().__init__()
        syntax = UID(transfer_syntax)
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = syntax
        self.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian)
        self._encoded = encoded
        self._reason = reason

    @property
    def encoded(self) -> bytes | None:
        """The dataset bytes, or ``None`` when this instance is a failure placeholder."""
        return self._encoded

    @property
    def reason(self) -> str:
        """Why the instance cannot be sent (placeholders only)."""
        return self._reason

    def encoded_as(self, is_implicit_vr: bool, is_little_endian: bool, deflated: bool) -> bytes | None:
        """The bytes if they are in the requested encoding, else ``None`` (pynetdicom: encode failed)."""
        syntax = UID(self.file_meta.TransferSyntaxUID)
        if (is_implicit_vr, is_little_endian, deflated) != (syntax.is_implicit_VR, syntax.is_little_endian,
                                                            syntax.is_deflated):
            return None
        return self._encoded


# -- the one pynetdicom internal we rely on ----------------------------------------------------------------
#
# Why a hook: a C-GET / C-MOVE handler must yield a pydicom ``Dataset`` per sub-operation (pynetdicom's
# QR service class counts anything else as failed: "Received invalid dataset from callback"), and
# ``Association.send_c_store`` then encodes it with ``pynetdicom.association.encode`` (=
# ``pynetdicom.dsutils.encode``, i.e. pydicom's ``write_dataset``).  pynetdicom's supported way to send
# pre-encoded bytes, ``_config.STORE_SEND_CHUNKED_DATASET`` with ``send_c_store(path)``, only applies when
# the application calls ``send_c_store`` itself with a file path, never to handler yields.  The supported
# alternative, yielding the bytes re-parsed into a pydicom Dataset, costs ~5.5 ms (HTJ2K) to ~7 ms
# (native) per 512² CT instance to re-parse and re-encode, more than the whole send (see
# docs/performance.md, "Retrieve: C-GET rate and memory").  So the name ``send_c_store`` looks up is
# replaced by a function that returns an :class:`EncodedDataset`'s bytes and delegates everything else
# to pynetdicom's own ``encode``, unchanged.
#
# Checked against pynetdicom 3.0.4 (send_c_store: ``bytestream = encode(dataset, ...)``).  The import
# of this module fails loudly (ImportError) if that is no longer how pynetdicom encodes a C-STORE data
# set, instead of letting an EncodedDataset (which holds no elements but UIDs) be sent as an empty
# instance.

_original_encode = pynetdicom.dsutils.encode


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    if isinstance(ds, EncodedDataset):
        return ds.encoded_as(is_implicit_vr, is_little_endian, deflated)
    return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)


def install_encode_hook() -> None:
    """Let ``Association.send_c_store`` send :class:`EncodedDataset` bytes unchanged (idempotent).

    Every other dataset still goes through pynetdicom's own ``encode``.  Raises ``ImportError`` if this
    pynetdicom does not encode C-STORE datasets through the module-level name
    ``pynetdicom.association.encode`` (the hook would then silently not apply, and an EncodedDataset
    must never reach pydicom's writer).
    """
    current = getattr(pynetdicom.association, "encode", None)
    if current is _encode:
        return
    code = getattr(getattr(pynetdicom.association.Association, "send_c_store", None), "__code__", None)
    if current is not _original_encode or code is None or "encode" not in code.co_names:
        raise ImportError(f"pynetdicom {pynetdicom.__version__}: Association.send_c_store does not encode "
                          "through pynetdicom.association.encode; dcbnode.net.transfer was checked against "
                          "pynetdicom 3.0.4 and needs updating")
    pynetdicom.association.encode = _encode


# -- choosing the form ------------------------------------------------------------------------------------


def _original_syntax(received: str) -> UID | None:
    """The received syntax when it may have been kept as is (an encapsulated syntax we do not transcode
    into, i.e. lossy or otherwise kept codestreams)."""
    syntax = UID(received)
    if syntax in _BASE_SYNTAXES or not syntax.is_encapsulated:
        return None
    return syntax


def storage_contexts(matches: Iterable[RetrieveMatch]) -> list[PresentationContext]:
    """Presentation contexts for a C-MOVE sub-association: one per (SOP class, transfer syntax).

    Every class gets HTJ2K Lossless, HTJ2K, Explicit and Implicit VR LE, plus the received syntax of its
    instances that arrived lossy.  Beyond 128 contexts the least useful pairs are left out, round by
    round (HTJ2K lossy-allowed first, then Implicit, …), so every class keeps Explicit VR LE while it fits.
    """
    per_class: dict[str, list[UID]] = {}
    for match in matches:
        originals = per_class.setdefault(match.sop_class_uid, [])
        original = _original_syntax(match.received_syntax)
        if original is not None and original not in originals:
            originals.append(original)
    pairs: list[tuple[str, UID]] = []
    for syntax in _PROPOSAL_ORDER:
        for sop_class, originals in per_class.items():
            pairs.extend((sop_class, s) for s in (originals if syntax is None else [syntax]))
    if len(pairs) > MAX_CONTEXTS:
        log.warning("retrieve needs %d presentation contexts for %d SOP classes; proposing the first %d",
                    len(pairs), len(per_class), MAX_CONTEXTS)
        pairs = pairs[:MAX_CONTEXTS]
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


def accepted_storage_syntaxes(contexts: Iterable[PresentationContext]) -> dict[str, frozenset[str]]:
    """Per SOP class, the transfer syntaxes of accepted contexts in which we may send (we are SCU)."""
    accepted: dict[str, set[str]] = {}
    for context in contexts:
        if context.as_scu and context.transfer_syntax:
            accepted.setdefault(str(context.abstract_syntax), set()).add(str(context.transfer_syntax[0]))
    return {sop_class: frozenset(syntaxes) for sop_class, syntaxes in accepted.items()}


def choose_syntax(candidates: Sequence[UID], accepted: frozenset[str]) -> UID | None:
    """The first of ``candidates`` (cheapest first) the peer accepted, or ``None``."""
    return next((syntax for syntax in candidates if syntax in accepted), None)


# -- rebuilding, one instance at a time --------------------------------------------------------------------


def prepare(archive: Archive, match: RetrieveMatch, accepted: Mapping[str, frozenset[str]]) -> EncodedDataset:
    """Rebuild one instance in the best accepted form; never raises (failures become placeholders)."""
    syntaxes = accepted.get(match.sop_class_uid, frozenset())

    def failed(reason: str) -> EncodedDataset:
        log.warning("cannot send %s: %s", match.sop_instance_uid, reason)
        return EncodedDataset(match.sop_class_uid, match.sop_instance_uid, ExplicitVRLittleEndian, None, reason)

    if not syntaxes:
        return failed(f"peer accepted no context for SOP class {match.sop_class_uid}")
    try:
        with archive.open_instance(match.sop_instance_uid) as stored:
            syntax = choose_syntax(available_syntaxes(stored.meta), syntaxes)
            if syntax is None:
                return failed(f"no accepted transfer syntax among {sorted(syntaxes)}")
            rebuilt = rebuild(stored.meta, stored.blobs, stored.frame, syntax)
    except KeyError:
        return failed("no longer in the archive")
    except (DcbsError, OSError, ValueError) as exc:
        log.exception("rebuilding %s failed", match.sop_instance_uid)
        return failed(f"{type(exc).__name__}: {exc}")
    return EncodedDataset(match.sop_class_uid, match.sop_instance_uid, rebuilt.transfer_syntax, rebuilt.dataset)


def prepared_instances(archive: Archive, matches: Sequence[RetrieveMatch],
                       accepted: Mapping[str, frozenset[str]], *, alive: Callable[[], bool] = lambda: True,
                       lookahead: int = 2) -> Iterator[EncodedDataset]:
    """The instances rebuilt in order, ``lookahead`` of them ahead in a worker thread.

    Rebuilding the next instance overlaps sending the current one (decoding releases the GIL); at most
    ``lookahead + 1`` rebuilt instances are held.  Once ``alive()`` is false (the receiving association
    is gone) the remaining instances become placeholders without being read, and an instance rebuilt
    before is replaced by one: ``send_c_store`` fails a placeholder at once, before sending anything, so
    no sub-operation waits for a reply from a peer that has gone.
    """

    def one(match: RetrieveMatch) -> EncodedDataset:
        if not alive():
            return EncodedDataset(match.sop_class_uid, match.sop_instance_uid, ExplicitVRLittleEndian, None,
                                  "association to the receiver ended")
        return prepare(archive, match, accepted)

    if lookahead <= 0:
        yield from (one(match) for match in matches)
        return
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcbnode-rebuild")
    pending: deque[Future[EncodedDataset]] = deque()
    remaining = iter(matches)
    try:
        for match in remaining:
            pending.append(executor.submit(one, match))
            if len(pending) > lookahead:
                break
        while pending:
            dataset = pending.popleft().result()
            following = next(remaining, None)
            if following is not None:
                pending.append(executor.submit(one, following))
            if dataset.encoded is not None and not alive():  # rebuilt ahead, receiver gone since
                dataset = EncodedDataset(dataset.SOPClassUID, dataset.SOPInstanceUID, ExplicitVRLittleEndian,
                                         None, "association to the receiver ended")
            yield dataset
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


install_encode_hook()
