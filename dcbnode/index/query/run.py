"""Running a C-FIND query: rows streamed in batches, derived attributes per batch, one response per match."""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset

from ..database import Index
from .derived import derived_values, first_instances
from .keys import STATUS_OUT_OF_RESOURCES, Query, QueryError
from .response import HeaderReader, ResponsePlan, build_response
from .sql import build_select, derived_needed

_FETCH_BATCH = 200


def run_query(index: Index, query: Query, *, retrieve_ae_title: str = "", limit: int = 0,
              header_reader: HeaderReader | None = None) -> Iterator[Dataset]:
    """One response identifier per matching entity, streamed in batches as rows are fetched.

    Rows come from one Core SELECT (plain tuples, no ORM objects); for each batch of
    :data:`_FETCH_BATCH` rows, derived attributes (counts, ModalitiesInStudy, SOPClassesInStudy) take one
    grouped query per level they describe, and the first instance of each entity (for header keys) one more.

    ``limit`` > 0: raise :class:`QueryError` (0xA700) when more entities than that match, after
    yielding ``limit`` of them.  ``header_reader(sop_instance_uid)`` returns a stored header dataset for
    attributes the index lacks (empty values without it).
    """
    stmt, names = build_select(query, index.engine.dialect.name)
    headers = bool(query.header_keys) and header_reader is not None
    plan = ResponsePlan(query, names, retrieve_ae_title, headers)
    needed = derived_needed(query)
    owner_index = {owner: names.index(f"_{owner}_pk") for owner in needed}
    sop_index = names.index("_sop") if "_sop" in names else None
    count = 0
    with index.engine.connect() as conn:
        # PATIENT and STUDY matches can be a whole table: stream them (a server-side cursor on PostgreSQL);
        # SERIES and IMAGE matches are one study's or series' worth, fetched in one go (fewer round trips).
        # The per-batch look-ups below always use plain client-side cursors.
        streamed = {"stream_results": True, "yield_per": _FETCH_BATCH} if query.level in ("PATIENT", "STUDY") else {}
        result = conn.execute(stmt, execution_options=streamed)  # type: ignore[arg-type]
        for rows in result.partitions(_FETCH_BATCH):
            derived = {owner: derived_values(conn, owner, needed[owner], list({row[i] for row in rows}))
                       for owner, i in owner_index.items()}
            first: dict[int, str] = {}
            if headers and sop_index is None:
                first = first_instances(conn, query.level, [row[0] for row in rows])
            for row in rows:
                if limit and count >= limit:
                    raise QueryError(STATUS_OUT_OF_RESOURCES, f"More than {limit} matches: refine the query")
                count += 1
                header = None
                if headers:
                    sop = row[sop_index] if sop_index is not None else first.get(row[0])
                    header = header_reader(sop) if sop else None  # type: ignore[misc]
                yield build_response(plan, row, derived, header)
