"""A lost key (issue 12, dead end 1): the operator releases the id, the agent registers
again with a new key, and its peers, which pinned the old key, get IdentityChangedError
naming both fingerprints; ``trust(peer, new_fingerprint)`` then works and mail flows.

The sender learns of the change from the recipient: a message sealed for the old key
cannot be opened by the new one, so the new agent answers with a session notice (a
control message in a fresh session), which carries its new identity."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentkit import Inbox
from hubproc import HubProcess, wait_until
from opskit import hub_cli

from agentmesh import Agent, LocalHub
from agentmesh.errors import AuthFailedError, IdentityChangedError
from agentmesh.state import state_path_for


def lose_key(keydir: Path, name: str) -> None:
    """The key file and the state beside it are gone (a lost disk)."""
    (keydir / f"{name}.json").unlink()
    for path in keydir.glob(state_path_for(keydir / f"{name}.json").name + "*"):
        path.unlink()


def test_unbind_reregister_trust_deliver_on_local_hub(keydir: Path) -> None:
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    to_alice, to_bob = Inbox(), Inbox()
    alice.on_message(to_alice)
    bob.on_message(to_bob)
    bob.send("alice", "hi")
    alice.send("bob", "hello")
    old_fp = alice.fingerprint
    alice.close()
    lose_key(keydir, "alice")

    with pytest.raises(AuthFailedError):  # the id is still bound to the lost key
        Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    assert hub.unbind("alice") == 0
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    new_fp = alice.fingerprint
    assert new_fp != old_fp
    to_alice = Inbox()
    alice.on_message(to_alice)

    bob.send("alice", "sealed for the old key")  # cannot be opened: alice tells bob
    assert to_alice == []
    with pytest.raises(IdentityChangedError) as info:
        bob.send("alice", "again?")
    assert (info.value.pinned_fingerprint, info.value.new_fingerprint) == (old_fp, new_fp)
    assert old_fp in str(info.value) and new_fp in str(info.value)

    bob.trust("alice", new_fp)
    bob.send("alice", "welcome back")
    assert to_alice.texts == ["welcome back"]
    alice.send("bob", "thanks")
    assert to_bob.texts == ["hello", "thanks"]  # the notice never reached a handler
    assert bob.safety_number("alice") == alice.safety_number("bob")
    alice.close()
    bob.close()


def test_trust_accepts_the_key_the_hub_holds_before_the_peer_writes(keydir: Path) -> None:
    """The operator told bob the new fingerprint; bob trusts it before anything arrived."""
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    bob.send("alice", "hi")
    alice.close()
    lose_key(keydir, "alice")
    hub.unbind("alice")
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    got = Inbox()
    alice.on_message(got)
    with pytest.raises(ValueError, match="does not match"):
        bob.trust("alice", "0000:0000:0000:0000:0000:0000:0000:0000")
    bob.trust("alice", alice.fingerprint)
    bob.send("alice", "straight to the new key")
    assert got.texts == ["straight to the new key"]
    alice.close()
    bob.close()


def test_unbind_reregister_trust_deliver_through_a_hub_process(tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    keydir.mkdir()
    hub = HubProcess(tmp_path / "hub", graceful_stop=True).start()
    clients = [hub.client(), hub.client()]
    try:
        alice = Agent("alice", hub=clients[0], keypair_path=keydir / "alice.json")
        bob = Agent("bob", hub=clients[1], keypair_path=keydir / "bob.json")
        to_bob = Inbox()
        bob.on_message(to_bob)
        alice.send("bob", "hello")
        wait_until(lambda: to_bob.texts == ["hello"])
        old_fp = alice.fingerprint
        alice.close()
        lose_key(keydir, "alice")

        assert hub.db is not None
        released = hub_cli("admin", "unbind", "alice", "--db", str(hub.db), cwd=tmp_path)
        assert released.returncode == 0, released.stderr
        alice = Agent("alice", hub=clients[0], keypair_path=keydir / "alice.json")
        new_fp = alice.fingerprint
        to_alice = Inbox()
        alice.on_message(to_alice)

        bob.send("alice", "sealed for the old key")

        def refused() -> bool:
            try:
                bob.send("alice", "probe")
            except IdentityChangedError as exc:
                assert (exc.pinned_fingerprint, exc.new_fingerprint) == (old_fp, new_fp)
                return True
            return False

        wait_until(refused, 30, "bob to learn alice's new key")
        bob.trust("alice", new_fp)
        bob.send("alice", "welcome back")
        wait_until(lambda: to_alice.texts[-1:] == ["welcome back"], 30, "the message")
        assert "sealed for the old key" not in to_alice.texts
        alice.send("bob", "thanks")
        wait_until(lambda: to_bob.texts == ["hello", "thanks"], 30, "alice's answer")
        alice.close()
        bob.close()
    finally:
        for client in clients:
            client.close()
        hub.stop()
