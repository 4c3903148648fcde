"""Test-suite root. Its presence puts ``tests/`` on ``sys.path``, so shared
support modules such as ``hubproc`` and ``agentkit`` import by name from every
test folder. The fixtures here serve every folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentmesh import Agent


@pytest.fixture
def agents() -> Iterator[Callable[..., Agent]]:
    """``agents(agent_id, *args, cls=Agent, **kwargs)``: Agents closed after the test."""
    made: list[Agent] = []

    def make(agent_id: str, *args: Any, cls: type[Agent] = Agent, **kwargs: Any) -> Agent:
        agent = cls(agent_id, *args, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in reversed(made):
        agent.close()


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.mkdir()
    return path
