"""Tests of the Alembic migrations (migrations/, shipped as agentmesh.migrations).

The command line runs as a subprocess from the repository root, the way an
operator runs it; HubStore.ensure_schema runs the same scripts programmatically.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pgschema import fresh_pg_schema
from sqlalchemy import create_engine, inspect, text

from agentmesh.errors import AuthFailedError, ConfigurationError
from agentmesh.hub import models
from agentmesh.hub.store import HubStore, migrations_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
HUB_TABLES = {"agents", "one_time_prekeys", "envelopes", "mailboxes", "agent_leases"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.sqlite'}"
        return
    with fresh_pg_schema() as url:
        yield url


def alembic_cli(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "AGENTMESH_DB": db}
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", "alembic.ini", *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def stamp(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            conn.execute(text("INSERT INTO alembic_version VALUES (:rev)"), {"rev": revision})
    finally:
        engine.dispose()


def test_migrations_are_packaged_with_a_single_head() -> None:
    directory = migrations_dir()
    assert (directory / "env.py").is_file()
    assert (directory / "script.py.mako").is_file()
    assert (directory / "__init__.py").is_file()
    assert (directory / "versions" / "__init__.py").is_file()
    script = ScriptDirectory(str(directory))
    heads = script.get_heads()
    assert len(heads) == 1, heads
    # One straight line from 0001: every revision but the first has exactly one parent.
    chain = list(script.walk_revisions())
    assert chain[-1].revision == "0001"
    assert all(isinstance(rev.down_revision, str) for rev in chain[:-1])


def test_cli_upgrade_and_downgrade(db_url: str) -> None:
    up = alembic_cli(db_url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert tables(db_url) >= HUB_TABLES | {"alembic_version"}
    current = alembic_cli(db_url, "current")
    assert current.returncode == 0, current.stderr
    [head] = ScriptDirectory(str(migrations_dir())).get_heads()
    assert f"{head} (head)" in current.stdout

    with HubStore(db_url) as hub:
        hub.check_revision()  # the CLI and the store agree on head
        assert hub.bind_agent("alice", bytes(32), 1) is True

    down = alembic_cli(db_url, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert not tables(db_url) & HUB_TABLES


def test_0002_keeps_existing_bindings_permanent(db_url: str) -> None:
    """A hub upgraded from 0001 keeps every binding it had as a permanent one."""
    assert alembic_cli(db_url, "upgrade", "0001").returncode == 0
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO agents (agent_id, signing_key, created_at_ms, updated_at_ms, "
                    "last_seen_ms) VALUES ('old', :key, 1, 1, 1)"
                ),
                {"key": bytes(range(32))},
            )
    finally:
        engine.dispose()
    up = alembic_cli(db_url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    with HubStore(db_url) as hub:
        with pytest.raises(AuthFailedError):  # permanent: never taken over
            hub.bind_agent("old", bytes(32), 2, ephemeral=True, holder_live=False)


def test_cli_accepts_a_plain_path(tmp_path: Path) -> None:
    path = tmp_path / "plain.sqlite"
    result = alembic_cli(str(path), "upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert tables(f"sqlite:///{path}") >= HUB_TABLES


def test_cli_without_database_setting_migrates_hub_sqlite_in_the_current_folder(
    tmp_path: Path,
) -> None:
    """The checkout's alembic.ini, run from another folder: hub.sqlite there."""
    environment = {k: v for k, v in os.environ.items() if k != "AGENTMESH_DB"}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert tables(f"sqlite:///{tmp_path / 'hub.sqlite'}") >= HUB_TABLES
    assert not (REPO_ROOT / "hub.sqlite").exists()


def test_ensure_schema_creates_and_is_idempotent(db_url: str) -> None:
    with HubStore(db_url) as hub:
        with pytest.raises(ConfigurationError, match="not at head"):
            hub.check_revision()
        hub.ensure_schema()
        hub.check_revision()
        hub.bind_agent("alice", bytes(32), 1)
        hub.ensure_schema()  # at head: nothing happens
        hub.migrate()
        assert hub.list_agents() == ["alice"]
    assert tables(db_url) >= HUB_TABLES | {"alembic_version"}


def test_ensure_schema_upgrades_after_downgrade(db_url: str) -> None:
    assert alembic_cli(db_url, "upgrade", "head").returncode == 0
    assert alembic_cli(db_url, "downgrade", "base").returncode == 0
    with HubStore(db_url) as hub:
        hub.ensure_schema()
        hub.check_revision()


def test_unknown_revision_is_refused(db_url: str) -> None:
    stamp(db_url, "ffff_from_the_future")
    with HubStore(db_url) as hub:
        for call in (hub.ensure_schema, hub.check_revision, hub.migrate):
            with pytest.raises(ConfigurationError) as info:
                call()
            message = str(info.value)
            assert "ffff_from_the_future" in message
            assert "does not know" in message and "upgrade AgentMesh" in message
    assert not tables(db_url) & HUB_TABLES  # nothing was created


def test_tables_without_version_are_refused(db_url: str) -> None:
    engine = create_engine(db_url)
    models.metadata.create_all(engine)
    engine.dispose()
    with HubStore(db_url) as hub, pytest.raises(ConfigurationError, match="alembic stamp"):
        hub.ensure_schema()


def test_concurrent_start_ups_migrate_once(db_url: str) -> None:
    hubs = [HubStore(db_url) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(hubs))

    def start(hub: HubStore) -> None:
        try:
            barrier.wait()
            hub.ensure_schema()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(hub,)) for hub in hubs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert not errors, errors
        hubs[0].check_revision()
    finally:
        for hub in hubs:
            hub.close()


def test_migrated_schema_matches_models(db_url: str) -> None:
    with HubStore(db_url) as hub:
        hub.ensure_schema()
        with hub.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(context, models.metadata)
    assert diffs == []


def test_sqlite_seq_column_is_a_rowid_alias_with_autoincrement(tmp_path: Path) -> None:
    with HubStore(str(tmp_path / "hub.sqlite")) as hub:
        hub.ensure_schema()
        with hub.engine.connect() as conn:
            sql = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'envelopes'"
            ).scalar_one()
    assert "seq INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT" in sql
