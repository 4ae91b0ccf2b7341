"""Logging for the node: one stream on stderr, pynetdicom and Alembic kept quiet unless DEBUG."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s [{process}] %(name)s: %(message)s"


def configure_logging(level: str, process: str = "main") -> None:
    """Log ``level`` and above to stderr (a service manager collects it, e.g. journald), each line tagged
    with the node's ``process`` (``main``, a worker ``w1``, ``w2``…, ``compress``): all of them share the
    stream.

    pynetdicom logs every PDU and DIMSE message at INFO/DEBUG; our own per-association and
    per-operation lines replace that, so its loggers are held at WARNING except when debugging.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(process=process)))
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Apply ``level`` to dcbnode and the matching level to pynetdicom.

    Below DEBUG pynetdicom's standard event handlers (run for every PDU and DIMSE message even when its
    logger drops their lines) are not bound to dcbnode's new associations at all
    (:func:`~.provider.drop_standard_log_handlers`, which looks at the ``pynetdicom`` logger's level).
    """
    numeric = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(numeric)
    debug = numeric <= logging.DEBUG
    logging.getLogger("pynetdicom").setLevel(numeric if debug else logging.WARNING)
    # Alembic logs its plugins and dialect at INFO whenever the schema is checked; dcbnode says what counts.
    logging.getLogger("alembic").setLevel(numeric if debug else logging.WARNING)
