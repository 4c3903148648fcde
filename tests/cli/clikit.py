"""Support for the command-line and MCP tests: ``agentmesh`` run as a subprocess
(``python -m agentmesh.cli``, with HOME in the test's folder so nothing reaches the
real ~/.agentmesh)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hubproc import ROOT, HubProcess


@dataclass
class Cli:
    """``cli("--id", "alice", "send", "bob", "hi")``: one ``agentmesh`` run."""

    home: Path
    hub: HubProcess | None
    env: dict[str, str] = field(default_factory=dict)

    def environment(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
        env["HOME"] = str(self.home)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if self.hub is not None:
            env["AGENTMESH_HUB"] = f"127.0.0.1:{self.hub.port}"
        env.update(self.env)
        env.update(extra)
        return env

    def key(self, agent_id: str) -> Path:
        """Where ``--id agent_id`` keeps its key file (the default path)."""
        return self.home / ".agentmesh" / f"{agent_id}.json"

    def __call__(
        self, *args: str, stdin: str | None = None, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentmesh.cli", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.environment(**env),
            cwd=self.home,
            timeout=timeout,
        )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``agentmesh: ...`` line a failed command writes (no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agentmesh: "), lines[0]
    return lines[0]
