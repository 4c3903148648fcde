"""Replays: on the wire, injected into the hub's database, after a restart, and of an
initial message built on the last-resort prekeys."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from agentkit import Inbox
from hubproc import HubProcess, free_port, unique
from security_helpers import InterceptHub, RecordingAgent, state_dump, wait_until

from agentmesh.crypto.prekeys import PrekeyBundle
from agentmesh.crypto.session import SessionRecord
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(60)

DUPLICATE = DeliveryReport(accepted=True, duplicate=True)


def test_wire_replay_of_a_delivered_envelope_is_dropped__replay_window(
    shared_hub: HubProcess, net, agents, keydir: Path
) -> None:
    """Replay protection on the wire: an envelope captured in transit and SENT again
    after delivery (the hub has forgotten it) is recognised by its message id before
    any decryption, acknowledged as a duplicate, never handled twice and changes
    no state; the conversation goes on."""
    alice_id, bob_id = unique("alice"), unique("bob")
    alice_hub = net(shared_hub, tap=True)
    alice = agents(alice_id, hub=alice_hub, keypair_path=keydir / "a.json", prekey_pool_size=3)
    bob_inbox, alice_inbox = Inbox(), Inbox()
    bob = agents(
        bob_id,
        hub=net(shared_hub),
        keypair_path=keydir / "b.json",
        prekey_pool_size=3,
        cls=RecordingAgent,
    )
    bob.on_message(bob_inbox)
    alice.on_message(alice_inbox)

    alice.send(bob_id, "first")  # a PQXDH initial message (kind 1)
    wait_until(lambda: bob_inbox.texts == ["first"])
    bob.send(alice_id, "reply")
    wait_until(lambda: alice_inbox.texts == ["reply"])
    alice.send(bob_id, "second")  # a normal Double Ratchet message (kind 2)
    wait_until(lambda: bob_inbox.texts == ["first", "second"])
    wait_until(lambda: shared_hub.queued_for(bob_id) == 0, what="bob acknowledged both")
    first, second = alice_hub.captured
    assert decode_envelope(first).prekey is not None and decode_envelope(second).prekey is None

    before = state_dump(keydir / "b.json")
    for captured in (first, second):
        alice_hub.deliver(captured)  # re-SENT on the wire: the hub accepts it again
    for captured in (first, second):
        mid = decode_envelope(captured).message_id
        wait_until(lambda mid=mid: len(bob.verdicts(mid)) == 2, what="replay reached bob")
        assert bob.verdicts(mid) == [DeliveryReport(accepted=True), DUPLICATE]
    wait_until(lambda: shared_hub.queued_for(bob_id) == 0, what="duplicates acknowledged")
    assert state_dump(keydir / "b.json") == before
    assert bob_inbox.texts == ["first", "second"]

    alice.send(bob_id, "third")
    wait_until(lambda: bob_inbox.texts == ["first", "second", "third"])


def test_replay_injected_into_the_hub_database_is_dropped__replay_window(
    start_hub, net, agents, keydir: Path
) -> None:
    """Replay protection against the hub's operator: copies of a delivered envelope
    INSERTed into the stopped hub's database (under its own message id and under a
    new one, with new seqs) are pushed after the restart, recognised as duplicates,
    acknowledged away and never handled twice."""
    port = free_port()
    hub = start_hub(port=port)
    alice_id, bob_id = unique("alice"), unique("bob")
    alice_hub = net(hub, tap=True)
    alice = agents(alice_id, hub=alice_hub, keypair_path=keydir / "a.json", prekey_pool_size=3)
    inbox = Inbox()
    bob = agents(bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=3)
    bob.on_message(inbox)
    alice.send(bob_id, "only once")
    wait_until(lambda: inbox.texts == ["only once"])
    wait_until(lambda: hub.queued_for(bob_id) == 0, what="delivered and acknowledged")
    [body] = alice_hub.captured
    original_id = decode_envelope(body).message_id
    bob.close()
    alice.close()
    hub.stop()

    conn = sqlite3.connect(hub.db)
    with conn:
        now = int(time.time() * 1000)
        for message_id in (original_id, os.urandom(16)):
            conn.execute(
                "INSERT INTO envelopes (message_id, sender, recipient, body, size, "
                "created_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (message_id, alice_id, bob_id, body, len(body), now, now + 3_600_000),
            )
        conn.execute(
            "UPDATE mailboxes SET msg_count = msg_count + 2, byte_count = byte_count + ? "
            "WHERE recipient = ?",
            (2 * len(body), bob_id),
        )
    conn.close()
    assert hub.queued_for(bob_id) == 2

    hub.start()
    assert hub.port == port
    bob = agents(
        bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=3, cls=RecordingAgent
    )
    wait_until(lambda: hub.queued_for(bob_id) == 0, what="injected rows acknowledged away")
    assert bob.verdicts(original_id) == [DUPLICATE, DUPLICATE]
    late = Inbox()
    bob.on_message(late)
    alice = agents(alice_id, hub=net(hub), keypair_path=keydir / "a.json", prekey_pool_size=3)
    alice.send(bob_id, "after the restart")
    wait_until(lambda: late.texts == ["after the restart"])


def test_replay_after_recipient_restart_is_dropped__durable_replay_window(
    agents, keydir: Path
) -> None:
    """Durable replay protection: after the recipient restarts from its key file and
    state file, replayed envelopes (the initial message and a later one) are still
    recognised as duplicates by id, are not handled and change no state."""
    hub = InterceptHub()
    alice = agents("alice", hub=hub, keypair_path=keydir / "alice.json", prekey_pool_size=3)
    bob = agents("bob", hub=hub, keypair_path=keydir / "bob.json", prekey_pool_size=3)
    got = Inbox()
    bob.on_message(got)
    alice.on_message(lambda m: None)
    alice.send("bob", "one")
    bob.send("alice", "ok")
    alice.send("bob", "two")
    recorded = [e for e in hub.envelopes if decode_envelope(e).recipient == "bob"]
    assert got.texts == ["one", "two"] and len(recorded) == 2
    bob.close()

    bob = agents("bob", hub=hub, keypair_path=keydir / "bob.json", prekey_pool_size=3)
    again = Inbox()
    bob.on_message(again)
    before = state_dump(keydir / "bob.json")
    for data in recorded:
        assert bob.endpoint.receive_envelope(data) == DUPLICATE
    assert state_dump(keydir / "bob.json") == before
    assert bob.endpoint.dispatch_pending() == 0 and again == []
    alice.send("bob", "three")
    assert again.texts == ["three"]


def test_replay_of_last_resort_initial_message_is_dropped__replay_window(
    agents, keydir: Path
) -> None:
    """Replay protection where only the message-id window can help: once bob's
    one-time prekeys are exhausted, an initial message uses only the last-resort
    prekeys, so after its session is gone a replay would build a fresh valid
    session; the agent still refuses it as a duplicate and handles it once."""
    hub = InterceptHub()
    bob_key = keydir / "bob.json"
    bob = agents("bob", hub=hub, keypair_path=bob_key, prekey_pool_size=2)
    bob.close()  # offline: nobody tops the pool up
    mallory = agents("mallory", hub=hub)
    for _ in range(2):  # an attacker drains the one-time prekeys
        assert PrekeyBundle.decode(hub.fetch_prekey_bundle("bob")).one_time_prekey is not None
    last_resort = PrekeyBundle.decode(hub.fetch_prekey_bundle("bob"))
    assert last_resort.one_time_prekey is None
    del mallory

    alice = agents("alice", hub=hub, keypair_path=keydir / "alice.json", prekey_pool_size=2)
    alice.send("bob", "hello once")
    first = hub.envelopes[-1]
    initial = decode_envelope(first).prekey
    assert initial is not None and initial.one_time_prekey_id is None
    assert initial.kem_prekey_id == last_resort.kem_prekey.prekey_id

    bob = agents("bob", hub=hub, keypair_path=bob_key, prekey_pool_size=2)
    got = Inbox()
    bob.on_message(got)
    assert got.texts == ["hello once"]
    # Five newer sessions push the first one out of bob's record (4 archived at most).
    for i in range(5):
        alice.connect_with_bundle(hub.get_bundle("bob"))
        alice.send("bob", f"session {i}")
    assert got.texts == ["hello once"] + [f"session {i}" for i in range(5)]
    [record] = [r for peer, r in state_dump(bob_key)["sessions"] if peer == "alice"]
    base_keys = [s.base_key for s in SessionRecord.from_bytes(record).sessions]
    assert initial.ephemeral not in base_keys  # nothing but the id window stands in the way

    before = state_dump(bob_key)
    assert bob.endpoint.receive_envelope(first) == DUPLICATE
    assert state_dump(bob_key) == before
    assert bob.endpoint.dispatch_pending() == 0
    assert got.texts.count("hello once") == 1
