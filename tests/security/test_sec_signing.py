"""Review finding F-4: signatures were optional on receipt.

With ``sign_messages=True`` an envelope without the inner signature was still
accepted (``signed=False``), so anyone holding the session's chain keys (a
thief of the sender's state file alone) could forge messages "from" the peer by
leaving the signature out. Protocol 2 fixes the signing mode at the handshake,
authenticates it in every message, and refuses unsigned envelopes in a signed
session; ``Agent(require_signatures=...)`` refuses unsigned sessions.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest
from agentkit import flip
from security_helpers import InterceptHub, field_spans, state_dump

from agentmesh import Message
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.session import SessionRecord
from agentmesh.errors import AuthenticationError, SignatureError
from agentmesh.state import state_path_for

pytestmark = pytest.mark.timeout(60)


def _stolen_session_forgery(key: Path, text: bytes) -> bytes:
    """What a thief of alice's state file (not her key file) can send as alice: her
    session with bob, read from the file, encrypting an unsigned message."""
    db = sqlite3.connect(state_path_for(key))
    try:
        (raw,) = db.execute("SELECT record FROM sessions WHERE peer_id = 'bob'").fetchone()
    finally:
        db.close()
    session = SessionRecord.from_bytes(bytes(raw)).active
    assert session is not None
    forged = replace(session, sign_messages=False)
    not_alice = IdentityKeyPair.generate()  # the thief has no identity key
    envelope = forged.encrypt(
        not_alice,
        b'{"type":"message","text":"' + text + b'"}',
        message_id=b"\x42" * 16,
        timestamp_ms=1_900_000_000_000,
    )
    return envelope.to_bytes()


def test_unsigned_forgery_with_stolen_chain_keys_is_refused__signatures_required(
    keydir: Path, agents
) -> None:
    """In a signed session, an envelope without the inner signature is refused with
    SignatureError and changes nothing, even though its AEAD is valid."""
    hub = InterceptHub()
    got: list[Message] = []
    bob = agents("bob", hub=hub, keypair_path=keydir / "bob.json")
    bob.on_message(got.append)
    alice = agents("alice", hub=hub, keypair_path=keydir / "alice.json")
    alice.send("bob", text="hello")
    bob.send("alice", text="hi")
    alice.close()  # the state file is complete on disk: the thief copies it
    forgery = _stolen_session_forgery(keydir / "alice.json", b"wire the money")
    before = state_dump(keydir / "bob.json")
    with pytest.raises(SignatureError, match="unsigned message in a signed session"):
        hub.inject(forgery)
    assert state_dump(keydir / "bob.json") == before
    assert [m.text for m in got] == ["hello"] and all(m.signed for m in got)


def test_signing_mode_cannot_be_changed_in_the_initial_message__authenticated_mode(
    keydir: Path, agents
) -> None:
    """The session flags travel in the initial message and are authenticated: an
    envelope whose flags were cleared is refused and changes nothing, even by an
    agent that accepts unsigned sessions (one that requires signatures refuses it
    before any key is used)."""
    hub = InterceptHub()
    agents("bob", hub=hub, keypair_path=keydir / "bob.json", require_signatures=False)
    alice = agents("alice", hub=hub, keypair_path=keydir / "alice.json")
    initial = hub.capture(lambda: alice.send("bob", text="hello"))
    start, _ = field_spans(initial)["session_flags"]
    assert initial[start] == 1
    before = state_dump(keydir / "bob.json")
    with pytest.raises(AuthenticationError):
        hub.inject(flip(initial, start, 0x01))
    assert state_dump(keydir / "bob.json") == before
    hub.inject(initial)


def test_unsigned_session_is_refused_when_signatures_are_required__require_signatures(
    agents,
) -> None:
    """``require_signatures=True`` refuses an initial message that opens an unsigned
    session; without it the same session is accepted and stays unsigned both ways."""
    hub = InterceptHub()
    strict = agents("strict", hub=hub, require_signatures=True, sign_messages=False)
    lax = agents("lax", hub=hub, sign_messages=False)
    sender = agents("sender", hub=hub, sign_messages=False)
    got: list[Message] = []
    lax.on_message(got.append)
    # strict's verdict; the sender's own send never sees it (issue 12: a recipient's
    # refusal is not raised to the sender), so the envelope is captured and injected.
    data = hub.capture(lambda: sender.send("strict", text="unsigned hello"))
    with pytest.raises(SignatureError, match="signatures are required"):
        hub.inject(data)
    sender.send("strict", text="unsigned again")  # returns: strict refuses it on its side
    sender.send("lax", text="unsigned hello")
    assert [(m.text, m.signed) for m in got] == [("unsigned hello", False)]
    assert strict.status()["inbox_pending"] == 0


def test_signed_session_is_signed_both_ways__session_mode(agents) -> None:
    """The initiator fixes the mode for both directions: an agent with
    ``sign_messages=False`` signs its replies in a session that was opened signed."""
    hub = InterceptHub()
    got: list[Message] = []
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub, sign_messages=False)
    alice.on_message(got.append)
    alice.send("bob", text="signed hello")
    bob.send("alice", text="reply")
    assert [(m.text, m.signed) for m in got] == [("reply", True)]


def test_stripping_is_refused_in_both_directions(agents) -> None:
    """A forged unsigned message in a signed session is refused whichever side forges."""
    hub = InterceptHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    alice.send("bob", text="hello")
    reply = hub.capture(lambda: bob.send("alice", text="hi"))
    hub.inject(reply)
    record = bob._core.record("alice")
    assert record is not None and record.active is not None
    forged = replace(record.active.copy(), sign_messages=False).encrypt(
        IdentityKeyPair.generate(),
        b'{"text":"x"}',
        message_id=b"\x01" * 16,
        timestamp_ms=int(time.time() * 1000),
    )
    with pytest.raises(SignatureError, match="unsigned message in a signed session"):
        hub.inject(forged.to_bytes())
