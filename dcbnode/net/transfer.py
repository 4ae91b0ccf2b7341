"""Sending stored instances over an association: which transfer syntax, and the bytes, one at a time.

Per instance the form is the first of :func:`~dcbnode.dcbs.available_syntaxes` that the peer accepted for
its SOP class, in the order ``[retrieve] syntax_preference`` gives (by default the syntax it was received
in, then HTJ2K spliced without decoding, then Explicit, then Implicit VR Little Endian).  The rebuilt
bytes go out as they are: an :class:`EncodedDataset` carries them through ``send_c_store`` of dcbnode's
associations (:mod:`.provider`), which hand them over instead of re-encoding with pydicom, and send each
message with one socket write.

An instance that cannot be sent (no accepted form, unreadable record, vanished peer) becomes an
:class:`EncodedDataset` without bytes: pynetdicom's ``send_c_store`` then fails for it, which counts it
as a failed sub-operation and lists its UID, and the other instances continue.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from pydicom.uid import HTJ2K, UID, ExplicitVRLittleEndian, HTJ2KLossless, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext, build_context

from ..archive import Archive
from ..archive.retrieve import RetrieveMatch
from ..config import DEFAULT_SYNTAX_PREFERENCE
from ..dcbs import DcbsError, UnavailableSyntaxError, available_syntaxes, rebuild
from ..dcbs.record import InstanceMeta
from .wire import EncodedDataset

if TYPE_CHECKING:
    from .rebuild_pool import RebuildPool, RebuildSession

__all__ = ["LOCATION_BATCH", "MAX_CONTEXTS", "EncodedDataset", "accepted_storage_syntaxes", "choose_syntax", "prepare",
           "prepared_instances", "storage_contexts"]

log = logging.getLogger("dcbnode.retrieve")

#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1–255.
MAX_CONTEXTS = 128
#: What a sub-association proposes for every SOP class, in the order contexts are kept when the
#: 128-context limit forces a choice (Explicit VR LE first: every instance can be rebuilt in it).
_PROPOSAL_ORDER = (ExplicitVRLittleEndian, HTJ2KLossless, None, ImplicitVRLittleEndian, HTJ2K)
_BASE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, HTJ2KLossless, HTJ2K})
_PREFERENCE_NAMES = {HTJ2KLossless: "htj2k", HTJ2K: "htj2k", ExplicitVRLittleEndian: "explicit",
                     ImplicitVRLittleEndian: "implicit"}
#: Instances whose locations one index query asks for while rebuilding (kept well below SQL IN limits).
LOCATION_BATCH = 64


# -- choosing the form ------------------------------------------------------------------------------------


def _original_syntax(received: str) -> UID | None:
    """The received syntax when the base syntaxes leave it out (every instance can be rebuilt in the
    syntax it was received in: kept codestreams, a lossless re-encoding, Big Endian, Deflated)."""
    syntax = UID(received)
    return None if syntax in _BASE_SYNTAXES else syntax


def preferred_order(candidates: Sequence[UID], received: str,
                    preference: Sequence[str] = DEFAULT_SYNTAX_PREFERENCE) -> list[UID]:
    """``candidates`` (an instance's available syntaxes, cheapest first) ordered by ``preference``, the
    ``[retrieve] syntax_preference`` names: "original" (the syntax the instance was received in, unless
    Explicit or Implicit VR Little Endian), "htj2k", "explicit", "implicit"; syntaxes it does not rank
    come last, cheapest first."""
    def rank(syntax: UID) -> int:
        if syntax == received and syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            name = "original"
        else:
            name = _PREFERENCE_NAMES.get(syntax, "")
        return preference.index(name) if name in preference else len(preference)

    return sorted(candidates, key=rank)


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


def prepare(archive: Archive, match: RetrieveMatch, accepted: Mapping[str, frozenset[str]],
            location: tuple[str, int] | None = None,
            preference: Sequence[str] = DEFAULT_SYNTAX_PREFERENCE) -> EncodedDataset:
    """Rebuild one instance in the accepted form ``preference`` ranks first (:func:`preferred_order`);
    never raises (failures become placeholders).

    ``location``: where the index said the instance is (:meth:`Archive.instance_locations`), if known.
    """
    syntaxes = accepted.get(match.sop_class_uid, frozenset())

    def failed(reason: str) -> EncodedDataset:
        log.warning("cannot send %s: %s", match.sop_instance_uid, reason)
        return EncodedDataset(match.sop_class_uid, match.sop_instance_uid, ExplicitVRLittleEndian, None, reason)

    if not syntaxes:
        return failed(f"peer accepted no context for SOP class {match.sop_class_uid}")
    try:
        with archive.open_instance(match.sop_instance_uid, location) as stored:
            candidates = preferred_order(available_syntaxes(stored.meta), stored.meta.received_syntax, preference)
            while True:
                syntax = choose_syntax(candidates, syntaxes)
                if syntax is None:
                    return failed(_why_unavailable(stored.meta, syntaxes))
                try:
                    rebuilt = rebuild(stored.meta, stored.blobs, stored.frame, syntax)
                    break
                except UnavailableSyntaxError as exc:  # e.g. a frame not yet compressed that HTJ2K cannot hold
                    log.info("%s; trying the next accepted syntax", exc)
                    candidates.remove(syntax)
    except KeyError:
        return failed("no longer in the archive")
    except (DcbsError, OSError, ValueError) as exc:
        log.exception("rebuilding %s failed", match.sop_instance_uid)
        return failed(f"{type(exc).__name__}: {exc}")
    return EncodedDataset(match.sop_class_uid, match.sop_instance_uid, rebuilt.transfer_syntax, rebuilt.dataset)


def _why_unavailable(meta: InstanceMeta, accepted: frozenset[str]) -> str:
    """Why none of the accepted syntaxes can carry the instance, for the log and the failure."""
    offered = ", ".join(sorted(UID(syntax).name for syntax in accepted))
    if meta.image is not None and not meta.image.decodable:
        return (f"pixel data kept as received in {UID(meta.received_syntax).name} (no decoder reads it); "
                f"the peer accepted only {offered}")
    return f"cannot be rebuilt in any accepted transfer syntax ({offered})"


def prepared_instances(archive: Archive, matches: Sequence[RetrieveMatch],
                       accepted: Mapping[str, frozenset[str]], *, alive: Callable[[], bool] = lambda: True,
                       lookahead: int = 2,
                       preference: Sequence[str] = DEFAULT_SYNTAX_PREFERENCE,
                       rebuilds: RebuildPool | None = None) -> Iterator[EncodedDataset]:
    """The instances rebuilt in order, up to ``lookahead`` (≥ 1) of them ahead.

    Rebuilding the next instances overlaps sending the current one: in a helper process of ``rebuilds``
    (outside this process's GIL; the requests are sent ahead and the replies read in order, see
    :class:`~.rebuild_pool.RebuildSession`), else — no helper idle yet — in a worker thread (decoding
    releases the GIL), asking the pool again for each next instance.  At most ``lookahead + 1`` rebuilt
    instances are held.  Once ``alive()`` is false (the receiving association is gone) the remaining
    instances become placeholders without being read, and an instance rebuilt before is replaced by
    one: ``send_c_store`` fails a placeholder at once, before sending anything, so no sub-operation
    waits for a reply from a peer that has gone.

    The index is asked where the instances are :data:`LOCATION_BATCH` at a time (one query instead of one
    per instance, ~1 ms each with SQLite); an instance deleted after its batch was looked up is still
    sent while its record can be read.
    """
    locations = _Locations(archive, matches)
    session: RebuildSession | None = None
    executor: ThreadPoolExecutor | None = None
    pending: deque[Callable[[], EncodedDataset]] = deque()  # each gives the next instance, in order
    remaining = enumerate(matches)

    def submit_next() -> None:
        nonlocal session, executor
        following = next(remaining, None)
        if following is None:
            return
        position, match = following
        location = locations.take(position)
        if not alive():
            gone = _receiver_gone(match.sop_class_uid, match.sop_instance_uid)
            pending.append(lambda: gone)
            return
        if session is None and rebuilds is not None:
            session = rebuilds.session()
        if session is not None and session.request(match, accepted, location, preference):
            asked = session

            def reply() -> EncodedDataset:
                rebuilt = asked.result(match)
                return rebuilt if rebuilt is not None else prepare(archive, match, accepted, location, preference)

            pending.append(reply)
            return
        if executor is None:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcbnode-rebuild")
        pending.append(executor.submit(prepare, archive, match, accepted, location, preference).result)

    try:
        for _ in range(lookahead):
            submit_next()
        while pending:
            dataset = pending.popleft()()
            submit_next()
            if dataset.encoded is not None and not alive():  # rebuilt ahead, receiver gone since
                dataset = _receiver_gone(dataset.SOPClassUID, dataset.SOPInstanceUID)
            yield dataset
    finally:
        pending.clear()
        if session is not None:
            session.close()  # reads the replies still due
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _receiver_gone(sop_class_uid: str, sop_instance_uid: str) -> EncodedDataset:
    return EncodedDataset(sop_class_uid, sop_instance_uid, ExplicitVRLittleEndian, None,
                          "association to the receiver ended")


class _Locations:
    """Where the index says ``matches`` are, asked :data:`LOCATION_BATCH` at a time, in order."""

    def __init__(self, archive: Archive, matches: Sequence[RetrieveMatch]) -> None:
        self._archive = archive
        self._matches = matches
        self._known: dict[str, tuple[str, int]] = {}
        self._looked_up = 0  # matches[:_looked_up] have had their locations asked for

    def take(self, position: int) -> tuple[str, int] | None:
        """The location of ``matches[position]`` (positions asked in increasing order), if the index knows it."""
        if position >= self._looked_up:
            batch = self._matches[position:position + LOCATION_BATCH]
            try:
                self._known.update(self._archive.instance_locations([m.sop_instance_uid for m in batch]))
            except Exception:  # the per-instance lookup in prepare reports the problem
                log.debug("batched location lookup failed", exc_info=True)
            self._looked_up = position + len(batch)
        return self._known.pop(self._matches[position].sop_instance_uid, None)
