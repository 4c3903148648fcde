"""Shared test support: a real ``agentmesh.hub_server`` subprocess, and polling helpers.

Importable from any test because ``tests/conftest.py`` puts this folder on
``sys.path`` (pytest's default "prepend" import mode). Waits are bounded
polls, never timing assertions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import agentmesh
from agentmesh.hub.client import NetworkHub

ROOT = Path(agentmesh.__file__).resolve().parents[1]
LISTENING = re.compile(r"hub listening on 127\.0\.0\.1:(\d+)")


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def wait_until(condition: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# --- the hub subprocess ------------------------------------------------------


class HubProcess:
    """``python -m agentmesh.hub_server`` on 127.0.0.1, logging to a file."""

    count = 0

    def __init__(self, workdir: Path, *args: str, db: str | None = "hub.sqlite", **env: str):
        self.workdir = workdir
        self.args = list(args)
        self.db = workdir / db if db else None
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        HubProcess.count += 1
        self.log_path = workdir / f"hub-{HubProcess.count}.log"

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "agentmesh.hub_server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-level", "INFO", *self.args]
        if self.db is not None:
            cmd += ["--db", str(self.db)]
        return cmd

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                self._command(), stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=self.workdir
            )

    def start(self) -> HubProcess:
        offset = len(self.log())
        self.proc = self._spawn()
        deadline = time.monotonic() + 30
        while True:
            found = LISTENING.search(self.log()[offset:])
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"hub did not start:\n{self.log()}")
            time.sleep(0.02)

    def run_to_exit(self) -> int:
        return self._spawn().wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self, **options: Any) -> NetworkHub:
        settings: dict[str, Any] = {
            "connect_timeout": 5.0,
            "ack_timeout": 10.0,
            "reconnect_initial": 0.05,
            "reconnect_max": 0.3,
        }
        settings.update(options)
        return NetworkHub("127.0.0.1", self.port, **settings)
