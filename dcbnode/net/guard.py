"""Limits on what a peer can make the node read, wait for and hold: the network defences of
dcbnode's associations (used by the subclasses in :mod:`.provider`).

* A PDU header is checked before its body is read: a PDU type PS3.8 does not define, anything but an
  A-ASSOCIATE-RQ before the association is requested, or a length beyond :func:`pdu_length_limit` is
  refused (A-ABORT, then the connection is closed) without reading, let alone allocating, the body.
* Every read and write of the socket has a deadline (:func:`io_deadline`): a PDU must arrive, and be
  taken by the peer, within ``network_timeout`` plus the time its size takes at :data:`MIN_RATE`, and
  no single wait may exceed ``network_timeout`` — a peer that stops reading in the middle of a C-GET is
  dropped after ``network_timeout``, one trickling a byte a second by the deadline, while a large PDU
  on a slow link still gets through; before the A-ASSOCIATE-RQ the deadline is
  ``association_request_timeout`` after the connection was accepted.
"""

from __future__ import annotations

import struct
import time
from typing import Any

#: PS3.8 9.3: the seven PDU types.
PDU_TYPES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
             0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
_A_ASSOCIATE_RQ = 0x01
_P_DATA_TF = 0x04
#: The longest A-ASSOCIATE-RQ/AC accepted.  128 presentation contexts with a dozen transfer syntaxes
#: each and three 64 KiB user-identity fields take under 300 KiB; the Maximum Length a peer announces
#: covers P-DATA-TF PDUs only (PS3.8 D.1), so without this a peer could claim 4 GiB.
MAX_ASSOCIATE_PDU = 1024 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have 4 bytes after the header (PS3.8 9.3.4-9.3.8); a
#: little slack for sloppy peers, nothing that costs memory.
MAX_CONTROL_PDU = 1024
#: Length field of a PDU: 32 bits (PS3.8 9.3.1).
_MAX_LENGTH_FIELD = 0xFFFFFFFF

HEADER = struct.Struct(">BBL")


def pdu_length_limit(pdu_type: int, maximum_length: int) -> int:
    """The longest PDU of ``pdu_type`` accepted, for an association that announced ``maximum_length``
    (its Maximum Length Received, 0 = unlimited) for P-DATA-TF."""
    if pdu_type == _P_DATA_TF:
        return maximum_length or _MAX_LENGTH_FIELD
    if pdu_type in (_A_ASSOCIATE_RQ, 0x02):
        return MAX_ASSOCIATE_PDU
    return MAX_CONTROL_PDU


def header_refusal(header: bytes, awaiting_request: bool, maximum_length: int) -> str:
    """Why the PDU starting with the 6 bytes ``header`` is refused unread, or ``""`` to read it."""
    pdu_type, _, length = HEADER.unpack(header)
    name = PDU_TYPES.get(pdu_type)
    if name is None:
        return f"sent bytes that are not a DICOM PDU (type 0x{pdu_type:02X})"
    if awaiting_request and pdu_type != _A_ASSOCIATE_RQ:
        return f"sent {name} before an A-ASSOCIATE-RQ"
    limit = pdu_length_limit(pdu_type, maximum_length)
    if length > limit:
        return f"sent {name} claiming {length} bytes (more than {limit})"
    return ""


#: The largest C-FIND identifier accepted (encoded): query keys are short; a bigger one is an attack or a
#: mistake, and its value lists would become thousands of SQL parameters.
MAX_FIND_IDENTIFIER = 64 * 1024
#: The largest C-MOVE/C-GET identifier: room for some 15,000 SOP Instance UIDs in one list, under the
#: bound-parameter limits of SQLite (32,766) and PostgreSQL (65,535).
MAX_RETRIEVE_IDENTIFIER = 1024 * 1024


def oversized_identifier(request: Any, limit: int) -> str:
    """An Error Comment when ``request``'s encoded identifier is longer than ``limit`` bytes, else ``""``.
    Checked before the identifier is decoded."""
    identifier = getattr(request, "Identifier", None)
    size = identifier.getbuffer().nbytes if identifier is not None else 0
    return f"Identifier too large ({size} bytes, at most {limit})" if size > limit else ""


#: The slowest average rate at which a PDU may arrive or leave (bytes/s) once ``network_timeout`` is
#: used up: a 1 MiB PDU gets 16 s more, a peer that stops reading or trickles is dropped.
MIN_RATE = 64 * 1024


def io_deadline(assoc: Any, size: int) -> float | None:
    """The ``time.monotonic()`` by which a socket read or write of ``size`` bytes starting now must be
    done, or ``None``.

    ``network_timeout`` + ``size`` / :data:`MIN_RATE` from now; for an acceptor still waiting for its
    A-ASSOCIATE-RQ, no later than its request deadline.
    """
    seconds = getattr(assoc, "network_timeout", None)
    deadline = time.monotonic() + seconds + size / MIN_RATE if seconds else None
    request_deadline = getattr(assoc, "request_deadline", None)
    if request_deadline is not None and getattr(assoc, "awaiting_request", False):
        deadline = request_deadline if deadline is None else min(deadline, request_deadline)
    return deadline


def remaining(deadline: float | None, idle: float | None = None) -> float | None:
    """How long the next socket call may wait: the time left until ``deadline``, and no more than
    ``idle`` (``network_timeout``: a peer that sends or takes nothing for that long is gone, however
    long its PDU); ``None``: no limit.  Raises ``TimeoutError`` once the deadline has passed."""
    if deadline is None:
        return idle
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return min(left, idle) if idle else left
