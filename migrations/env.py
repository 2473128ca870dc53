"""Alembic environment: runs on the connection ckptd hands over (see ckptd/store/migrate.py)."""

from __future__ import annotations

from alembic import context

from ckptd.store.tables import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - ckptd always passes a connection
    raise RuntimeError("run migrations through `ckptd db upgrade`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things; batch mode rebuilds tables
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
