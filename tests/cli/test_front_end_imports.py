"""The front ends stay on top: ``import agentmesh`` loads neither click nor the MCP
SDK, and the command line loads the MCP SDK only for ``agentmesh mcp``."""

from __future__ import annotations

import json
import subprocess
import sys


def _top_level_modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {m.split(".")[0] for m in json.loads(out.splitlines()[-1])} | set(
        json.loads(out.splitlines()[-1])
    )


def test_import_agentmesh_loads_no_click_and_no_mcp() -> None:
    loaded = _top_level_modules_after("import agentmesh\nagentmesh.Agent\nagentmesh.AsyncAgent")
    assert "click" not in loaded and "mcp" not in loaded
    assert "agentmesh.cli" not in loaded


def test_the_command_line_loads_the_mcp_sdk_only_for_agentmesh_mcp() -> None:
    loaded = _top_level_modules_after("import agentmesh.cli")
    assert "click" in loaded and "mcp" not in loaded
