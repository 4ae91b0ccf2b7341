"""Logging for the node: one stream on stderr, pynetdicom kept quiet unless DEBUG."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Log ``level`` and above to stderr (a service manager collects it, e.g. journald).

    pynetdicom logs every PDU and DIMSE message at INFO/DEBUG; our own per-association and
    per-operation lines replace that, so its loggers are held at WARNING except when debugging.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Apply ``level`` to dcbnode and the matching level to pynetdicom."""
    numeric = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(numeric)
    logging.getLogger("pynetdicom").setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
