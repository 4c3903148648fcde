"""Errors that say what happened, and keep version 1's built-in bases and texts."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest

from agentmesh import (
    Agent,
    AgentMeshError,
    ConfigurationError,
    LocalHub,
    NoHubError,
    PayloadError,
    PeerNotFoundError,
)


def test_unknown_peer_is_a_typed_value_error_with_version_1_text(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    with pytest.raises(PeerNotFoundError, match="Peer 'nobody' not found on hub") as caught:
        alice.send("nobody", text="hi")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, AgentMeshError)
    assert caught.value.peer_id == "nobody"
    with pytest.raises(ValueError, match="Peer 'nobody' not found on hub"):
        hub.get_bundle("nobody")


def test_no_hub_is_a_typed_runtime_error_with_version_1_text(agents) -> None:
    lonely = agents("lonely")
    for call in (lambda: lonely.send("bob", text="x"), lonely.list_peers):
        with pytest.raises(NoHubError, match="No hub configured") as caught:
            call()
        assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, AgentMeshError)


def test_a_payload_that_is_not_json_safe_names_the_field(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    agents("bob", hub=hub)
    with pytest.raises(PayloadError, match="'when'") as caught:
        alice.send("bob", text="at", when=datetime.datetime(2026, 12, 2))
    assert isinstance(caught.value, TypeError) and caught.value.field == "when"
    with pytest.raises(PayloadError, match="'ratio'"):
        alice.send("bob", ratio=float("nan"))
    assert alice.status()["outbox"] == 0  # refused before anything was encrypted


def test_keypair_path_that_is_a_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    before = stat.S_IMODE(folder.stat().st_mode)
    with pytest.raises(ConfigurationError, match="is a directory"):
        Agent("alice", keypair_path=folder)
    assert stat.S_IMODE(folder.stat().st_mode) == before
    assert list(folder.iterdir()) == []


def test_agent_id_is_a_plain_attribute_as_in_version_1(agents) -> None:
    worker = agents("worker-3")
    assert worker.id == worker.agent_id == "worker-3"
    assert f"[{worker.id}] completed" == "[worker-3] completed"
