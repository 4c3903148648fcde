"""Alembic environment of the AgentMesh hub store.

Where the database comes from, first match wins:

1. ``config.attributes["connection"]``: a SQLAlchemy ``Connection`` handed over by
   the caller (``HubStore.migrate`` does this). The migrations run on it; if it
   is already inside a transaction they join it and the caller commits.
2. ``alembic -x db=URL ...``: a SQLAlchemy URL, or a plain file path meaning
   ``sqlite:///PATH``.
3. The ``AGENTMESH_DB`` environment variable (a URL or a path, as above).
4. ``sqlalchemy.url`` from ``alembic.ini`` (commented out in the shipped file).
5. ``hub.sqlite`` in the current directory: what ``agentmesh-hub --db hub.sqlite``
   (and ``agentmesh-hub`` without ``--db`` or ``AGENTMESH_DB``) opens, so a bare
   ``alembic upgrade head`` in a deploy folder migrates the hub's database.

In cases 2 to 5 the engine is built like the hub's own (same SQLite pragmas),
and all migrations run in one transaction that holds the database's write lock
(``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL). On SQLite,
foreign-key enforcement is off while migrating, because batch mode
(``render_as_batch``) rebuilds tables by copy-and-drop and a ``DROP TABLE`` with
foreign keys on would cascade deletes into the child tables.
"""

from __future__ import annotations

import logging
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, make_url

from agentmesh.errors import ConfigurationError
from agentmesh.hub.models import metadata
from agentmesh.hub.store import (
    DB_ENV_VAR,
    DEFAULT_DB,
    check_database_location,
    create_hub_engine,
    migration_transaction,
    resolve_db_url,
)

config = context.config
target_metadata = metadata
logger = logging.getLogger("alembic.env")


def _database_url() -> str:
    """The database to migrate: ``-x db=``, ``AGENTMESH_DB``, alembic.ini, ``hub.sqlite``."""
    from_x = context.get_x_argument(as_dictionary=True).get("db", "").strip()
    from_env = os.environ.get(DB_ENV_VAR, "").strip()
    from_ini = (config.get_main_option("sqlalchemy.url") or "").strip()
    if from_x:
        source, value = "-x db", from_x
    elif from_env:
        source, value = DB_ENV_VAR, from_env
    elif from_ini:
        source, value = "alembic.ini", from_ini
    else:
        source, value = "default", DEFAULT_DB
    url = resolve_db_url(value)
    check_database_location(url)  # a missing folder says so, not "unable to open"
    shown = make_url(url).render_as_string(hide_password=True)
    logger.info("Database (%s): %s", source, shown)
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    url = _database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live database."""
    given = config.attributes.get("connection")
    if given is not None:
        if not isinstance(given, Connection):
            raise ConfigurationError(
                'config.attributes["connection"] must be a sqlalchemy Connection, '
                f"not {type(given).__name__}"
            )
        _configure(given)
        with context.begin_transaction():
            context.run_migrations()
        return

    engine = create_hub_engine(_database_url())
    try:
        with migration_transaction(engine) as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


# Configure logging from the .ini only when run from the command line (and the
# file has logging sections), never when a running hub calls the migrations
# (that would reset its logging).
if (
    config.config_file_name is not None
    and "connection" not in config.attributes
    and config.file_config.has_section("loggers")
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
