"""Alembic migrations of the index schema, one module per revision in ``versions/``.

Run by :mod:`dcbnode.index.schema` (``dcbnode-admin upgrade``), never through an ``alembic.ini``.
How to add one: docs/deployment.md, "Schema migrations (developers)".
"""
