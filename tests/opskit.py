"""Test support for the operator's commands: the installed ``agentmesh-hub`` and
``alembic`` scripts run as subprocesses, a hub started by that script, a fresh
PostgreSQL database, and a plain HTTP GET.

Importable by name from every test folder (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from hubproc import ROOT, HubProcess
from pgschema import PG_URL, require_pg
from sqlalchemy import create_engine, make_url, text

BIN = Path(sys.executable).parent
METRICS_LISTENING = re.compile(r"metrics listening on 127\.0\.0\.1:(\d+)")


def script(name: str) -> list[str]:
    """The console script ``name`` of this environment (``pip install -e .`` makes it)."""
    path = BIN / name
    if path.exists():
        return [str(path)]
    module = {"agentmesh-hub": "agentmesh.hub_server", "alembic": "alembic"}[name]
    return [sys.executable, "-m", module]  # a source tree run without installing


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without AGENTMESH_DB, plus ``extra``; the source tree importable."""
    env = {k: v for k, v in os.environ.items() if k != "AGENTMESH_DB"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run(
    name: str, *args: str, cwd: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a console script to its end in ``cwd``; stdout and stderr captured as text."""
    return subprocess.run(
        [*script(name), *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def hub_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run("agentmesh-hub", *args, cwd=cwd, **env)


class ScriptHub(HubProcess):
    """:class:`HubProcess` started as the installed ``agentmesh-hub`` script, in ``workdir``.

    ``db`` is passed as given (relative to ``workdir``, or a URL); ``db=None``
    passes no ``--db``. ``command`` (e.g. ``"serve"``) goes before the options.
    """

    def __init__(
        self,
        workdir: Path,
        *args: str,
        db: str | None = "hub.sqlite",
        command: str | None = None,
        **env: str,
    ) -> None:
        super().__init__(workdir, *args, db=None, **env)
        self.db_arg = db
        self.subcommand = [command] if command else []
        if db is not None and "://" not in db:
            self.db = workdir / db  # what HubProcess.query reads

    def _command(self) -> list[str]:
        cmd = [*script("agentmesh-hub"), *self.subcommand]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--log-level", self.log_level, *self.args]
        if self.db_arg is not None:
            cmd += ["--db", self.db_arg]
        return cmd

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                self._command(),
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=clean_env(**self.env),
                cwd=self.workdir,
            )

    @property
    def metrics_port(self) -> int:
        found = METRICS_LISTENING.findall(self.log())
        assert found, f"no metrics port in the log:\n{self.log()}"
        return int(found[-1])


def http_get(port: int, path: str) -> tuple[int, str]:
    """``(status, body)`` of ``GET http://127.0.0.1:port/path``."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def metric(body: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, as written) in a /metrics body."""
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics:\n{body}")


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """Yield the URL of a new, empty PostgreSQL database; drop it (forcibly) afterwards."""
    require_pg()
    name = f"am_ops_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        drop_pg_database(name)
        admin.dispose()


def drop_pg_database(name: str) -> None:
    """Drop a database, terminating its connections; no error if it is gone."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
