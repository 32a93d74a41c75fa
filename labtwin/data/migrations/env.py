"""Alembic's entry point: labtwin passes in the connection (and its open transaction) to migrate."""

from __future__ import annotations

from alembic import context

from labtwin.data.engine import make_engine, parse_url
from labtwin.data.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # the alembic command line, for a developer: -x store=URL
    store = context.get_x_argument(as_dictionary=True).get("store")
    if not store:
        raise SystemExit("alembic here needs -x store=URL (labtwin.data.migrate does this for you)")
    engine = make_engine(parse_url(store))
    with engine.begin() as own:
        context.configure(connection=own, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
else:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
