"""Sessions: PQXDH + Double Ratchet + the envelope, with transactional decryption.

* :class:`Session` is one ratchet session with one peer. ``encrypt`` mutates
  it (the caller persists the new state before transmitting); ``decrypt`` is
  *pure*: it returns a new session and leaves ``self`` untouched, so a forged,
  garbled or replayed envelope changes no state (Double Ratchet spec section
  3.5: "If an exception is raised … the message is discarded and changes to
  the state object are discarded").
* :class:`SessionRecord` holds a peer's active session plus a few archived
  ones (simultaneous initiation leaves two sessions; the peer may still be
  sending on the older one) and routes each envelope to the right one.

AEAD (Double Ratchet section 5.2, with AES-256-GCM in place of CBC+HMAC)::

    key || nonce = HKDF-SHA256(IKM = mk, salt = message_id,
                               info = "AgentMesh_v2_MessageKeys", 44)
    ciphertext   = AES-256-GCM(key, nonce, inner, AD = session AD || envelope header)

The random 16-byte message id (already in the authenticated header) is the
HKDF salt, so a sender whose ratchet state was rolled back (a restored backup,
a VM snapshot, a cloned container) and reuses a message key still encrypts
under a fresh key and nonce: no two-time pad, no GHASH key exposure (review
finding F-3). The receiver then refuses the reused counter (``ReplayError``).

The session AD is the PQXDH AD (section 3.3) followed by one byte of session
flags, which the initiator fixes in the initial message
(``PrekeyMessage.session_flags``). In a *signed* session (bit 0) every inner
plaintext carries an Ed25519 signature by the sender's identity key over
``"AgentMesh-msg-v2" || envelope header || payload``, and the receiver refuses a
message without one; in an unsigned session none carries one. Because the flags
are in the AD of every message, nobody who holds only the session's chain keys
(a thief of the state file) can strip the signatures and pass the rest off as
the peer's (review finding F-4); an agent with ``require_signatures`` refuses
to answer an unsigned initial message at all.

The inner plaintext is ``u8 flags || u32 len || payload [|| in_reply_to] [||
Ed25519 signature]``: flag 0x01 a signature, flag 0x02 a reply, whose 16-byte
``in_reply_to`` is the message id it answers (inside the ciphertext, so the hub
cannot link requests and replies), flag 0x04 a control message (for the agent
itself, never for its handlers: a session notice, see docs/PROTOCOL.md). A
reply's signature covers ``"AgentMesh-reply-v2" || envelope header ||
in_reply_to || payload`` instead, a control message's ``"AgentMesh-control-v2"
|| envelope header || payload``.
The signature travels *inside* the ciphertext, so only the recipient sees it:
auditability towards the recipient without giving the hub an oracle for
plaintext guesses.
No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from agentmesh.crypto import pqxdh
from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair, PublicIdentity
from agentmesh.crypto.prekeys import PrekeyBundle, PrekeySecrets
from agentmesh.crypto.ratchet import DEFAULT_LIMITS, RatchetLimits, RatchetState
from agentmesh.errors import (
    AuthenticationError,
    CryptoError,
    DecodeError,
    NoSessionError,
    SignatureError,
)
from agentmesh.wire.codec import Reader, Writer
from agentmesh.wire.envelope import (
    MESSAGE_ID_LEN,
    SESSION_SIGNED,
    Envelope,
    PrekeyMessage,
    encode_header,
    envelope_size,
)

#: ``check(public_key, signature, message)`` raises SignatureError unless the
#: Ed25519 signature is valid. The default verifies at once; a caller may pass one
#: that records the check to run it later, and must then discard every result that
#: depended on it unless it passed (see ``Agent.receive_envelopes``).
SignatureCheck = Callable[[bytes, bytes, bytes], None]

MESSAGE_KEYS_INFO = b"AgentMesh_v2_MessageKeys"
SIGNATURE_CONTEXT = b"AgentMesh-msg-v2"
REPLY_SIGNATURE_CONTEXT = b"AgentMesh-reply-v2"
CONTROL_SIGNATURE_CONTEXT = b"AgentMesh-control-v2"
_FLAG_SIGNED = 0x01
_FLAG_REPLY = 0x02
_FLAG_CONTROL = 0x04
#: 2: message keys bound to the message id, the signing mode in the AD (protocol 2).
_SESSION_VERSION = 2
MAX_ARCHIVED_SESSIONS = 4


def message_key_material(message_key: bytes, message_id: bytes) -> tuple[bytes, bytes]:
    """Derive the AES-256-GCM key and the 96-bit nonce from a message key and the
    message's random id (the HKDF salt; see the module docstring, finding F-3)."""
    out = p.hkdf_sha256(message_key, salt=message_id, info=MESSAGE_KEYS_INFO, length=44)
    return out[:32], out[32:]


def signed_message(
    header: bytes, payload: bytes, in_reply_to: bytes | None, control: bool = False
) -> bytes:
    """The bytes a message's Ed25519 signature covers (a reply and a control message
    have their own contexts, so neither can be passed off as the other kind)."""
    if control:
        if in_reply_to is not None:
            raise ValueError("a control message is not a reply")
        return CONTROL_SIGNATURE_CONTEXT + header + payload
    if in_reply_to is None:
        return SIGNATURE_CONTEXT + header + payload
    return REPLY_SIGNATURE_CONTEXT + header + in_reply_to + payload


def session_associated_data(handshake_ad: bytes, session_flags: int) -> bytes:
    """The AD every message of a session authenticates: the handshake's AD, then the
    session flags (so the signing mode cannot be changed after the handshake)."""
    return handshake_ad + bytes([session_flags])


@dataclass(frozen=True, slots=True)
class DecryptedMessage:
    """A decrypted envelope: the payload bytes, the signature if the sender signed, and
    the message id it answers if it is a reply."""

    envelope: Envelope
    payload: bytes
    signature: bytes | None
    in_reply_to: bytes | None = None
    #: A control message: for the agent, never for its handlers.
    control: bool = False


@dataclass(slots=True)
class Session:
    """One Double Ratchet session between ``local_id`` and ``peer_id``."""

    local_id: str
    peer_id: str
    peer_identity: PublicIdentity
    associated_data: bytes
    ratchet: RatchetState
    #: The initiator's PQXDH ephemeral key: names the session on both sides.
    base_key: bytes
    #: Initiator only: the initial-message fields, sent with every message until
    #: the first reply proves the peer has the session (PQXDH section 3.3).
    pending_prekey: PrekeyMessage | None = None
    sign_messages: bool = True
    limits: RatchetLimits = field(default=DEFAULT_LIMITS)

    # -- construction ------------------------------------------------------

    @classmethod
    def initiate(
        cls,
        identity: IdentityKeyPair,
        local_id: str,
        bundle: PrekeyBundle,
        *,
        sign_messages: bool = True,
        limits: RatchetLimits = DEFAULT_LIMITS,
        rng: p.RandomBytes = p.random_bytes,
    ) -> Session:
        """Start a session from a peer's prekey bundle (PQXDH section 3.3).

        ``sign_messages`` fixes the session's signing mode for both directions; it
        travels in the initial message and is authenticated by every message.
        """
        result = pqxdh.initiate(identity, local_id, bundle, rng)
        assert result.prekey_message is not None
        flags = SESSION_SIGNED if sign_messages else 0
        prekey_message = replace(result.prekey_message, session_flags=flags)
        return cls(
            local_id=local_id,
            peer_id=bundle.agent_id,
            peer_identity=bundle.identity,
            associated_data=session_associated_data(result.associated_data, flags),
            ratchet=RatchetState.initiator(result.shared_key, result.responder_ratchet_public, rng),
            base_key=prekey_message.ephemeral,
            pending_prekey=prekey_message,
            sign_messages=sign_messages,
            limits=limits,
        )

    def copy(self) -> Session:
        return replace(self, ratchet=self.ratchet.copy())

    # -- encryption --------------------------------------------------------

    def encrypt(
        self,
        identity: IdentityKeyPair,
        payload: bytes,
        *,
        message_id: bytes,
        timestamp_ms: int,
        in_reply_to: bytes | None = None,
        control: bool = False,
    ) -> Envelope:
        """Encrypt one payload into an envelope. Mutates the session (advance the chain).

        ``in_reply_to``: the 16-byte id of the message this one answers (a reply).
        ``control``: a message for the peer agent itself, not for its handlers.
        """
        if len(message_id) != MESSAGE_ID_LEN:
            raise ValueError("message_id must be 16 bytes")
        if in_reply_to is not None and len(in_reply_to) != MESSAGE_ID_LEN:
            raise ValueError("in_reply_to must be a 16-byte message id")
        if control and in_reply_to is not None:
            raise ValueError("a control message is not a reply")
        ratchet_header, message_key = self.ratchet.next_sending_key()
        header = encode_header(
            message_id,
            timestamp_ms,
            self.local_id,
            self.peer_id,
            ratchet_header,
            self.pending_prekey,
        )
        flags = (
            (_FLAG_SIGNED if self.sign_messages else 0)
            | (_FLAG_REPLY if in_reply_to is not None else 0)
            | (_FLAG_CONTROL if control else 0)
        )
        inner = Writer().u8(flags).bytes32(payload)
        if in_reply_to is not None:
            inner.raw(in_reply_to)
        if self.sign_messages:
            inner.raw(identity.sign(signed_message(header, payload, in_reply_to, control)))
        key, nonce = message_key_material(message_key, message_id)
        ciphertext = p.aes_gcm_encrypt(key, nonce, inner.getvalue(), self.associated_data + header)
        return Envelope(
            message_id=message_id,
            timestamp=timestamp_ms,
            sender=self.local_id,
            recipient=self.peer_id,
            ratchet=ratchet_header,
            prekey=self.pending_prekey,
            ciphertext=ciphertext,
            header_bytes=header,
        )

    def envelope_size(self, payload_len: int, *, reply: bool = False) -> int:
        """The exact size of the envelope :meth:`encrypt` would make for a payload of
        ``payload_len`` bytes now (nothing is derived or changed)."""
        inner = 1 + 4 + payload_len + (MESSAGE_ID_LEN if reply else 0)
        inner += 64 if self.sign_messages else 0
        return envelope_size(self.local_id, self.peer_id, self.pending_prekey, inner + 16)

    # -- decryption --------------------------------------------------------

    def decrypt(
        self,
        envelope: Envelope,
        rng: p.RandomBytes = p.random_bytes,
        *,
        check_signature: SignatureCheck = p.ed25519_verify,
    ) -> tuple[Session, DecryptedMessage]:
        """Decrypt on a copy; return ``(new_session, message)``. ``self`` never changes.

        Raises AuthenticationError ("Authentication tag mismatch"), ReplayError
        ("Replay attack detected"), SignatureError or CryptoError. A signed
        message's signature goes through ``check_signature`` (see SignatureCheck);
        in a signed session a message without a signature raises SignatureError,
        and in an unsigned session a message with one raises CryptoError.
        """
        if envelope.sender != self.peer_id or envelope.recipient != self.local_id:
            raise AuthenticationError("envelope is not addressed to this session")
        new = self.copy()
        message_key = new.ratchet.receiving_key(envelope.ratchet, self.limits, rng)
        key, nonce = message_key_material(message_key, envelope.message_id)
        inner = p.aes_gcm_decrypt(
            key, nonce, envelope.ciphertext, self.associated_data + envelope.header_bytes
        )
        try:
            r = Reader(inner, "inner plaintext")
            flags = r.u8()
            if flags & ~(_FLAG_SIGNED | _FLAG_REPLY | _FLAG_CONTROL) or (
                flags & _FLAG_REPLY and flags & _FLAG_CONTROL
            ):
                raise DecodeError("inner plaintext: unknown flags")
            payload = r.bytes32(len(inner))
            in_reply_to = r.raw(MESSAGE_ID_LEN) if flags & _FLAG_REPLY else None
            signature = r.raw(64) if flags & _FLAG_SIGNED else None
            r.finish()
        except DecodeError as exc:
            raise CryptoError("malformed inner plaintext") from exc
        if signature is None:
            if self.sign_messages:  # finding F-4: signatures cannot be left out
                raise SignatureError("unsigned message in a signed session")
        else:
            if not self.sign_messages:
                raise CryptoError("signed message in an unsigned session")
            check_signature(
                self.peer_identity.signing,
                signature,
                signed_message(
                    envelope.header_bytes, payload, in_reply_to, bool(flags & _FLAG_CONTROL)
                ),
            )
        # The peer has the session once it has answered (PQXDH section 3.3).
        new.pending_prekey = None if envelope.prekey is None else new.pending_prekey
        control = bool(flags & _FLAG_CONTROL)
        return new, DecryptedMessage(envelope, payload, signature, in_reply_to, control)

    # -- serialization -----------------------------------------------------

    def to_bytes(self) -> bytes:
        w = Writer().u8(_SESSION_VERSION).str8(self.local_id).str8(self.peer_id)
        w.raw(self.peer_identity.encode()).bytes16(self.associated_data).raw(self.base_key)
        w.u8(1 if self.sign_messages else 0)
        w.u32(self.limits.max_skip).u32(self.limits.max_skipped_total)
        w.u32(self.limits.max_skip_age_steps)
        if self.pending_prekey is None:
            w.u8(0)
        else:
            w.u8(1).bytes16(_encode_prekey_message(self.pending_prekey))
        self.ratchet.write(w)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Session:
        r = Reader(data, "session state")
        session = cls.read(r)
        r.finish()
        return session

    @classmethod
    def read(cls, r: Reader) -> Session:
        if r.u8() != _SESSION_VERSION:
            raise DecodeError("session state: unsupported version")
        local_id, peer_id = r.str8(64), r.str8(64)
        peer_identity = PublicIdentity.read(r)
        ad = r.bytes16()
        base_key = r.raw(32)
        sign = r.u8()
        limits = RatchetLimits(r.u32(), r.u32(), r.u32())
        pending = _decode_prekey_message(r.bytes16()) if r.u8() else None
        ratchet = RatchetState.read(r)
        return cls(
            local_id, peer_id, peer_identity, ad, ratchet, base_key, pending, sign == 1, limits
        )


def _encode_prekey_message(m: PrekeyMessage) -> bytes:
    w = Writer().u8(m.session_flags)
    w.raw(m.identity_signing).raw(m.identity_exchange).raw(m.identity_binding)
    w.raw(m.ephemeral).u32(m.signed_prekey_id).u32(m.kem_prekey_id).raw(m.kem_ciphertext)
    if m.one_time_prekey_id is None:
        w.u8(0)
    else:
        w.u8(1).u32(m.one_time_prekey_id)
    return w.getvalue()


def _decode_prekey_message(data: bytes) -> PrekeyMessage:
    r = Reader(data, "prekey message")
    flags = r.u8()
    if flags & ~SESSION_SIGNED:
        raise DecodeError("prekey message: unknown session flags")
    fields = (r.raw(32), r.raw(32), r.raw(64), r.raw(32), r.u32(), r.u32(), r.raw(1088))
    opk = r.u32() if r.u8() else None
    r.finish()
    return PrekeyMessage(*fields, opk, flags)


@dataclass(slots=True)
class SessionRecord:
    """A peer's sessions: the active one first, then up to MAX_ARCHIVED_SESSIONS older ones."""

    sessions: list[Session] = field(default_factory=list)

    @property
    def active(self) -> Session | None:
        return self.sessions[0] if self.sessions else None

    def copy(self) -> SessionRecord:
        return SessionRecord(list(self.sessions))

    def promote(self, session: Session, *, replaces: Session | None = None) -> SessionRecord:
        """A new record with ``session`` active (and ``replaces`` removed, if given)."""
        rest = [s for s in self.sessions if s is not replaces]
        return SessionRecord([session, *rest][: MAX_ARCHIVED_SESSIONS + 1])

    def decrypt(
        self,
        envelope: Envelope,
        *,
        identity: IdentityKeyPair,
        prekeys: PrekeySecrets,
        require_signatures: bool = True,
        limits: RatchetLimits = DEFAULT_LIMITS,
        rng: p.RandomBytes = p.random_bytes,
        check_signature: SignatureCheck = p.ed25519_verify,
    ) -> tuple[SessionRecord, PrekeySecrets | None, DecryptedMessage]:
        """Decrypt with whichever session fits; pure.

        Returns the new record, new prekey secrets if a one-time key was
        consumed (else None), and the message. Raises CryptoError subclasses;
        on any error nothing here or in ``prekeys`` has changed.
        ``check_signature`` is used for normal envelopes only: a prekey
        envelope's signature is always verified at once. A new session takes
        its signing mode from the initial message; with ``require_signatures``
        an unsigned one is refused (SignatureError) before any key is used.
        """
        if envelope.prekey is not None:
            for session in self.sessions:
                if p.constant_time_equal(session.base_key, envelope.prekey.ephemeral):
                    new, message = session.decrypt(envelope, rng)
                    return self.promote(new, replaces=session), None, message
            flags = envelope.prekey.session_flags
            if require_signatures and not flags & SESSION_SIGNED:
                raise SignatureError("the peer opened an unsigned session; signatures are required")
            new_prekeys = prekeys.copy()
            result, spk_private = pqxdh.respond(
                identity, envelope.recipient, new_prekeys, envelope.sender, envelope.prekey
            )
            fresh = Session(
                local_id=envelope.recipient,
                peer_id=envelope.sender,
                peer_identity=PublicIdentity(
                    envelope.prekey.identity_signing,
                    envelope.prekey.identity_exchange,
                    envelope.prekey.identity_binding,
                ),
                associated_data=session_associated_data(result.associated_data, flags),
                ratchet=RatchetState.responder(result.shared_key, spk_private),
                base_key=envelope.prekey.ephemeral,
                sign_messages=bool(flags & SESSION_SIGNED),
                limits=limits,
            )
            new, message = fresh.decrypt(envelope, rng)
            new_prekeys.consume(envelope.prekey.one_time_prekey_id, envelope.prekey.kem_prekey_id)
            return self.promote(new), new_prekeys, message
        first_error: CryptoError | None = None
        for session in self.sessions:
            try:
                new, message = session.decrypt(envelope, rng, check_signature=check_signature)
            except CryptoError as exc:
                first_error = first_error or exc
                continue
            return self.promote(new, replaces=session), None, message
        if first_error is not None:
            raise first_error
        raise NoSessionError(f"no session with {envelope.sender!r} for this message")

    def to_bytes(self) -> bytes:
        w = Writer().u8(1).u8(len(self.sessions))
        for session in self.sessions:
            w.bytes32(session.to_bytes())
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionRecord:
        r = Reader(data, "session record")
        if r.u8() != 1:
            raise DecodeError("session record: unsupported version")
        count = r.u8()
        if count > MAX_ARCHIVED_SESSIONS + 1:
            raise DecodeError("session record: too many sessions")
        sessions = [Session.from_bytes(r.bytes32(64 * 1024 * 1024)) for _ in range(count)]
        r.finish()
        return cls(sessions)
