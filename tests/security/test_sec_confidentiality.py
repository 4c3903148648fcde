"""Confidentiality against those who hold data at rest: the hub's operator with its
database and log, and a thief with an agent's key file but not its state file."""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from pathlib import Path

import pytest
from agentkit import Inbox
from hubproc import unique
from security_helpers import InterceptHub, wait_until

from agentmesh.errors import CryptoError, DecodeError
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(60)


def _forms(marker: str) -> list[bytes]:
    """The marker as raw bytes and in the encodings a careless store or log might use."""
    raw = marker.encode()
    return [raw, raw.hex().encode(), base64.b64encode(raw)[:-4], raw.decode().upper().encode()]


def test_hub_operator_sees_ciphertext_only__end_to_end_encryption(
    start_hub, net, agents, keydir: Path
) -> None:
    """End-to-end encryption: the hub's database file, its WAL and shared memory and
    its DEBUG log hold no trace of a message's text, type or other fields, neither
    while it is queued nor after delivery nor after shutdown; they do hold the
    metadata the hub needs (ids), which the threat model says it sees."""
    hub = start_hub(log_level="DEBUG")
    alice_id, bob_id = unique("alice"), unique("bob")
    text, kind, note = (f"{label}-{uuid.uuid4().hex}" for label in ("TEXT", "TYPE", "NOTE"))
    markers = [form for m in (text, kind, note) for form in _forms(m)]

    bob = agents(bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=3)
    bob.close()
    alice = agents(alice_id, hub=net(hub), keypair_path=keydir / "a.json", prekey_pool_size=3)
    alice.send(bob_id, text, type=kind, note=note)
    assert hub.queued_for(bob_id) == 1

    def operator_view() -> bytes:
        return hub.files_bytes()

    stored = operator_view()
    assert alice_id.encode() in stored and bob_id.encode() in stored  # metadata: visible
    assert [m for m in markers if m in stored] == []
    [(body,)] = hub.query("SELECT body FROM envelopes WHERE recipient = ?", (bob_id,))
    assert [m for m in markers if m in body] == []

    bob = agents(bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=3)
    inbox = Inbox()
    bob.on_message(inbox)
    wait_until(
        lambda: [(m.text, m.type, m.payload.get("note")) for m in inbox] == [(text, kind, note)]
    )
    wait_until(lambda: hub.queued_for(bob_id) == 0)
    assert [m for m in markers if m in operator_view()] == []
    hub.stop()
    assert [m for m in markers if m in operator_view()] == []


def test_stolen_key_file_without_state_reveals_no_past_plaintext__forward_secrecy(
    agents, keydir: Path, tmp_path: Path
) -> None:
    """Forward secrecy against key-file theft: with bob's key file (his long-term
    identity) but not his state file, an attacker who recorded every envelope of a
    conversation cannot decrypt any of them, neither as a fresh Agent nor by reading
    the key file, which holds nothing but the two identity private keys."""
    hub = InterceptHub()
    alice = agents("alice", hub=hub, keypair_path=keydir / "alice.json", prekey_pool_size=3)
    bob = agents("bob", hub=hub, keypair_path=keydir / "bob.json", prekey_pool_size=3)
    secrets = [f"SECRET-{i}-{uuid.uuid4().hex}" for i in range(6)]
    got_bob, got_alice = Inbox(), Inbox()
    bob.on_message(got_bob)
    alice.on_message(got_alice)
    for i in range(0, 6, 2):
        alice.send("bob", secrets[i])
        bob.send("alice", secrets[i + 1])
    assert got_bob.texts == secrets[0::2] and got_alice.texts == secrets[1::2]
    recorded = [e for e in hub.envelopes if decode_envelope(e).recipient == "bob"]
    assert len(recorded) == 3 and decode_envelope(recorded[0]).prekey is not None

    stolen = tmp_path / "thief"
    stolen.mkdir()
    shutil.copy(keydir / "bob.json", stolen / "bob.json")
    doc = json.loads((stolen / "bob.json").read_text())
    assert set(doc) == {"identity_private", "exchange_private"}

    thief = agents("bob", keypair_path=stolen / "bob.json", prekey_pool_size=3)
    assert thief.fingerprint == bob.fingerprint  # the same identity...
    loot = Inbox()
    thief.on_message(loot)
    for data in recorded:
        with pytest.raises((CryptoError, DecodeError)):
            thief.endpoint.receive_envelope(data)  # ...but none of the keys that encrypted anything
    assert thief.endpoint.dispatch_pending() == 0 and loot == []
    assert thief.status()["inbox_pending"] == 0
    state = b"".join(p.read_bytes() for p in stolen.glob("bob.state.sqlite*"))
    assert [s for s in secrets if s.encode() in state] == []
