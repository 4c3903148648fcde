"""Ephemeral ids (issue 12, dead end 1): an agent without a key file binds its id only
until it disconnects, so version 1's network example runs twice; an id whose agent
has a key file can still never be taken over by another key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hubproc import HubProcess

from agentmesh import Agent, LocalHub
from agentmesh.errors import AuthFailedError

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def hub(tmp_path: Path):  # type: ignore[no-untyped-def]
    process = HubProcess(tmp_path / "hub", graceful_stop=True).start()
    yield process
    process.stop()


def test_the_version_1_network_example_runs_twice(hub: HubProcess, tmp_path: Path) -> None:
    for run in (1, 2, 3):
        result = subprocess.run(
            [sys.executable, str(SCRIPTS / "v1_network_example.py"), str(hub.port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,  # a hang guard
            check=False,
        )
        assert result.returncode == 0, f"run {run}:\n{result.stderr}"
        assert result.stdout.strip() == "['Hello over the network']", f"run {run}"
        assert "identity_mismatch" not in result.stderr


def test_an_ephemeral_id_is_not_taken_while_its_agent_is_connected(hub: HubProcess) -> None:
    with hub.client() as first_hub, hub.client() as second_hub:
        first = Agent("eve-or-not", hub=first_hub)
        try:
            with pytest.raises(AuthFailedError, match="identity_mismatch"):
                Agent("eve-or-not", hub=second_hub)
        finally:
            first.close()
        # Disconnected now: the next run (a new key) may have the id.
        Agent("eve-or-not", hub=second_hub).close()


def test_a_persistent_id_is_never_taken_over(hub: HubProcess, tmp_path: Path) -> None:
    with hub.client() as client:
        Agent("alice", hub=client, keypair_path=tmp_path / "alice.json").close()
    with hub.client() as client:  # alice is disconnected; her binding stays hers
        with pytest.raises(AuthFailedError, match="identity_mismatch"):
            Agent("alice", hub=client)  # an ephemeral key
        with pytest.raises(AuthFailedError, match="identity_mismatch"):
            Agent("alice", hub=client, keypair_path=tmp_path / "other.json")


def test_a_persistent_agent_may_claim_a_released_ephemeral_id(
    hub: HubProcess, tmp_path: Path
) -> None:
    """Once claimed with a key file the id is permanent."""
    with hub.client() as client:
        Agent("bob", hub=client).close()
        Agent("bob", hub=client, keypair_path=tmp_path / "bob.json").close()
        with pytest.raises(AuthFailedError, match="identity_mismatch"):
            Agent("bob", hub=client)


def test_mail_for_the_old_key_is_dropped_when_the_id_changes_hands(
    hub: HubProcess, tmp_path: Path
) -> None:
    """What was queued for the previous key could never be opened by the new one."""
    with hub.client() as client:
        bob = Agent("bob", hub=client)
        alice = Agent("alice", hub=client, keypair_path=tmp_path / "alice.json")
        bob.close()
        alice.send("bob", text="for the first bob")
        assert hub.queued_for("bob") == 1
        got: list[str] = []
        new_bob = Agent("bob", hub=client)
        new_bob.on_message(lambda m: got.append(m.text))
        assert hub.queued_for("bob") == 0
        assert got == []
        new_bob.close()
        alice.close()


def test_local_hub_lets_an_ephemeral_agent_be_made_again() -> None:
    """In one process too: close an agent without a key file, make it again."""
    hub = LocalHub()
    first = Agent("worker", hub=hub)
    with pytest.raises(AuthFailedError):
        Agent("worker", hub=hub)  # the first is still registered
    first.close()
    again = Agent("worker", hub=hub)
    sender = Agent("boss", hub=hub)
    got: list[str] = []
    again.on_message(lambda m: got.append(m.text))
    sender.send("worker", text="hello again")
    assert got == ["hello again"]
    again.close()
    sender.close()
