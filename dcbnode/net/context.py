"""What every DIMSE handler needs: configuration, archive and logger, shared by the node."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..archive import Archive
from ..config import Config

if TYPE_CHECKING:
    from .rebuild_pool import RebuildPool


@dataclass
class NodeContext:
    """Handed to each handler as its extra argument (pynetdicom ``evt_handlers`` args).

    ``config`` may be swapped by SIGHUP (peers and access only); read it once per operation.
    """

    config: Config
    archive: Archive
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("dcbnode"))
    #: helper processes that rebuild retrieved instances (None: the retrieve's own thread does)
    rebuilds: RebuildPool | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reload(self, fresh: Config) -> None:
        """Take [peers] and [access] from a freshly loaded configuration."""
        with self.lock:
            self.config = self.config.with_peers_and_access_from(fresh)
