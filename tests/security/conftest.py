"""Fixtures of the attack suite: hub subprocesses and network clients, all cleaned up.

``agents`` and ``keydir`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hubproc import HubProcess
from security_helpers import TapHub

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
        graceful_stop=True,
    ).start()
    yield hub
    hub.stop()


@pytest.fixture
def start_hub(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """``start_hub(*flags, port=0, log_level="INFO")``: a dedicated hub for this test,
    stopped with SIGTERM (a clean shutdown) by ``hub.stop()`` and after the test."""
    hubs: list[HubProcess] = []

    def start(*args: str, **kwargs: Any) -> HubProcess:
        hub = HubProcess(tmp_path / f"hub{len(hubs)}", *args, graceful_stop=True, **kwargs)
        hubs.append(hub.start())
        return hub

    yield start
    for hub in hubs:
        hub.stop()


@pytest.fixture
def net() -> Iterator[Callable[..., NetworkHub]]:
    """``net(hub_process, tap=False, **options)``: a NetworkHub closed after the test."""
    made: list[NetworkHub] = []

    def make(hub: HubProcess, *, tap: bool = False, **options: Any) -> NetworkHub:
        options.setdefault("request_timeout", 10.0)
        client = hub.client(TapHub if tap else NetworkHub, **options)
        made.append(client)
        return client

    yield make
    for client in reversed(made):
        client.close()
