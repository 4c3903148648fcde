"""Version 1's ``CryptoSession``, ``perform_key_exchange``, ``seal`` and ``unseal``.

Version 1 derived one static key from the two identities' X25519 keys and
encrypted everything with it, so a stolen key file decrypted all past
traffic. These names keep their signatures but now run a real Double
Ratchet (spec section 3) *seeded* from the static DH:

* ``SK = HKDF-SHA256(salt = 0^32, IKM = 0xFF^32 || DH(IK_A, IK_B), info = "AgentMesh_static_v1")``
* The party with the lexicographically smaller Ed25519 key is the ratchet's
  initiator; the other's X25519 identity key serves as its first ratchet key
  (as the signed prekey does in PQXDH).
* So that either side may speak first, the responder also gets a bootstrap
  sending chain ``CK0 = HKDF(SK, info = "AgentMesh_static_v1_bootstrap")``
  that the initiator holds as its first receiving chain.

Messages sent before the first round trip depend only on the identity keys
(as with version 1). From the first DH ratchet step on, the ratchet gives
forward secrecy and post-compromise security. ``Agent`` never uses this
path: agents use PQXDH with one-time prekeys (:mod:`agentmesh.crypto.pqxdh`).
No I/O.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

from agentmesh.codec import Reader, Writer
from agentmesh.crypto import primitives as p
from agentmesh.crypto.keypair import AgentKeyPair, public_identity_from_bundle
from agentmesh.crypto.ratchet import RatchetState
from agentmesh.crypto.session import Session, message_key_material
from agentmesh.errors import CryptoError, DecodeError
from agentmesh.protocol.envelope import Envelope, RatchetHeader, decode_envelope
from agentmesh.protocol.payload import decode_payload, encode_payload

_STATIC_INFO = b"AgentMesh_static_v1"
_BOOTSTRAP_INFO = b"AgentMesh_static_v1_bootstrap"
_AD_CONTEXT = b"AgentMesh-static-AD-v1"
_F = b"\xff" * 32


class CryptoSession:
    """A Double Ratchet session between two key pairs (version 1 name).

    ``encrypt``/``decrypt`` handle raw bytes; :func:`seal`/:func:`unseal`
    handle envelopes. Decryption is transactional: a failure changes nothing.
    """

    __slots__ = ("_session",)

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def session(self) -> Session:
        return self._session

    @property
    def peer_fingerprint(self) -> str:
        return self._session.peer_identity.fingerprint

    def encrypt(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        """Encrypt ``plaintext``; returns ``ratchet header || AES-GCM ciphertext``."""
        ratchet = self._session.ratchet
        header, message_key = ratchet.next_sending_key()
        encoded = Writer().raw(header.dh).u32(header.pn).u32(header.n).getvalue()
        key, nonce = message_key_material(message_key)
        ad = self._session.associated_data + encoded + associated_data
        return encoded + p.aes_gcm_encrypt(key, nonce, plaintext, ad)

    def decrypt(self, data: bytes, associated_data: bytes = b"") -> bytes:
        """Decrypt what the peer's :meth:`encrypt` produced. Raises CryptoError."""
        try:
            r = Reader(data, "ciphertext")
            header = RatchetHeader(r.raw(32), r.u32(), r.u32())
            ciphertext = r.rest()
        except DecodeError as exc:
            raise CryptoError("malformed ciphertext") from exc
        ratchet = self._session.ratchet.copy()
        message_key = ratchet.receiving_key(header, self._session.limits)
        key, nonce = message_key_material(message_key)
        ad = self._session.associated_data + data[:40] + associated_data
        plaintext = p.aes_gcm_decrypt(key, nonce, ciphertext, ad)
        self._session.ratchet = ratchet
        return plaintext


def perform_key_exchange(my_keypair: AgentKeyPair, their_bundle: dict[str, Any]) -> CryptoSession:
    """Build a ratchet session with the owner of ``their_bundle`` (a ``public_bundle()`` dict).

    Both sides call this with each other's bundle and get matching sessions.
    Raises CryptoError/DecodeError if the bundle's keys or binding signature are bad.
    """
    me = my_keypair.identity
    them = public_identity_from_bundle(their_bundle)
    if p.constant_time_equal(them.signing, me.public.signing):
        raise CryptoError("cannot perform a key exchange with oneself")
    dh = p.x25519(me.exchange_private, them.exchange)
    shared = p.hkdf_sha256(_F + dh, salt=bytes(32), info=_STATIC_INFO, length=32)
    bootstrap = p.hkdf_sha256(shared, salt=None, info=_BOOTSTRAP_INFO, length=32)
    lower, higher = sorted([me.public, them], key=lambda i: i.signing)
    ad = _AD_CONTEXT + lower.signing + lower.exchange + higher.signing + higher.exchange
    if lower is me.public:
        ratchet = RatchetState.initiator(shared, them.exchange)
        ratchet.ckr = bootstrap
    else:
        ratchet = RatchetState.responder(shared, p.x25519_private_bytes(me.exchange_private))
        ratchet.cks = bootstrap
    peer_id = str(their_bundle.get("agent_id", "")) or ""
    session = Session(
        local_id="",
        peer_id=peer_id,
        peer_identity=them,
        associated_data=ad,
        ratchet=ratchet,
        base_key=bytes(32),
    )
    return CryptoSession(session)


def seal(
    session: CryptoSession,
    sender_keypair: AgentKeyPair,
    sender_id: str,
    recipient_id: str,
    payload: dict[str, Any],
) -> Envelope:
    """Encrypt and sign ``payload`` into an :class:`Envelope` (``bytes(envelope)`` for the wire).

    The Ed25519 signature travels inside the ciphertext.
    """
    inner = session.session
    inner.local_id, inner.peer_id = sender_id, recipient_id
    return inner.encrypt(
        sender_keypair.identity,
        encode_payload(payload),
        message_id=os.urandom(16),
        timestamp_ms=int(time.time() * 1000),
    )


def unseal(
    session: CryptoSession, envelope: Envelope | bytes, sender_public_bundle: dict[str, Any]
) -> dict[str, Any]:
    """Decrypt ``envelope``, check the sender's signature, return the payload dict.

    Raises ReplayError ("Replay attack detected"), AuthenticationError
    ("Authentication tag mismatch"), SignatureError or CryptoError; on any
    error the session is unchanged.
    """
    if not isinstance(envelope, Envelope):
        try:
            envelope = decode_envelope(bytes(envelope))
        except DecodeError as exc:
            raise CryptoError(f"malformed envelope: {exc}") from exc
    sender = public_identity_from_bundle(sender_public_bundle)
    inner = session.session
    if not p.constant_time_equal(sender.signing, inner.peer_identity.signing):
        raise CryptoError("sender bundle does not match this session's peer")
    # address a copy, so that a failure leaves even the ids unchanged
    addressed = replace(inner, local_id=envelope.recipient, peer_id=envelope.sender)
    new, message = addressed.decrypt(envelope)
    if message.signature is None:
        raise CryptoError("message is not signed")
    try:
        payload = decode_payload(message.payload)
    except DecodeError as exc:
        raise CryptoError("malformed payload") from exc
    session._session = new
    return payload
