"""A throwaway PostgreSQL schema (or database) for tests that use PostgreSQL.

:func:`fresh_pg_schema` gives a new schema (cheap; tests that run on both
SQLite and PostgreSQL); :func:`fresh_pg_database` a whole new database, for
several hubs at once: LISTEN/NOTIFY channels are per database, so each test's
hubs hear only each other.

``AGENTMESH_TEST_PG`` overrides the server URL. Without the psycopg driver or
a reachable server, tests that ask for PostgreSQL are skipped with the reason.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, make_url, text

PG_URL = os.environ.get("AGENTMESH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@functools.cache
def pg_unavailable() -> str | None:
    """Why PostgreSQL tests cannot run here, or None if they can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "PostgreSQL tests need the psycopg driver (pip install 'psycopg[binary]')"
    engine = create_engine(PG_URL, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            pass
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}"
    finally:
        engine.dispose()
    return None


def require_pg() -> None:
    """Skip the calling test without PostgreSQL; fail it instead under
    ``AGENTMESH_REQUIRE_POSTGRES=1``, which ``.ci/run`` sets."""
    reason = pg_unavailable()
    if reason is None:
        return
    if os.environ.get("AGENTMESH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (AGENTMESH_REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


@contextmanager
def fresh_pg_schema() -> Iterator[str]:
    """Yield a URL whose search_path is a new, empty schema; drop it afterwards (or skip)."""
    require_pg()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """Yield the URL of a new, empty database; drop it afterwards (or skip)."""
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
