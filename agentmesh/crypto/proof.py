"""Transferable proof of origin for signed messages, and its verification.

In a signed session (docs/PROTOCOL.md, "Per-message signature") the sender's
Ed25519 identity key signs ``"AgentMesh-msg-v2" || header_bytes || payload``,
and the header names sender, recipient, message id and timestamp. A recipient
that keeps those bytes holds a proof that a third party can check without any
secret: :func:`encode_proof` packs them, :func:`verify_proof` checks them.

Layout (docs/PROTOCOL.md, "Proof of origin")::

    u8      version = 1
    128     the sender's public identity (Ed25519 key, X25519 key, binding signature)
    bytes16 header_bytes (the envelope header exactly as signed)
    bytes32 payload (the JSON bytes exactly as signed)
    u8      is_reply (0 or 1), then [16 in_reply_to] if 1
    64      signature

What it proves: the holder of the identity key with that fingerprint signed a
message with that header (so those ids, that message id and that sender
timestamp) and that payload. What it does not: that the message was delivered,
when it was received, or that the fingerprint belongs to a given person; check
the fingerprint out of band, as for any pin. Unsigned sessions give no proof
(they are deniable by design). No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import PublicIdentity
from agentmesh.crypto.session import signed_message
from agentmesh.errors import DecodeError
from agentmesh.wire.codec import Reader, Writer
from agentmesh.wire.envelope import decode_envelope
from agentmesh.wire.payload import decode_payload

PROOF_VERSION = 1
#: A header is at most a few KiB (ids are <= 64 bytes); payloads are bounded by envelopes.
_MAX_HEADER = 64 * 1024
_MAX_PAYLOAD = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    """What a verified proof establishes (see the module docstring for what it does not)."""

    sender: str
    recipient: str
    message_id: str
    timestamp: int
    payload: dict[str, Any]
    #: The message id (hex) this message answers, if it is a reply.
    in_reply_to: str | None
    #: The signer's fingerprint (``Agent.fingerprint`` format): compare it out of band.
    fingerprint: str


def encode_proof(
    sender_identity: bytes,
    header_bytes: bytes,
    payload: bytes,
    signature: bytes,
    in_reply_to: bytes | None = None,
) -> bytes:
    """Pack a signed message's proof (``sender_identity`` is ``PublicIdentity.encode()``)."""
    w = Writer().u8(PROOF_VERSION).raw(sender_identity).bytes16(header_bytes).bytes32(payload)
    if in_reply_to is None:
        w.u8(0)
    else:
        w.u8(1).raw(in_reply_to)
    return w.raw(signature).getvalue()


def verify_proof(proof: bytes) -> VerifiedProof:
    """Check a proof made by ``Message.export_proof()``; return what it establishes.

    Raises DecodeError for bytes that are not a proof (or whose header or payload
    do not parse, or whose header names another identity) and
    SignatureError/InvalidKeyError if the identity binding or the message signature
    does not verify.
    """
    r = Reader(proof, "proof")
    if r.u8() != PROOF_VERSION:
        raise DecodeError("proof: unsupported version")
    identity = PublicIdentity.read(r)
    header = r.bytes16(_MAX_HEADER)
    payload = r.bytes32(_MAX_PAYLOAD)
    flag = r.u8()
    if flag not in (0, 1):
        raise DecodeError("proof: bad reply flag")
    in_reply_to = r.raw(16) if flag else None
    signature = r.raw(64)
    r.finish()
    identity.verify()
    p.ed25519_verify(identity.signing, signature, signed_message(header, payload, in_reply_to))
    # The header is parsed as the front of an envelope with an empty tag-sized body.
    envelope = decode_envelope(header + (16).to_bytes(4, "big") + bytes(16))
    prekey = envelope.prekey
    if prekey is not None and not p.constant_time_equal(prekey.identity_signing, identity.signing):
        raise DecodeError("proof: the header names another identity")
    return VerifiedProof(
        sender=envelope.sender,
        recipient=envelope.recipient,
        message_id=envelope.message_id.hex(),
        timestamp=envelope.timestamp,
        payload=decode_payload(payload),
        in_reply_to=None if in_reply_to is None else in_reply_to.hex(),
        fingerprint=identity.fingerprint,
    )
