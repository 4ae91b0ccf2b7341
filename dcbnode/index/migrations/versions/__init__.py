"""The revisions, one module each, named ``NNNN_what.py`` (Alembic skips this file)."""
