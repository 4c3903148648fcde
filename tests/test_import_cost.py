"""``import agentmesh`` loads the agent side only: an agent is not a hub."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_agentmesh_loads_no_hub_sqlalchemy_or_alembic() -> None:
    loaded = _modules_after("import agentmesh")
    assert not {m for m in loaded if m.split(".")[0] in ("sqlalchemy", "alembic")}
    assert not {m for m in loaded if m.startswith("agentmesh.hub")}


def test_the_hubs_load_on_first_use() -> None:
    loaded = _modules_after("import agentmesh\nagentmesh.LocalHub")
    assert "agentmesh.hub.local" in loaded and "sqlalchemy" in loaded


def test_import_agentmesh_loads_no_front_end_click_or_mcp() -> None:
    loaded = _modules_after("import agentmesh\nagentmesh.Agent\nagentmesh.AsyncAgent")
    assert not {m for m in loaded if m.split(".")[0] in ("click", "mcp")}
    assert not {m for m in loaded if m.startswith("agentmesh.cli")}


def test_the_command_line_loads_the_mcp_sdk_only_for_agentmesh_mcp() -> None:
    loaded = _modules_after("import agentmesh.cli")
    assert "click" in loaded and "mcp" not in loaded
