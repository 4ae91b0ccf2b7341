"""``dcbnode-admin commitments``: the Storage Commitment reports still to be delivered, and dropping them.

Reads and changes only the index's ``commitment_requests`` table, so it works while nodes run (on SQLite
and PostgreSQL alike): a node picks up no dropped request, and one whose report is being sent at that
very moment may still deliver it (the output says so).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from ..archive.commitment import WaitingRequest, drop_requests, duration_text, waiting_requests
from ..index import Index
from .admin_output import emit_json, table

__all__ = ["run"]


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _as_json(request: WaitingRequest, now: datetime) -> dict[str, Any]:
    return {"transaction_uid": request.transaction_uid, "calling_ae_title": request.calling_ae_title,
            "instances": request.instances, "received_at": request.received_at.isoformat() + "Z",
            "age_seconds": round(request.age(now), 1), "attempts": request.attempts,
            "last_error": request.last_error, "next_attempt_at": request.next_attempt_at.isoformat() + "Z",
            "being_sent_by": request.claimed_by}


def _next_attempt(request: WaitingRequest, now: datetime) -> str:
    if request.claimed_by is not None:
        return "sending now"
    wait = (request.next_attempt_at - now).total_seconds()
    return f"in {duration_text(wait)}" if wait > 0 else "due"


def run(args: argparse.Namespace, index: Index) -> int:
    """List the waiting requests, or drop one (``--drop``) or all (``--drop-all``); the exit status.
    ``LookupError`` (with what to do) when ``--drop`` names no waiting request."""
    now = _now()
    if not (args.drop or args.drop_all):
        waiting = waiting_requests(index)
        if args.json:
            emit_json([_as_json(request, now) for request in waiting])
            return 0
        rows = [(r.transaction_uid, r.calling_ae_title, r.instances, duration_text(r.age(now)), r.attempts,
                 _next_attempt(r, now), r.last_error or "") for r in waiting]
        print(table(["transaction UID", "AE", "instances", "age", "attempts", "next attempt", "last error"], rows))
        print(f"{len(waiting)} storage commitment report(s) waiting to be delivered")
        return 0
    dropped = drop_requests(index, None if args.drop_all else args.drop)
    if args.drop and not dropped:
        raise LookupError(f"no storage commitment request with Transaction UID {args.drop} is waiting (delivered, "
                         "given up or dropped already?); 'dcbnode-admin commitments' lists those that are")
    if args.json:
        emit_json({"dropped": [_as_json(request, now) for request in dropped]})
        return 0
    for request in dropped:
        sending = (f"; it was being sent by {request.claimed_by} at this moment, so that report may still arrive"
                   if request.claimed_by else "")
        print(f"dropped {request.transaction_uid} from {request.calling_ae_title} ({request.instances} instance(s), "
              f"waiting {duration_text(request.age(now))}, {request.attempts} attempt(s)){sending}")
    print(f"dropped {len(dropped)} storage commitment request(s): their reports will not be sent; the modality "
          "must ask again for any it still needs")
    return 0
