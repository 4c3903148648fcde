"""Attacks on who is who: taking over an id, forging a sender, hostile agent ids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agentkit import Inbox
from hubproc import HubProcess, RawClient, unique
from security_helpers import fatal_code, frames_until_eof, login_frame_for, raw_frame, wait_until

from agentmesh import Agent, LocalHub
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle
from agentmesh.crypto.session import Session
from agentmesh.hub.store import HubStore
from agentmesh.protocol import hub_protocol as hp
from agentmesh.wire import frames as f
from agentmesh.wire.codec import Writer
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(60)


def test_takeover_of_registered_id_is_refused__identity_binding(
    shared_hub: HubProcess, net, agents, keydir: Path
) -> None:
    """Identity binding: once an id has logged in with a key, no other key, no
    signature made for another connection and no bare public key gets that id,
    its mailbox or its pushes; the owner keeps receiving."""
    victim_id = unique("victim")
    inbox = Inbox()
    victim = agents(
        victim_id, hub=net(shared_hub), keypair_path=keydir / "v.json", prekey_pool_size=3
    )
    victim.on_message(inbox)

    # 1. The same id with the attacker's own (valid, signed) key.
    thief = RawClient(shared_hub.port)
    try:
        refused = thief.login(victim_id, IdentityKeyPair.generate())
        assert fatal_code(refused) == "identity_mismatch"
        assert thief.conn.closed and thief.sock.recv(1) == b""
    finally:
        thief.close()

    # 2. The victim's public key with a signature the attacker made (no private key).
    thief = RawClient(shared_hub.port)
    try:
        thief.hello()
        challenge = thief.conn.login_challenge(victim_id)
        fake = IdentityKeyPair.generate().sign(challenge)
        key = victim.endpoint.signing_public_key
        refused = thief.answer(thief.conn.login(victim_id, key, fake))
        assert fatal_code(refused) == "bad_signature"
    finally:
        thief.close()

    # 3. A login the victim really signed, recorded on one connection and replayed on
    #    another (each HELLO carries a fresh nonce).
    watched, thief = RawClient(shared_hub.port), RawClient(shared_hub.port)
    try:
        watched.hello()
        recorded = victim.endpoint.sign_login(watched.conn.login_challenge(victim_id))
        thief.hello()
        key = victim.endpoint.signing_public_key
        refused = thief.answer(thief.conn.login(victim_id, key, recorded))
        assert fatal_code(refused) == "bad_signature"
    finally:
        watched.close()
        thief.close()

    # The binding is unchanged and the owner still gets its mail, on its own connection.
    assert shared_hub.query("SELECT signing_key FROM agents WHERE agent_id = ?", (victim_id,)) == [
        (victim.endpoint.signing_public_key,)
    ]
    sender = agents(unique("sender"), hub=net(shared_hub), prekey_pool_size=3)
    sender.send(victim_id, "for the owner only")
    wait_until(lambda: inbox.texts == ["for the owner only"], what="owner receives")
    assert f"{victim_id} logged in again" not in shared_hub.log()


def test_forged_from_is_refused_by_the_hub__sender_binding(
    shared_hub: HubProcess, net, agents, keydir: Path
) -> None:
    """Sender binding: a logged-in agent cannot submit an envelope whose ``from`` is
    another agent, not even a well-formed PQXDH initial message built for the
    recipient; nothing is queued, and the recipient later pins the real sender."""
    alice_id, bob_id, mallory_id = unique("alice"), unique("bob"), unique("mallory")
    alice_hub = net(shared_hub, tap=True)
    alice = agents(alice_id, hub=alice_hub, keypair_path=keydir / "a.json", prekey_pool_size=3)
    inbox = Inbox()
    bob = agents(bob_id, hub=net(shared_hub), keypair_path=keydir / "b.json", prekey_pool_size=3)
    bob.on_message(inbox)

    mallory_key = IdentityKeyPair.generate()
    raw = RawClient(shared_hub.port)
    try:
        assert isinstance(raw.login(mallory_id, mallory_key), hp.LoginAccepted)
        fetched = raw.answer(raw.conn.fetch_bundle(bob_id))
        assert isinstance(fetched, hp.BundleReceived)
        # A genuine initial message to bob, claiming to come from alice (bob has never
        # heard from alice, so he would pin mallory's key as alice's if he got it).
        session = Session.initiate(mallory_key, alice_id, PrekeyBundle.decode(fetched.bundle))
        forged = session.encrypt(
            mallory_key,
            b'{"text":"I am alice","type":"message"}',
            message_id=os.urandom(16),
            timestamp_ms=1,
        ).to_bytes()
        answer = raw.answer(raw.conn.send(forged))
        assert isinstance(answer, hp.ErrorReceived)
        assert (answer.code, answer.fatal) == ("forged_sender", False)
        assert answer.message_id == decode_envelope(forged).message_id
        assert shared_hub.queued_for(bob_id) == 0

        alice.send(bob_id, "really alice")
        wait_until(lambda: inbox.texts == ["really alice"], what="bob gets alice's message")
        # Relaying alice's genuine envelope (captured) under one's own login: refused too.
        [genuine] = alice_hub.captured
        relayed = raw.answer(raw.conn.send(genuine))
        assert isinstance(relayed, hp.ErrorReceived) and relayed.code == "forged_sender"
    finally:
        raw.close()

    wait_until(lambda: shared_hub.queued_for(bob_id) == 0, what="bob acknowledged")
    assert [(m.sender, m.text) for m in inbox] == [(alice_id, "really alice")]
    assert bob.safety_number(alice_id) == alice.safety_number(bob_id)  # alice's real key


BAD_IDS = [
    "../evil",
    "..",
    ".hidden",
    "-rf",
    "a/b",
    "a\\b",
    "/etc/passwd",
    "x'; DROP TABLE agents; --",
    'x" OR "1"="1',
    "x%2f..%2fy",
    "a b",
    "a\nb",
    "a\x00b",
    "é",
    "",
    "a" * 65,
]


def test_agent_ids_with_path_or_sql_metacharacters_are_refused__id_validation(
    shared_hub: HubProcess, tmp_path: Path
) -> None:
    """Id validation: ids with path or SQL metacharacters are refused with ValueError
    by Agent and its methods, by the hub store and by the hub protocol (fatal
    bad_frame / bad_envelope); no file appears and the hub database is untouched."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    keyfile = workdir / "keys" / "k.json"
    before_files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    schema = shared_hub.query("SELECT type, name, sql FROM sqlite_master ORDER BY name")
    agent_count = shared_hub.query("SELECT COUNT(*) FROM agents")[0][0]

    hub = LocalHub()
    good = Agent("good", hub=hub)
    store = HubStore("sqlite://")  # in memory: the refusal comes before any SQL
    store.ensure_schema()
    try:
        for bad in BAD_IDS:
            with pytest.raises(ValueError):
                Agent(bad)
            with pytest.raises(ValueError):
                Agent(bad, hub=hub, keypair_path=keyfile)
            with pytest.raises(ValueError):
                good.send(bad, "x")
            with pytest.raises(ValueError):
                good.connect(bad)
            with pytest.raises(ValueError):
                good.safety_number(bad)
            with pytest.raises(ValueError):
                store.bind_agent(bad, bytes(32), 0)
        assert hub.list_agents() == ["good"]
        assert store.list_agents() == []
    finally:
        good.close()
        store.close()
    # Nothing was created, inside the key folder or beside it.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before_files

    # The hub protocol: a LOGIN, a FETCH_BUNDLE and an envelope naming a hostile id.
    for bad in BAD_IDS[:10]:
        raw = RawClient(shared_hub.port)
        try:
            hello = raw.hello()
            nonce = raw.conn.hello.nonce  # type: ignore[union-attr]
            raw.sock.sendall(login_frame_for(bad.encode(), nonce, hello.hub_address))
            frames = frames_until_eof(raw.sock)
            assert frames and isinstance(frames[-1], f.Error) and frames[-1].fatal
            assert frames[-1].code == "bad_frame"
        finally:
            raw.close()
    user = unique("user")
    raw = RawClient(shared_hub.port)
    try:
        assert isinstance(raw.login(user, IdentityKeyPair.generate()), hp.LoginAccepted)
        header = Writer().u8(1).u8(2).raw(os.urandom(16)).u64(1).str8(user)
        envelope = header.str8("../x'--").raw(os.urandom(32)).u32(0).u32(0)
        envelope.bytes32(os.urandom(32))
        answer = raw.answer(raw.conn.send(envelope.getvalue()))
        assert isinstance(answer, hp.ErrorReceived) and answer.code == "bad_envelope"
        bad_fetch = Writer().u32(99).str8("x' OR '1'='1").getvalue()
        raw.sock.sendall(raw_frame(f.FetchBundle.TYPE, bad_fetch))
        frames = frames_until_eof(raw.sock)
        assert isinstance(frames[-1], f.Error) and frames[-1].code == "bad_frame"
    finally:
        raw.close()
    assert shared_hub.alive
    assert shared_hub.query("SELECT type, name, sql FROM sqlite_master ORDER BY name") == schema
    assert shared_hub.query("SELECT COUNT(*) FROM agents")[0][0] == agent_count + 1
    ids = [row[0] for row in shared_hub.query("SELECT agent_id FROM agents")]
    assert not [i for i in ids if any(c in i for c in "/\\'\" \n\x00%")]
