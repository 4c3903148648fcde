"""Real Agents over a real hub subprocess: the version 1 API on the network hub.

Covers delivery to an online agent, store-and-forward to an offline agent
across a hub SIGKILL, and an agent and the hub both restarting in the middle
of a conversation. Waits are bounded polls; nothing asserts a timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentkit import Inbox, alice_and_bob
from hubproc import HubProcess, wait_until

from agentmesh import Agent, NetworkHub

pytestmark = pytest.mark.timeout(120)


def _restart(hub: HubProcess) -> None:
    hub.kill()
    hub.start()


def test_online_delivery_and_v1_surface(hub_process: HubProcess, tmp_path: Path) -> None:
    with hub_process.client() as client:
        alice, bob, inbox = alice_and_bob(client, tmp_path)
        for i in range(20):
            alice.send("bob", text=f"m{i}", seq=i)
        wait_until(lambda: len(inbox.texts) == 20)
        assert inbox.texts == [f"m{i}" for i in range(20)]
        assert inbox[0].payload["seq"] == 0 and inbox[0].signed
        assert alice.list_peers() == ["bob"]
        assert client.get_bundle("bob")["agent_id"] == "bob"
        with pytest.raises(ValueError, match="Peer 'nobody' not found on hub"):
            alice.send("nobody", text="?")
        alice.close()
        bob.close()


def test_offline_agent_gets_everything_after_a_hub_kill(
    hub_process: HubProcess, tmp_path: Path
) -> None:
    with hub_process.client() as client:
        alice = Agent("alice", hub=client, keypair_path=tmp_path / "alice.json")
        Agent("bob", hub=client, keypair_path=tmp_path / "bob.json").close()
        for i in range(30):
            alice.send("bob", text=f"queued-{i}")  # acked: committed on the hub
        assert client.queued_count() == 30
        _restart(hub_process)
        with hub_process.client() as client2:
            bob = Agent("bob", hub=client2, keypair_path=tmp_path / "bob.json")
            inbox = Inbox()
            bob.on_message(inbox)
            wait_until(lambda: len(inbox.texts) == 30)
            assert inbox.texts == [f"queued-{i}" for i in range(30)]
            wait_until(lambda: client2.queued_count() == 0)
            bob.close()
        alice.close()


def test_agent_and_hub_both_restart_mid_conversation(
    hub_process: HubProcess, tmp_path: Path
) -> None:
    keys = {name: tmp_path / f"{name}.json" for name in ("alice", "bob")}
    client: Any = hub_process.client()
    alice = Agent("alice", hub=client, keypair_path=keys["alice"])
    bob = Agent("bob", hub=client, keypair_path=keys["bob"])
    bob_inbox, alice_inbox = Inbox(), Inbox()
    bob.on_message(bob_inbox)
    alice.on_message(alice_inbox)
    alice.send("bob", text="one")
    wait_until(lambda: bob_inbox.texts == ["one"])
    bob.send("alice", text="two")
    wait_until(lambda: alice_inbox.texts == ["two"])

    bob.close()  # bob goes away ...
    _restart(hub_process)  # ... and the hub is killed and restarted
    # alice's client reconnects by itself; sends made while it is down stay in her outbox
    for text in ("three", "four"):
        alice.send("bob", text=text)
    wait_until(lambda: client.queued_count() == 2 and alice.status()["outbox"] == 0)

    client_b = hub_process.client()
    bob = Agent("bob", hub=client_b, keypair_path=keys["bob"])
    bob_inbox = Inbox()
    bob.on_message(bob_inbox)
    wait_until(lambda: bob_inbox.texts == ["three", "four"])
    bob.send("alice", text="five")  # the ratchet goes on across both restarts
    wait_until(lambda: alice_inbox.texts == ["two", "five"])
    for agent in (alice, bob):
        agent.close()
    client.close()
    client_b.close()


def test_sends_while_the_hub_is_down_are_flushed_on_reconnect(
    hub_process: HubProcess, tmp_path: Path
) -> None:
    with hub_process.client() as client:
        alice, bob, inbox = alice_and_bob(client, tmp_path)
        alice.send("bob", text="before")
        wait_until(lambda: inbox.texts == ["before"])
        hub_process.kill()
        for i in range(5):
            alice.send("bob", text=f"down-{i}")  # returns: safely in alice's outbox
        assert alice.status()["outbox"] == 5
        hub_process.start()
        wait_until(lambda: inbox.texts == ["before"] + [f"down-{i}" for i in range(5)])
        wait_until(lambda: alice.status()["outbox"] == 0)
        alice.close()
        bob.close()


def test_network_hub_is_exported_lazily() -> None:
    import agentmesh

    assert agentmesh.NetworkHub is NetworkHub
