"""One log line per association: who, from where, how it ended, how long, what it did."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pynetdicom import evt
from pynetdicom.events import Event

log = logging.getLogger("dcbnode.association")


@dataclass
class AssociationStats:
    """Attached to each acceptor association as ``assoc.dcbnode_stats`` (pynetdicom lets objects carry
    attributes; a dict keyed by association would need its own locking and cleanup)."""

    address: str
    started: float = field(default_factory=time.monotonic)
    state: str = "connected"
    stores: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, status: int) -> None:
        """Tally one C-STORE by outcome."""
        with self.lock:
            self.stores["ok" if status == 0 else "failed"] += 1


def _stats(event: Event) -> AssociationStats:
    stats = getattr(event.assoc, "dcbnode_stats", None)
    if stats is None:
        address = event.address
        stats = AssociationStats(address=f"{address[0]}:{address[1]}")
        event.assoc.dcbnode_stats = stats
    return stats


def _on_open(event: Event) -> None:
    _stats(event)


def _on_accepted(event: Event) -> None:
    _stats(event).state = "accepted"


def _on_rejected(event: Event) -> None:
    _stats(event).state = "rejected"


def _on_aborted(event: Event) -> None:
    _stats(event).state = "aborted"


def _on_released(event: Event) -> None:
    stats = _stats(event)
    if stats.state == "accepted":
        stats.state = "released"


def _on_close(event: Event) -> None:
    stats = _stats(event)
    assoc = event.assoc
    state = "closed without association" if stats.state == "connected" else stats.state
    if state == "accepted":  # the connection ended without A-RELEASE or A-ABORT
        state = "dropped"
    seconds = time.monotonic() - stats.started
    level = logging.WARNING if state in ("rejected", "aborted", "dropped") else logging.INFO
    log.log(level, "association %s from %s@%s (called %s) after %.2f s, C-STORE ok=%d failed=%d",
            state, assoc.requestor.ae_title.strip() or "?", stats.address,
            _called_aet(assoc),
            seconds, stats.stores["ok"], stats.stores["failed"])


#: Notification handlers to bind on the server.
ASSOCIATION_HANDLERS = [
    (evt.EVT_CONN_OPEN, _on_open),
    (evt.EVT_ACCEPTED, _on_accepted),
    (evt.EVT_REJECTED, _on_rejected),
    (evt.EVT_ABORTED, _on_aborted),
    (evt.EVT_RELEASED, _on_released),
    (evt.EVT_CONN_CLOSE, _on_close),
]


def _called_aet(assoc: object) -> str:
    """The called AE title from the A-ASSOCIATE-RQ (present even when the request was rejected)."""
    primitive = getattr(getattr(assoc, "requestor", None), "primitive", None)
    called = getattr(primitive, "called_ae_title", None)
    return called.strip() if isinstance(called, str) else "?"
