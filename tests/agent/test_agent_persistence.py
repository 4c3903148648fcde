"""Agent state that survives restarts: queued mail, replay protection, forward secrecy."""

from __future__ import annotations

import shutil

import pytest
from agent_helpers import RecordingHub
from agentkit import Inbox

from agentmesh import Agent, CryptoError, HubUnavailableError, LocalHub, ReplayError


def _fail_handler(msg) -> None:
    raise AssertionError(f"no message may reach this handler, got {msg!r}")


# --------------------------------------------------------------------------- queued mail


def test_closed_agent_gets_queued_mail_in_same_process(keydir) -> None:
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    first = Inbox()
    bob.on_message(first)
    alice.send("bob", "while online")
    fingerprint = bob.fingerprint
    bob.close()

    alice.send("bob", "while closed 1")
    alice.send("bob", "while closed 2")
    assert hub.queued_count() == 2
    assert first.texts == ["while online"]

    bob2 = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    assert bob2.fingerprint == fingerprint
    second = Inbox()
    bob2.on_message(second)
    assert second.texts == ["while closed 1", "while closed 2"]
    assert hub.queued_count() == 0

    # And the conversation goes on in both directions.
    got_alice = Inbox()
    alice.on_message(got_alice)
    bob2.send("alice", "back")
    alice.send("bob", "welcome back")
    assert got_alice.texts == ["back"]
    assert second.texts[-1] == "welcome back"
    bob2.close()
    alice.close()


def test_committed_but_unhandled_messages_survive_restart(keydir) -> None:
    """Received while no handler was registered, then closed: handled after the restart."""
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    alice.send("bob", "kept 1")
    alice.send("bob", "kept 2")
    assert hub.queued_count() == 0  # taken by bob...
    assert bob.status()["inbox_pending"] == 2  # ...but not handled yet
    bob.close()

    bob2 = Agent("bob", keypair_path=keydir / "bob.json")  # no hub needed
    assert bob2.status()["inbox_pending"] == 2
    inbox = Inbox()
    bob2.on_message(inbox)
    assert inbox.texts == ["kept 1", "kept 2"]
    assert [m.sender for m in inbox] == ["alice", "alice"]
    assert bob2.status()["inbox_pending"] == 0
    bob2.close()
    alice.close()


def test_hub_db_persistence_across_restart(tmp_path, keydir) -> None:
    db = str(tmp_path / "hub.sqlite")
    hub = LocalHub(db=db)
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    alice.send("bob", "hello")
    assert inbox.texts == ["hello"]
    bob.close()
    alice.send("bob", "queued 1", n=1)
    alice.send("bob", "queued 2", n=2)
    assert hub.queued_count() == 2
    alice.close()
    hub.close()

    hub2 = LocalHub(db=db)
    assert hub2.queued_count() == 2
    assert sorted(hub2.list_agents()) == ["alice", "bob"]
    bob2 = Agent("bob", hub=hub2, keypair_path=keydir / "bob.json")
    inbox2 = Inbox()
    bob2.on_message(inbox2)
    assert inbox2.texts == ["queued 1", "queued 2"]
    assert [m.payload["n"] for m in inbox2] == [1, 2]
    assert hub2.queued_count() == 0

    alice2 = Agent("alice", hub=hub2, keypair_path=keydir / "alice.json")
    got_alice = Inbox()
    alice2.on_message(got_alice)
    bob2.send("alice", "reply")
    alice2.send("bob", "after restart")
    assert got_alice.texts == ["reply"]
    assert inbox2.texts[-1] == "after restart"
    # The session survived: no new handshake was needed (pins are unchanged).
    assert alice2.status()["known_peers"] == ["bob"]
    bob2.close()
    alice2.close()
    hub2.close()


class FlakyHub(LocalHub):
    """A LocalHub whose deliver and route can be made to fail as if the network were down."""

    down = False

    def deliver(self, envelope) -> None:
        if self.down:
            raise HubUnavailableError("hub is down (test)")
        super().deliver(envelope)

    def route(self, envelope) -> None:
        if self.down:
            raise HubUnavailableError("hub is down (test)")
        super().route(envelope)


def test_outbox_is_resent_after_restart(keydir) -> None:
    hub = FlakyHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    hub.down = True
    alice.send("bob", "kept in outbox")  # returns: the envelope is safe in the outbox
    assert alice.status()["outbox"] == 1
    assert inbox == []
    alice.close()

    hub.down = False
    alice2 = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")  # resends on register
    assert inbox.texts == ["kept in outbox"]
    assert alice2.status()["outbox"] == 0
    alice2.send("bob", "next")
    assert inbox.texts == ["kept in outbox", "next"]
    alice2.close()
    # Nothing is left to resend: a further restart delivers nothing twice.
    alice3 = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    assert alice3.status()["outbox"] == 0
    assert hub.queued_count() == 0
    assert inbox.texts == ["kept in outbox", "next"]
    alice3.close()
    bob.close()


def test_outbox_is_resent_on_reregister_in_same_process(keydir) -> None:
    hub = FlakyHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)
    hub.down = True
    alice.send("bob", "1")
    alice.send("bob", "2")
    assert alice.status()["outbox"] == 2
    hub.down = False
    hub.register(alice)  # what a reconnect does
    assert inbox.texts == ["1", "2"]
    assert alice.status()["outbox"] == 0
    hub.register(alice)
    assert inbox.texts == ["1", "2"]
    alice.close()
    bob.close()


# --------------------------------------------------------------------------- replay after restart


def test_replay_after_both_agents_restart(tmp_path, keydir) -> None:
    db = str(tmp_path / "hub.sqlite")
    hub = RecordingHub(db=db)
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    alice.on_message(lambda m: None)
    alice.send("bob", "one")
    bob.send("alice", "ack")
    alice.send("bob", "two")
    recorded = hub.to("bob")
    assert len(recorded) == 2
    alice.close()
    bob.close()
    hub.close()

    hub2 = LocalHub(db=db)
    alice2 = Agent("alice", hub=hub2, keypair_path=keydir / "alice.json")
    bob2 = Agent("bob", hub=hub2, keypair_path=keydir / "bob.json")
    inbox2 = Inbox()
    bob2.on_message(inbox2)
    before = bob2.status()
    for envelope in recorded:
        with pytest.raises(ReplayError, match="Replay attack detected"):
            LocalHub.deliver(hub2, envelope)
    assert inbox2 == []
    assert bob2.status() == before
    assert hub2.queued_count() == 0

    # Direct delivery: recognised as a duplicate, never decrypted or handled again.
    for envelope in recorded:
        report = bob2.endpoint.receive_envelope(envelope)
        assert report.duplicate
    bob2.endpoint.dispatch_pending()
    assert inbox2 == []

    alice2.send("bob", "three")
    assert inbox2.texts == ["three"]
    alice2.close()
    bob2.close()
    hub2.close()


def test_replay_after_restart_on_a_fresh_hub(keydir) -> None:
    """The replay window lives in the agent's state file, not in the hub."""
    hub = RecordingHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    bob.on_message(lambda m: None)
    alice.send("bob", "one")
    recorded = hub.to("bob")
    bob.close()
    alice.close()

    hub2 = LocalHub()
    bob2 = Agent("bob", hub=hub2, keypair_path=keydir / "bob.json")
    Agent("alice", hub=hub2, keypair_path=keydir / "alice.json").close()  # alice known to hub2
    bob2.on_message(_fail_handler)
    with pytest.raises(ReplayError):
        LocalHub.deliver(hub2, recorded[0])
    bob2.close()


# --------------------------------------------------------------------------- forward secrecy


def test_key_file_alone_cannot_decrypt_recorded_traffic(tmp_path, keydir) -> None:
    hub = RecordingHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    alice.on_message(lambda m: None)
    alice.send("bob", "secret 1")
    alice.send("bob", "secret 2")
    bob.send("alice", "ack")  # a DH ratchet step
    alice.send("bob", "secret 3")
    carol = Agent("carol", hub=hub)  # another sender: a second PQXDH handshake
    carol.send("bob", "secret 4")
    assert inbox.texts == ["secret 1", "secret 2", "secret 3", "secret 4"]
    recorded = hub.to("bob")
    assert len(recorded) == 4
    fingerprint = bob.fingerprint
    bob.close()
    alice.close()
    carol.close()

    # The attacker has bob's key file, and nothing else.
    stolen_dir = tmp_path / "stolen"
    stolen_dir.mkdir()
    shutil.copy2(keydir / "bob.json", stolen_dir / "bob.json")
    assert not (stolen_dir / "bob.state.sqlite").exists()

    thief = Agent("bob", keypair_path=stolen_dir / "bob.json")
    try:
        assert thief.fingerprint == fingerprint  # the real identity...
        thief.on_message(_fail_handler)
        before = thief.status()
        for envelope in recorded:
            with pytest.raises(CryptoError):
                thief.endpoint.receive_envelope(envelope)
        assert thief.status() == before  # ...yet no message was decrypted
        assert thief.status()["inbox_pending"] == 0
        assert thief.endpoint.dispatch_pending() == 0
    finally:
        thief.close()


def test_key_file_alone_cannot_decrypt_even_via_a_hub(tmp_path, keydir) -> None:
    hub = RecordingHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    bob.on_message(lambda m: None)
    alice.send("bob", "secret")
    recorded = hub.to("bob")
    bob.close()
    alice.close()

    stolen_dir = tmp_path / "stolen"
    stolen_dir.mkdir()
    shutil.copy2(keydir / "bob.json", stolen_dir / "bob.json")
    hub2 = LocalHub()
    thief = Agent("bob", hub=hub2, keypair_path=stolen_dir / "bob.json")
    Agent("alice", hub=hub2).close()
    thief.on_message(_fail_handler)
    with pytest.raises(CryptoError):
        LocalHub.deliver(hub2, recorded[0])
    thief.close()


def test_signed_prekeys_rotate_on_schedule_and_old_ones_are_erased(tmp_path):
    """A long-running agent rotates its signed prekey after a week of sending, keeps the
    old private key for the grace period (late initial messages still decrypt), then erases it."""
    from agentmesh import Agent, LocalHub
    from agentmesh.crypto.prekeys import SIGNED_PREKEY_GRACE_MS, SIGNED_PREKEY_ROTATION_MS

    now = [1_700_000_000_000]
    hub = LocalHub()
    alice = Agent("alice", hub=hub, clock_ms=lambda: now[0])
    bob = Agent("bob", hub=hub, clock_ms=lambda: now[0])
    bob.on_message(lambda m: None)
    alice.on_message(lambda m: None)
    first = alice.public_bundle["signed_prekey"]["id"]

    now[0] += SIGNED_PREKEY_ROTATION_MS + 1
    alice.send("bob", text="a week later")
    second = alice.public_bundle["signed_prekey"]["id"]
    assert second != first
    assert first in alice._core.prekeys.signed  # kept for the grace period
    bob.send("alice", text="still fine")

    now[0] += SIGNED_PREKEY_GRACE_MS + 1
    alice.send("bob", text="after the grace period")
    assert first not in alice._core.prekeys.signed  # erased
    published = hub.get_bundle("alice")["signed_prekey"]["id"]
    assert published == alice.public_bundle["signed_prekey"]["id"]
