"""NetworkHub pointed at something that is not a hub fails within connect_timeout, saying so."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from agentmesh import Agent, HubUnavailableError
from agentmesh.hub.client import NetworkHub

pytestmark = pytest.mark.timeout(60)


def _server(behaviour: str) -> Iterator[int]:
    """A TCP server on loopback that accepts and then stays silent, or closes at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if behaviour == "close":
                conn.close()
            else:
                held.append(conn)  # a database that waits for its client to speak first

    thread = threading.Thread(target=serve, name="not-a-hub", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    yield from _server("silent")


@pytest.fixture
def closing_port() -> Iterator[int]:
    yield from _server("close")


def test_a_silent_service_is_named_as_not_a_hub(silent_port: int) -> None:
    hub = NetworkHub("127.0.0.1", silent_port, connect_timeout=0.5)
    try:
        with pytest.raises(
            HubUnavailableError, match=r"sent no AgentMesh HELLO within 0\.5 s"
        ) as e:
            Agent("alice", hub=hub)
        assert "needs tls=" in str(e.value)
    finally:
        hub.close()


def test_a_service_that_hangs_up_is_named_as_not_a_hub(closing_port: int) -> None:
    hub = NetworkHub("127.0.0.1", closing_port, connect_timeout=2.0)
    try:
        with pytest.raises(HubUnavailableError, match="closed the connection before any AgentMesh"):
            Agent("alice", hub=hub)
    finally:
        hub.close()
