"""Deploying a hub as an operator does: the real ``alembic`` and ``agentmesh-hub``
scripts as subprocesses, in a deploy folder or a folder with no ``alembic.ini``.

Covers the design card's bare ``alembic upgrade head`` (hub.sqlite in the
current folder), ``-x db=`` and ``AGENTMESH_DB``, ``agentmesh-hub migrate`` from
the package and from a built wheel, ``--no-migrate``, ``--version``, and the
start-up errors that must be one clear line with exit status 2.
"""

from __future__ import annotations

import importlib.util
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hubproc import ROOT
from opskit import ScriptHub, clean_env, fresh_pg_database, hub_cli, run

from agentmesh import Agent
from agentmesh.hub.store import HubStore

pytestmark = pytest.mark.timeout(180)


def head() -> str:
    with HubStore(":memory:") as store:
        return ", ".join(store.schema_revisions()[1])


def revision_of(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]
    finally:
        conn.close()


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    """A deploy folder: alembic.ini and migrations/ copied from the checkout, nothing else."""
    folder = tmp_path / "deploy"
    folder.mkdir()
    shutil.copy(ROOT / "alembic.ini", folder / "alembic.ini")
    shutil.copytree(
        ROOT / "migrations", folder / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    return folder


def test_bare_alembic_upgrade_head_migrates_hub_sqlite_which_the_hub_then_serves(
    deploy: Path,
) -> None:
    result = run("alembic", "upgrade", "head", cwd=deploy)  # no AGENTMESH_DB, no -x
    assert result.returncode == 0, result.stderr
    assert revision_of(deploy / "hub.sqlite") == [head()]
    assert "Database (default): sqlite:///hub.sqlite" in result.stderr

    # --no-migrate: the hub starts only because the database is at head already.
    hub = ScriptHub(deploy, "--no-migrate", db="hub.sqlite").start()
    try:
        with hub.client() as client:
            Agent("alice", hub=client, keypair_path=deploy / "alice.json").close()
        assert hub.query("SELECT agent_id FROM agents") == [("alice",)]
    finally:
        hub.stop()


def test_alembic_x_db_and_agentmesh_db_select_another_database(deploy: Path) -> None:
    by_x = run("alembic", "-x", "db=by-x.sqlite", "upgrade", "head", cwd=deploy)
    assert by_x.returncode == 0, by_x.stderr
    by_env = run("alembic", "upgrade", "head", cwd=deploy, AGENTMESH_DB="by-env.sqlite")
    assert by_env.returncode == 0, by_env.stderr
    # -x wins over the environment variable.
    both = run(
        "alembic", "-x", "db=sqlite:///both.sqlite", "upgrade", "head", cwd=deploy,
        AGENTMESH_DB="not-this.sqlite",
    )  # fmt: skip
    assert both.returncode == 0, both.stderr
    for name in ("by-x.sqlite", "by-env.sqlite", "both.sqlite"):
        assert revision_of(deploy / name) == [head()]
    assert not (deploy / "hub.sqlite").exists()
    assert not (deploy / "not-this.sqlite").exists()


def test_alembic_in_a_missing_folder_says_so(deploy: Path) -> None:
    result = run("alembic", "-x", "db=nowhere/hub.sqlite", "upgrade", "head", cwd=deploy)
    assert result.returncode != 0
    assert "nowhere" in result.stderr and "does not exist" in result.stderr


def test_migrate_from_the_package_without_alembic_ini(tmp_path: Path) -> None:
    assert not (tmp_path / "alembic.ini").exists()
    first = hub_cli("migrate", "--db", "hub.sqlite", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"migrated from an empty database to revision {head()} (head)" in first.stdout
    again = hub_cli("migrate", cwd=tmp_path)  # no --db: hub.sqlite as well
    assert again.returncode == 0, again.stderr
    assert "already at the current schema" in again.stdout
    by_env = hub_cli("migrate", cwd=tmp_path, AGENTMESH_DB=str(tmp_path / "env.sqlite"))
    assert by_env.returncode == 0, by_env.stderr
    assert revision_of(tmp_path / "hub.sqlite") == [head()]
    assert revision_of(tmp_path / "env.sqlite") == [head()]


def test_migrate_on_postgresql(tmp_path: Path) -> None:
    with fresh_pg_database() as url:
        result = hub_cli("migrate", "--db", url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "postgresql+psycopg://" in result.stdout and "(head)" in result.stdout
        stats = hub_cli("admin", "stats", "--db", url, cwd=tmp_path)
        assert stats.returncode == 0, stats.stderr
        assert "bound agents:" in stats.stdout


def test_migrate_from_a_built_wheel(tmp_path: Path) -> None:
    """The wheel carries the migrations (agentmesh.migrations): migrate works from it alone."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-300:]}")
    (wheel,) = wheels.glob("agentmesh-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    env = {**clean_env(), "PYTHONPATH": str(target)}
    where = tmp_path / "run"
    where.mkdir()
    probe = subprocess.run(
        [sys.executable, "-c", "import agentmesh.migrations as m; print(m.__file__)"],
        cwd=where, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert probe.stdout.startswith(str(target)), probe.stdout + probe.stderr
    result = subprocess.run(
        [sys.executable, "-m", "agentmesh.hub_server", "migrate", "--db", "hub.sqlite"],
        cwd=where, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert revision_of(where / "hub.sqlite") == [head()]


def test_no_migrate_refuses_a_database_not_at_head(tmp_path: Path) -> None:
    # A database at no revision: migrated, then downgraded to base with alembic.
    assert hub_cli("migrate", "--db", "hub.sqlite", cwd=tmp_path).returncode == 0
    down = run("alembic", "-x", f"db={tmp_path / 'hub.sqlite'}", "downgrade", "base", cwd=ROOT)
    assert down.returncode == 0, down.stderr

    hub = ScriptHub(tmp_path, "--no-migrate", db="hub.sqlite")
    assert hub.run_to_exit() == 2
    assert "not at head" in hub.log() and "agentmesh-hub migrate" in hub.log()
    assert "Traceback" not in hub.log()
    assert revision_of(tmp_path / "hub.sqlite") == []  # untouched

    missing = ScriptHub(tmp_path, "--no-migrate", db="absent.sqlite")
    assert missing.run_to_exit() == 2
    assert "no hub database at absent.sqlite" in missing.log()
    assert not (tmp_path / "absent.sqlite").exists()

    # Without --no-migrate the same command line (subcommand-free) migrates and serves.
    hub = ScriptHub(tmp_path, "--ttl", "60", db="hub.sqlite").start()
    hub.stop()
    assert revision_of(tmp_path / "hub.sqlite") == [head()]


def test_serve_subcommand_is_the_default_command(tmp_path: Path) -> None:
    hub = ScriptHub(tmp_path, "--ping-interval", "30", db="hub.sqlite", command="serve").start()
    hub.stop()


def test_version(tmp_path: Path) -> None:
    result = hub_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("agentmesh-hub ")


def test_db_in_a_missing_directory_exits_2_and_says_so(tmp_path: Path) -> None:
    for command in (
        ["--host", "127.0.0.1", "--port", "0", "--db", "nowhere/hub.sqlite"],
        ["migrate", "--db", "nowhere/hub.sqlite"],
        ["admin", "stats", "--db", "nowhere/hub.sqlite"],
    ):
        result = hub_cli(*command, cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        assert "the directory nowhere of the hub database" in result.stderr, result.stderr
        assert "does not exist" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_postgresql_url_without_its_driver_exits_2_naming_the_package(tmp_path: Path) -> None:
    if importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed here")
    url = "postgresql+pg8000://postgres@127.0.0.1:5432/test"
    for command in (["--host", "127.0.0.1", "--port", "0", "--db", url], ["migrate", "--db", url]):
        result = hub_cli(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert 'pip install "agentmesh[postgres]"' in result.stderr
        assert "pg8000" in result.stderr and "Traceback" not in result.stderr


def test_psycopg_missing_exits_2_naming_the_extra(tmp_path: Path) -> None:
    """psycopg made unimportable (a shadowing module), as on a machine without the extra."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "psycopg.py").write_text("raise ImportError('No module named psycopg')\n")
    env = clean_env()
    env["PYTHONPATH"] = f"{shadow}:{env['PYTHONPATH']}"
    result = subprocess.run(
        [sys.executable, "-m", "agentmesh.hub_server", "--host", "127.0.0.1", "--port", "0",
         "--db", "postgresql+psycopg://postgres@127.0.0.1:5432/test"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "psycopg 3" in result.stderr and 'pip install "agentmesh[postgres]"' in result.stderr
    assert "Traceback" not in result.stderr
