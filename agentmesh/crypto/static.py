"""Version 1's ``CryptoSession``, ``perform_key_exchange``, ``seal`` and ``unseal``.

Version 1 derived one static key from the two identities' X25519 keys and
encrypted everything with it. These names keep their call shapes but run a
Double Ratchet (spec revision 1, section 3) whose every sending chain starts
from fresh randomness, so no two sessions ever share a message key or nonce
(review finding F-1: protocol 1 gave the responder a "bootstrap" sending chain
derived from the identity keys alone, so every session between the same two
key pairs encrypted message N under the same key and nonce)::

    SK = HKDF-SHA256(salt = 0^32, IKM = 0xFF^32 || DH(IK_A, IK_B), info = "AgentMesh_static_v2")

Both sides start with nothing but ``SK`` and the peer's X25519 identity key.
Whoever sends first *initiates*: RatchetInitAlice (section 3.3) with a fresh
ratchet key pair and the peer's identity key as ``DHr``, so its first chain is
``KDF_RK(SK, DH(fresh, IK_peer))`` and the fresh public key travels in every
header. The receiver answers with RatchetInitBob (its identity key as ``DHs``)
and the DH ratchet step of section 3.5, which draws its own fresh key pair
before it sends anything. If both send first (simultaneous initiation), each
keeps the session it started and the one it answered, and each message is
decrypted by whichever fits (as Signal's session records do). An object answers
an initiation only until it has decrypted its first message: one answer, and
none once a session it started has heard back. With per-sender order (which
hubs keep) a peer's initiating messages always come before its replies, so no
honest message is refused by that rule.

What a bare :class:`CryptoSession` cannot detect, because it keeps no state
outside the object: a recording of the *first* messages of another session
between the same two key pairs, replayed into a ``CryptoSession`` that has not
decrypted anything yet, is accepted once. Within one object, and in any object
that has decrypted a message, such replays are refused (``ReplayError`` or
``CryptoError``). Cross-session replay protection needs persisted
state: :class:`agentmesh.Agent` keeps a durable replay window and uses PQXDH
with one-time prekeys instead of this path. ``perform_key_exchange`` therefore
issues a ``DeprecationWarning``. Messages before the first reply depend on the
identity keys (a thief of either key file who recorded them can read them);
from the first DH ratchet step on, the ratchet gives forward secrecy.
No I/O.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair, PublicIdentity
from agentmesh.crypto.keypair import AgentKeyPair, public_identity_from_bundle
from agentmesh.crypto.ratchet import RatchetState
from agentmesh.crypto.session import Session, message_key_material, session_associated_data
from agentmesh.errors import CryptoError, DecodeError, NoSessionError
from agentmesh.wire.codec import Reader, Writer
from agentmesh.wire.envelope import SESSION_SIGNED, Envelope, RatchetHeader, decode_envelope
from agentmesh.wire.payload import decode_payload, encode_payload

_STATIC_INFO = b"AgentMesh_static_v2"
_AD_CONTEXT = b"AgentMesh-static-AD-v2"
_F = b"\xff" * 32
#: The raw ``encrypt`` has no message id; its keys are unique per session and counter.
_RAW_MESSAGE_ID = b""
#: The session this side started and the one it answered (simultaneous initiation).
_MAX_SESSIONS = 2
_DEPRECATION = (
    "perform_key_exchange/CryptoSession/seal/unseal are version 1's low-level API: a bare "
    "CryptoSession cannot refuse messages replayed from another session. Use agentmesh.Agent, "
    "which runs PQXDH with one-time prekeys and keeps a durable replay window."
)

_T = TypeVar("_T")


class CryptoSession:
    """A Double Ratchet session between two key pairs (version 1 name).

    Made by :func:`perform_key_exchange`. ``encrypt``/``decrypt`` handle raw
    bytes; :func:`seal`/:func:`unseal` handle envelopes. Either side may speak
    first. Decryption is transactional: a failure changes nothing.
    """

    __slots__ = (
        "_ad",
        "_open_to_initiation",
        "_own_private",
        "_peer",
        "_rng",
        "_sessions",
        "_shared",
    )

    def __init__(
        self,
        me: IdentityKeyPair,
        peer: PublicIdentity,
        *,
        rng: p.RandomBytes = p.random_bytes,
    ) -> None:
        if p.constant_time_equal(peer.signing, me.public.signing):
            raise CryptoError("cannot perform a key exchange with oneself")
        dh = p.x25519(me.exchange_private, peer.exchange)
        self._shared = p.hkdf_sha256(_F + dh, salt=bytes(32), info=_STATIC_INFO, length=32)
        lower, higher = sorted([me.public, peer], key=lambda i: i.signing)
        ad = _AD_CONTEXT + lower.signing + lower.exchange + higher.signing + higher.exchange
        self._ad = session_associated_data(ad, SESSION_SIGNED)
        self._own_private = p.x25519_private_bytes(me.exchange_private)
        self._peer = peer
        self._rng = rng
        #: The session that sent or received last first, then the other one.
        self._sessions: list[Session] = []
        #: Whether a message may still start a session answered here (see the module
        #: docstring): until the first message decrypts.
        self._open_to_initiation = True

    @property
    def peer_fingerprint(self) -> str:
        return self._peer.fingerprint

    def _session(self, ratchet: RatchetState) -> Session:
        return Session(
            local_id="",
            peer_id="",
            peer_identity=self._peer,
            associated_data=self._ad,
            ratchet=ratchet,
            base_key=bytes(32),
        )

    def _sending(self) -> Session:
        """The session to send on; starts one (fresh ratchet key) if there is none.

        Every session in the list can send: an initiated one from the start, an
        answered one from its first DH ratchet step.
        """
        if not self._sessions:
            ratchet = RatchetState.initiator(self._shared, self._peer.exchange, self._rng)
            self._sessions.append(self._session(ratchet))
        return self._sessions[0]

    def _open(self, attempt: Callable[[Session], tuple[Session, _T]]) -> _T:
        """Run ``attempt`` on each session (it must not mutate its argument), then, until
        the first message decrypts, on an answer to the peer's initiation; keep the
        first that works."""
        first_error: CryptoError | None = None
        for session in self._sessions:
            try:
                new, result = attempt(session)
            except CryptoError as exc:
                first_error = first_error or exc
                continue
            self._sessions = [new, *(s for s in self._sessions if s is not session)]
            self._open_to_initiation = False
            return result
        if self._open_to_initiation:
            responder = RatchetState.responder(self._shared, self._own_private)
            try:
                new, result = attempt(self._session(responder))
            except CryptoError as exc:
                first_error = first_error or exc
            else:
                self._open_to_initiation = False
                self._sessions = [new, *self._sessions][:_MAX_SESSIONS]
                return result
        raise first_error or NoSessionError("no session can decrypt this message")

    def _snapshot(self) -> bytes:
        """The whole state as bytes (tests compare it before and after a failure)."""
        w = Writer().u8(1 if self._open_to_initiation else 0).u8(len(self._sessions))
        for session in self._sessions:
            w.bytes32(session.to_bytes())
        return w.getvalue()

    def encrypt(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        """Encrypt ``plaintext``; returns ``ratchet header || AES-GCM ciphertext``."""
        session = self._sending()
        header, message_key = session.ratchet.next_sending_key()
        encoded = Writer().raw(header.dh).u32(header.pn).u32(header.n).getvalue()
        key, nonce = message_key_material(message_key, _RAW_MESSAGE_ID)
        ad = session.associated_data + encoded + associated_data
        return encoded + p.aes_gcm_encrypt(key, nonce, plaintext, ad)

    def decrypt(self, data: bytes, associated_data: bytes = b"") -> bytes:
        """Decrypt what the peer's :meth:`encrypt` produced. Raises CryptoError."""
        try:
            r = Reader(data, "ciphertext")
            header = RatchetHeader(r.raw(32), r.u32(), r.u32())
            ciphertext = r.rest()
        except DecodeError as exc:
            raise CryptoError("malformed ciphertext") from exc

        def attempt(session: Session) -> tuple[Session, bytes]:
            ratchet = session.ratchet.copy()
            message_key = ratchet.receiving_key(header, session.limits, self._rng)
            key, nonce = message_key_material(message_key, _RAW_MESSAGE_ID)
            ad = session.associated_data + data[:40] + associated_data
            plaintext = p.aes_gcm_decrypt(key, nonce, ciphertext, ad)
            return replace(session, ratchet=ratchet), plaintext

        return self._open(attempt)


def perform_key_exchange(
    my_keypair: AgentKeyPair,
    their_bundle: dict[str, Any],
    *,
    _rng: p.RandomBytes = p.random_bytes,
) -> CryptoSession:
    """Build a ratchet session with the owner of ``their_bundle`` (a ``public_bundle()`` dict).

    Both sides call this with each other's bundle and get matching sessions.
    Raises CryptoError/DecodeError if the bundle's keys or binding signature are
    bad. Issues a DeprecationWarning: see the module docstring for what a bare
    session cannot detect, and use :class:`agentmesh.Agent` instead. ``_rng`` is
    a test hook for deterministic ratchet keys.
    """
    warnings.warn(_DEPRECATION, DeprecationWarning, stacklevel=2)
    return CryptoSession(my_keypair.identity, public_identity_from_bundle(their_bundle), rng=_rng)


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
    inner = session._sending()
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
    ("Authentication tag mismatch"), SignatureError (also for an unsigned
    envelope) or CryptoError; on any error the session is unchanged.
    """
    if not isinstance(envelope, Envelope):
        try:
            envelope = decode_envelope(bytes(envelope))
        except DecodeError as exc:
            raise CryptoError(f"malformed envelope: {exc}") from exc
    sender = public_identity_from_bundle(sender_public_bundle)
    if not p.constant_time_equal(sender.signing, session._peer.signing):
        raise CryptoError("sender bundle does not match this session's peer")
    sealed = envelope

    def attempt(inner: Session) -> tuple[Session, dict[str, Any]]:
        # address a copy, so that a failure leaves even the ids unchanged
        addressed = replace(inner, local_id=sealed.recipient, peer_id=sealed.sender)
        new, message = addressed.decrypt(sealed, session._rng)
        try:
            return new, decode_payload(message.payload)
        except DecodeError as exc:
            raise CryptoError("malformed payload") from exc

    return session._open(attempt)
