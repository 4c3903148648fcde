"""Fixtures of the attack suite: hub subprocesses, network clients and agents, all cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from security_helpers import HubProcess, TapHub, client_options

from agentmesh import Agent
from agentmesh.hub.client import NetworkHub


@pytest.fixture(scope="session")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One hub for the attacks that need no special limits (short handshake timeout)."""
    hub = HubProcess(
        tmp_path_factory.mktemp("shared-hub"),
        "--handshake-timeout",
        "2",
        "--max-envelope-bytes",
        "65536",
    ).start()
    yield hub
    hub.stop()


@pytest.fixture
def start_hub(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """``start_hub(*flags, port=0, log_level="INFO")``: a dedicated hub for this test."""
    hubs: list[HubProcess] = []

    def start(*args: str, **kwargs: Any) -> HubProcess:
        hub = HubProcess(tmp_path / f"hub{len(hubs)}", *args, **kwargs).start()
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.stop()


@pytest.fixture
def net() -> Iterator[Callable[..., NetworkHub]]:
    """``net(hub_process, tap=False, **options)``: a NetworkHub closed after the test."""
    made: list[NetworkHub] = []

    def make(hub: HubProcess, *, tap: bool = False, **options: Any) -> NetworkHub:
        cls = TapHub if tap else NetworkHub
        client = cls("127.0.0.1", hub.port, **client_options(options))
        made.append(client)
        return client

    yield make
    for client in reversed(made):
        client.close()


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
