"""Which abstract syntaxes the node accepts for storage, and how pynetdicom is told to serve them.

* :data:`STORAGE_SOP_CLASSES`: every Storage SOP Class of the standard, retired ones included — the union
  of pynetdicom's storage registry (``AllStoragePresentationContexts``) and the SOP classes in pydicom's
  UID dictionary whose name says "Storage" (which brings in the retired ones pynetdicom leaves out, e.g.
  Ultrasound Image Storage (Retired) ``1.2.840.10008.5.1.4.1.1.6``), less the two that are not C-STORE
  targets (Storage Commitment, Media Storage Directory).  docs/conformance-statement.md lists them;
  ``tests/test_sop_classes.py`` checks that the list there is this one.
* Private (and other unknown) abstract syntaxes proposed by a peer are accepted for storage too, unless
  ``[storage] accept_unknown_sop_classes = false``: :class:`UnknownStorageClasses` adds a presentation
  context for each one to the association being negotiated (``evt.EVT_REQUESTED``, when pynetdicom has
  the peer's A-ASSOCIATE-RQ and has not yet negotiated; ``ServiceUser.supported_contexts`` is writeable
  then).

pynetdicom dispatches a request by the SOP class's service class and aborts the association for a UID
it does not know; :func:`pynetdicom.sop_class.register_uid` is its documented way to serve "a private,
retired or otherwise unknown SOP Class UID" with the Storage Service Class, and is used for each such
UID before its first C-STORE can arrive.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Final

from pydicom.uid import UID, UID_dictionary
from pynetdicom import AE, AllStoragePresentationContexts, register_uid
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from ..dcbs import is_valid_uid

__all__ = ["STORAGE_SOP_CLASSES", "UnknownStorageClasses", "add_storage_contexts"]

log = logging.getLogger("dcbnode.negotiation")

#: Named "… Storage" in the UID dictionary but not a C-STORE target.
_NOT_STORAGE: Final = frozenset({
    "1.2.840.10008.1.20.1",  # Storage Commitment Push Model SOP Class
    "1.2.840.10008.1.20.2",  # Storage Commitment Pull Model SOP Class (Retired)
    "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR: media only)
})
_STORAGE_WORD = re.compile(r"\bStorage\b")
#: Private SOP classes registered with pynetdicom per process at most: a peer proposes at most 128
#: per association, and the registry is never emptied, so a limit bounds what peers can make it hold.
MAX_REGISTERED_UNKNOWN = 10_000


def _storage_sop_classes() -> tuple[UID, ...]:
    uids = {str(context.abstract_syntax) for context in AllStoragePresentationContexts}
    uids.update(uid for uid, (name, kind, *_) in UID_dictionary.items()
                if kind == "SOP Class" and _STORAGE_WORD.search(name) and uid not in _NOT_STORAGE)
    return tuple(UID(uid) for uid in sorted(uids, key=lambda uid: [int(part) for part in uid.split(".")]))


#: Every Storage SOP Class accepted, in numeric UID order.
STORAGE_SOP_CLASSES: Final[tuple[UID, ...]] = _storage_sop_classes()

_registry_lock = threading.Lock()
_registered_unknown: set[str] = set()


def _serve_as_storage(uid: str) -> bool:
    """Make pynetdicom dispatch C-STOREs of ``uid`` to the Storage Service Class; False when the limit
    of :data:`MAX_REGISTERED_UNKNOWN` private classes is reached."""
    with _registry_lock:
        if uid_to_service_class(uid) is not ServiceClass:
            return True  # already served (a registered class, or a known non-storage one)
        if len(_registered_unknown) >= MAX_REGISTERED_UNKNOWN:
            return False
        register_uid(uid, "DcbnodeStorage_" + uid.replace(".", "_"), StorageServiceClass)
        _registered_unknown.add(uid)
        return True


def _storage_context(uid: str, syntaxes: Sequence[str]) -> PresentationContext:
    # scu_role/scp_role=True: accept a C-GET requestor's proposal to act as Storage SCP on the
    # association, so C-GET can send the instances back over it.
    context = build_context(uid, list(syntaxes))
    context.scu_role = True
    context.scp_role = True
    return context


def add_storage_contexts(ae: AE, syntaxes: Sequence[str]) -> None:
    """Support every :data:`STORAGE_SOP_CLASSES` in ``syntaxes`` (SCP, and SCU for C-GET) on ``ae``."""
    for uid in STORAGE_SOP_CLASSES:
        _serve_as_storage(uid)
        ae.add_supported_context(uid, list(syntaxes), scu_role=True, scp_role=True)


class UnknownStorageClasses:
    """``evt.EVT_REQUESTED`` handler: accept, for storage, abstract syntaxes pydicom does not know.

    Only UIDs absent from pydicom's UID dictionary are taken (a vendor's private SOP class): a known
    SOP class the node does not serve (e.g. Modality Worklist) stays rejected.
    """

    def __init__(self, syntaxes: Sequence[str]) -> None:
        self.syntaxes = list(syntaxes)

    def __call__(self, event: Event) -> None:
        acceptor = event.assoc.acceptor
        primitive = event.assoc.requestor.primitive
        if primitive is None:
            return
        calling = str(primitive.calling_ae_title).strip()
        supported = acceptor.supported_contexts
        known = {str(context.abstract_syntax) for context in supported}
        added = []
        for proposed in primitive.presentation_context_definition_list:
            uid = str(proposed.abstract_syntax or "")
            if uid in known or uid in UID_dictionary or not is_valid_uid(uid):
                continue
            known.add(uid)
            if not _serve_as_storage(uid):
                log.warning("private SOP class %s from %s refused: %d private classes registered already",
                            uid, calling, MAX_REGISTERED_UNKNOWN)
                continue
            added.append(_storage_context(uid, self.syntaxes))
        if added:
            log.info("accepting private SOP class(es) %s from %s for storage",
                     ", ".join(str(context.abstract_syntax) for context in added), calling)
            acceptor.supported_contexts = [*supported, *added]
