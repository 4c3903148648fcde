"""Fixtures for the Agent / LocalHub / agent-state tests (``keydir`` and ``agents``
come from ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_helpers import RecordingHub
from hubproc import HubProcess

from agentmesh import Agent


@pytest.fixture
def make_agent(agents: Callable[..., Agent]) -> Callable[..., Agent]:
    """``make_agent(agent_id, **kwargs)``: an Agent that is closed after the test."""
    return agents


@pytest.fixture
def hub() -> Iterator[RecordingHub]:
    h = RecordingHub()
    yield h
    h.close()


@pytest.fixture
def hub_process(tmp_path: Path) -> Iterator[HubProcess]:
    """A hub subprocess on a fresh SQLite file, stopped (SIGTERM) after the test."""
    hub = HubProcess(tmp_path / "hub", graceful_stop=True).start()
    yield hub
    hub.stop()
