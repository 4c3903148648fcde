"""Trust on first use: a pinned peer whose identity key changes is stopped, loudly."""

from __future__ import annotations

import re

import pytest
from agent_helpers import RecordingHub, identity_signing_offset
from agentkit import Inbox, flip

from agentmesh import Agent, AuthFailedError, CryptoError, IdentityChangedError, LocalHub

SAFETY_RE = re.compile(r"^\d{5}( \d{5}){11}$")


def _reinstall(keydir, name: str) -> None:
    """The peer lost its key file and state and starts over (a new identity)."""
    for path in keydir.glob(f"{name}.*"):
        path.unlink()


def test_safety_number_is_the_same_on_both_sides(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    with pytest.raises(ValueError):
        alice.safety_number("bob")  # nothing pinned yet
    bob.on_message(lambda m: None)
    alice.send("bob", "hi")
    assert SAFETY_RE.match(alice.safety_number("bob"))
    assert alice.safety_number("bob") == bob.safety_number("alice")
    carol = make_agent("carol", hub=hub)
    carol.send("bob", "hi")
    assert bob.safety_number("carol") == carol.safety_number("bob")
    assert bob.safety_number("carol") != bob.safety_number("alice")


def test_hub_refuses_rebinding_an_id_to_a_new_key(make_agent, keydir) -> None:
    hub = LocalHub()
    make_agent("alice", hub=hub, keypair_path=keydir / "alice.json").close()
    with pytest.raises(AuthFailedError, match="identity_mismatch"):
        Agent("alice", hub=hub)  # an impostor under the same name
    _reinstall(keydir, "alice")
    with pytest.raises(AuthFailedError):
        Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    # The refused attempt did not keep the identity locked in this process.
    make_agent("alice", keypair_path=keydir / "alice.json")


def test_changed_peer_key_blocks_until_trusted(keydir) -> None:
    hub1 = RecordingHub()
    alice = Agent("alice", hub=hub1, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub1, keypair_path=keydir / "bob.json")
    bob.on_message(lambda m: None)
    alice.on_message(lambda m: None)
    alice.send("bob", "hi")
    bob.send("alice", "hello")
    old_fp = alice.fingerprint
    old_safety = bob.safety_number("alice")
    assert old_safety == alice.safety_number("bob")
    alice.close()
    bob.close()

    # alice comes back with a new identity under the same id. hub1 refuses her...
    _reinstall(keydir, "alice")
    with pytest.raises(AuthFailedError):
        Agent("alice", hub=hub1, keypair_path=keydir / "alice.json")
    # ...so she (and bob, from his files) moves to a fresh hub.
    hub2 = RecordingHub()
    new_alice = Agent("alice", hub=hub2, keypair_path=keydir / "alice.json")
    new_fp = new_alice.fingerprint
    assert new_fp != old_fp
    bob = Agent("bob", hub=hub2, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    got_alice = Inbox()
    new_alice.on_message(got_alice)

    # alice -> bob: the hub holds the message back; nothing reaches bob's handler.
    new_alice.send("bob", "it's me, new key")
    new_alice.send("bob", "really")
    assert inbox == []
    assert hub2.queued_count() == 2
    held = hub2.to("bob")
    with pytest.raises(IdentityChangedError) as info:
        bob.endpoint.receive_envelope(held[0])
    err = info.value
    assert (err.peer_id, err.pinned_fingerprint, err.new_fingerprint) == ("alice", old_fp, new_fp)
    assert old_fp in str(err) and new_fp in str(err)
    assert "trust" in str(err)
    assert bob.status()["inbox_pending"] == 0
    assert bob.safety_number("alice") == old_safety  # still the old pin

    # bob -> alice: refused before anything is encrypted.
    with pytest.raises(IdentityChangedError) as info:
        bob.send("alice", "to the new alice?")
    assert (info.value.pinned_fingerprint, info.value.new_fingerprint) == (old_fp, new_fp)
    assert old_fp in str(info.value) and new_fp in str(info.value)
    assert got_alice == []
    assert bob.status()["outbox"] == 0
    with pytest.raises(IdentityChangedError):
        bob.connect("alice")

    # A wrong fingerprint is refused and changes nothing.
    with pytest.raises(ValueError, match="does not match"):
        bob.trust("alice", "0000:0000:0000:0000:0000:0000:0000:0000")
    with pytest.raises(ValueError):
        bob.trust("nobody", new_fp)
    with pytest.raises(IdentityChangedError):
        bob.send("alice", "still blocked")
    assert inbox == []

    # After verifying out of band, bob trusts the new key: held mail arrives, in order.
    bob.trust("alice", new_fp)
    assert inbox.texts == ["it's me, new key", "really"]
    assert hub2.queued_count() == 0
    bob.send("alice", "welcome back")
    assert got_alice.texts == ["welcome back"]
    new_alice.send("bob", "thanks")
    assert inbox.texts[-1] == "thanks"
    assert bob.safety_number("alice") == new_alice.safety_number("bob")
    assert bob.safety_number("alice") != old_safety

    # The new pin is durable.
    bob.close()
    bob = Agent("bob", hub=hub2, keypair_path=keydir / "bob.json")
    bob.on_message(inbox)
    bob.send("alice", "after restart")
    assert got_alice.texts[-1] == "after restart"
    bob.close()
    new_alice.close()


def test_stale_session_send_does_not_reach_the_new_identity(keydir) -> None:
    """bob still holds a session with the old alice: the new one cannot read it."""
    hub1 = LocalHub()
    alice = Agent("alice", hub=hub1, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub1, keypair_path=keydir / "bob.json")
    alice.send("bob", "hi")
    bob.send("alice", "hello")
    alice.close()
    bob.close()

    _reinstall(keydir, "alice")
    hub2 = LocalHub()
    new_alice = Agent("alice", hub=hub2, keypair_path=keydir / "alice.json")
    got = Inbox()
    new_alice.on_message(got)
    bob = Agent("bob", hub=hub2, keypair_path=keydir / "bob.json")
    try:
        bob.send("alice", "on the old session")
    except CryptoError:
        pass  # LocalHub reports the recipient's verdict (no session can decrypt it)
    assert got == []
    bob.close()
    new_alice.close()


def test_changed_key_detected_when_bob_sends_first(keydir) -> None:
    """bob learns the new key from the hub bundle (he speaks first)."""
    hub1 = LocalHub()
    alice = Agent("alice", hub=hub1, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub1, keypair_path=keydir / "bob.json")
    bob.send("alice", "hi")  # bob pins alice from her bundle
    old_fp = alice.fingerprint
    alice.close()
    bob.close()

    _reinstall(keydir, "alice")
    hub2 = LocalHub()
    new_alice = Agent("alice", hub=hub2, keypair_path=keydir / "alice.json")
    got = Inbox()
    new_alice.on_message(got)
    bob = Agent("bob", hub=hub2, keypair_path=keydir / "bob.json")
    # bob's old session still exists, but alice lost it: a fresh session is needed.
    with pytest.raises(IdentityChangedError) as info:
        bob.connect_with_bundle(new_alice.public_bundle)
    assert (info.value.pinned_fingerprint, info.value.new_fingerprint) == (
        old_fp,
        new_alice.fingerprint,
    )
    bob.trust("alice", new_alice.fingerprint.upper())  # case and spaces do not matter
    bob.send("alice", "hello new alice")
    assert got.texts == ["hello new alice"]
    bob.close()
    new_alice.close()


@pytest.mark.parametrize("also_flip_message_id", [True, False])
def test_tampered_identity_in_prekey_message_changes_nothing(
    make_agent, also_flip_message_id
) -> None:
    """A prekey envelope whose identity key was altered in transit does not decrypt; it
    must not mark the peer as changed (which would block the conversation) nor hold up
    the recipient's other mail on the hub."""
    hub = RecordingHub()
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    carol = make_agent("carol", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)
    got_alice = Inbox()
    alice.on_message(got_alice)
    alice.send("bob", "hi")  # a prekey message; bob pins alice
    original = hub.envelopes[0]
    forged = flip(original, identity_signing_offset(original) + 5)
    if also_flip_message_id:
        forged = flip(forged, 2)
    before = bob.status()
    safety = bob.safety_number("alice")

    with pytest.raises(CryptoError) as info:
        LocalHub.deliver(hub, forged)
    assert not isinstance(info.value, IdentityChangedError)
    assert bob.status() == before
    assert bob.safety_number("alice") == safety
    assert hub.queued_count() == 0  # dropped, not held in front of bob's other mail

    carol.send("bob", "from carol")
    bob.send("alice", "reply")  # not blocked
    alice.send("bob", "again")
    assert inbox.texts == ["hi", "from carol", "again"]
    assert got_alice.texts == ["reply"]
