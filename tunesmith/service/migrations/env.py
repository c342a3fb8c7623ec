"""Alembic environment: migrations run on the connection Store.migrate() hands over."""
from __future__ import annotations

from alembic import context

from tunesmith.service.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the service migrations through tunesmith.service.store.Store(url, data_dir).migrate()")
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
with context.begin_transaction():
    context.run_migrations()
