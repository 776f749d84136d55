"""Alembic's entry point for the history's migrations: run on the connection flowyml hands it.

flowyml upgrades a history database itself when it opens one whose schema
is older (``flowyml.history.database``); nobody needs to run ``alembic``.
A developer who adds a migration can still use the ``alembic`` command with
``-x url=...`` (see ``docs/monitoring.md``).
"""

from __future__ import annotations

from alembic import context

# flowyml's own version table (flowyml.history.database.VERSION_TABLE): the
# history may share a database with software that also uses Alembic.

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # the alembic command line: connect to -x url=...
    import sqlalchemy as sa

    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:////path/history.db upgrade head")
    with sa.create_engine(url).connect() as own:
        context.configure(connection=own, render_as_batch=own.dialect.name == "sqlite",
                          version_table="flowyml_alembic_version")
        with context.begin_transaction():
            context.run_migrations()
        own.commit()
else:
    # SQLite alters tables by copying them: "batch" mode does that for later migrations.
    context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite",
                      version_table="flowyml_alembic_version")
    context.run_migrations()
