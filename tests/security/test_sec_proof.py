"""Transferable proof of origin (review note): PROTOCOL.md promised recipients
"transferable proof a third party can check", but the signed header bytes and the
raw payload were not kept. ``Message.export_proof()`` and ``agentmesh.verify_proof``
make the promise real for signed sessions, and unsigned sessions stay deniable."""

from __future__ import annotations

import pytest
from security_helpers import InterceptHub

from agentmesh import Message, verify_proof
from agentmesh.errors import CryptoError, DecodeError

pytestmark = pytest.mark.timeout(60)


def test_signed_message_yields_a_proof_anyone_can_check__transferable_proof(agents) -> None:
    """The proof verifies without any secret and names sender, recipient, message id,
    timestamp, payload and the signer's fingerprint; the envelope is kept as received."""
    hub = InterceptHub()
    got: list[Message] = []
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    bob.on_message(got.append)
    alice.send("bob", text="pay 10 to carol", amount=10)
    [message] = got
    assert message.raw_envelope == hub.envelopes[-1]
    proof = message.export_proof()
    checked = verify_proof(proof)
    assert (checked.sender, checked.recipient) == ("alice", "bob")
    assert checked.message_id == message.message_id
    assert checked.timestamp == message.timestamp
    assert checked.payload == {"type": "message", "text": "pay 10 to carol", "amount": 10}
    assert checked.fingerprint == alice.fingerprint


def test_altered_proof_is_refused__proof_integrity(agents) -> None:
    """Changing any byte of a proof (identity, header, payload or signature) makes
    verification fail with a typed error."""
    hub = InterceptHub()
    got: list[Message] = []
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    bob.on_message(got.append)
    alice.send("bob", text="x")
    proof = got[0].export_proof()
    for index in range(len(proof)):
        altered = bytearray(proof)
        altered[index] ^= 0x01
        with pytest.raises((CryptoError, DecodeError)):
            verify_proof(bytes(altered))
    with pytest.raises(DecodeError):
        verify_proof(proof + b"\x00")


def test_unsigned_session_gives_no_proof__deniability(agents) -> None:
    """An unsigned session is deniable: its messages have no proof to export."""
    hub = InterceptHub()
    got: list[Message] = []
    alice = agents("alice", hub=hub, sign_messages=False)
    bob = agents("bob", hub=hub, sign_messages=False)
    bob.on_message(got.append)
    alice.send("bob", text="off the record")
    with pytest.raises(ValueError, match="no proof of origin"):
        got[0].export_proof()
