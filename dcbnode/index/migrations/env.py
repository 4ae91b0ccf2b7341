"""Alembic environment: migrations run on the connection :mod:`dcbnode.index.schema` passes in
``config.attributes["connection"]`` (there is no ``alembic.ini`` and no URL here)."""

from alembic import context

from dcbnode.index.models import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead, and
# autogenerate writes migrations that work on SQLite and PostgreSQL alike.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
