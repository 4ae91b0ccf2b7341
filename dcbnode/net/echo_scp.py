"""The Verification SCP (C-ECHO)."""

from __future__ import annotations

import logging

from pynetdicom.events import Event

log = logging.getLogger("dcbnode.echo")


def handle_echo(event: Event) -> int:
    """``evt.EVT_C_ECHO`` handler: always Success, logged like every DIMSE operation."""
    log.info("C-ECHO from %s: status 0x0000", event.assoc.requestor.ae_title.strip())
    return 0x0000
