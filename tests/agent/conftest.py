"""Fixtures for the Agent / LocalHub / agent-state tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import RecordingHub

from agentmesh import Agent


@pytest.fixture
def make_agent() -> Iterator[Callable[..., Agent]]:
    """``make_agent(agent_id, **kwargs)``: an Agent that is closed after the test."""
    created: list[Agent] = []

    def factory(agent_id: str, *args: Any, **kwargs: Any) -> Agent:
        agent = Agent(agent_id, *args, **kwargs)
        created.append(agent)
        return agent

    yield factory
    for agent in reversed(created):
        agent.close()


@pytest.fixture
def hub() -> Iterator[RecordingHub]:
    h = RecordingHub()
    yield h
    h.close()


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    return d
