"""C-FIND on the index (PS3.4 C.2.2, C.4.1), one module per job.

No network code here.  :func:`parse_identifier` (:mod:`.parse`) turns an identifier into a
:class:`Query` (:mod:`.keys`), or raises :class:`QueryError` with the failure status and Error Comment to
answer; :func:`build_select` (:mod:`.sql`) makes its SQL; :func:`run_query` (:mod:`.run`) streams one
response dataset per matching entity, with derived attributes computed per batch (:mod:`.derived`) and
the responses built by :mod:`.response`.
"""

from .keys import (
    INDEX_KEYS,
    LEVELS,
    MODELS,
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_UNABLE_TO_PROCESS,
    UNIQUE_KEYS,
    Match,
    Query,
    QueryError,
    level_of,
)
from .parse import parse_identifier
from .response import HeaderReader
from .run import run_query
from .sql import build_select

__all__ = ["INDEX_KEYS", "LEVELS", "MODELS", "STATUS_IDENTIFIER_MISMATCH", "STATUS_OUT_OF_RESOURCES",
           "STATUS_UNABLE_TO_PROCESS", "UNIQUE_KEYS", "HeaderReader", "Match", "Query", "QueryError",
           "build_select", "level_of", "parse_identifier", "run_query"]
