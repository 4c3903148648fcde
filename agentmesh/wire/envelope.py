"""The end-to-end envelope: a versioned, strict, binary-safe encoding.

Layout (all integers big-endian; see docs/PROTOCOL.md, "Envelope")::

    u8      version            = 2 (version 1's message keys ignored the message id)
    u8      kind               1 = prekey (carries the PQXDH initial message), 2 = normal
    16      message_id         random 128-bit id, the replay/dedupe key
    u64     timestamp_ms       sender's clock
    str8    sender             agent id (validated, <= 64 bytes)
    str8    recipient          agent id
    32      ratchet_dh         Double Ratchet header: sender's current ratchet key
    u32     previous_chain_len (PN)
    u32     message_number     (N)
    [prekey kind only]
    u8      session_flags      bit 0: a signed session (every message carries an
                               Ed25519 signature); other bits must be 0
    32      identity_signing   sender's Ed25519 identity key
    32      identity_exchange  sender's X25519 identity key
    64      identity_binding   Ed25519 signature binding the two
    32      ephemeral          PQXDH ephemeral key EK_A
    u32     signed_prekey_id
    u32     kem_prekey_id
    1088    kem_ciphertext     ML-KEM-768 ciphertext
    u8      has_one_time_prekey (0 or 1)
    [u32    one_time_prekey_id]  present iff has_one_time_prekey == 1
    [end prekey]
    u32     ciphertext length, then the AES-256-GCM ciphertext and tag

Everything before the ciphertext length is the *header*; the AEAD
authenticates all of it. Parsing rejects unknown versions and kinds, bad
lengths, invalid agent ids, oversize ciphertexts and trailing bytes with
:class:`~agentmesh.errors.DecodeError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from agentmesh.errors import DecodeError
from agentmesh.ids import InvalidAgentIdError, validate_agent_id
from agentmesh.wire.codec import Reader, Writer

ENVELOPE_VERSION = 2
KIND_PREKEY = 1
KIND_NORMAL = 2
MESSAGE_ID_LEN = 16
#: ``PrekeyMessage.session_flags``: the session's messages are all signed.
SESSION_SIGNED = 0x01
#: Upper bound for the ciphertext of one envelope (payload + inner signature + tag).
MAX_CIPHERTEXT_LEN = 16 * 1024 * 1024
_NO_OPK = 0


@dataclass(frozen=True, slots=True)
class RatchetHeader:
    """Double Ratchet message header (spec section 3.4: HEADER(dh_pair, pn, n))."""

    dh: bytes
    pn: int
    n: int


@dataclass(frozen=True, slots=True)
class PrekeyMessage:
    """The PQXDH initial-message fields (PQXDH rev 3, section 3.3), plus the session's
    flags, which the initiator fixes here and both sides authenticate in every message
    (they are part of the session's associated data, see ``crypto/session.py``)."""

    identity_signing: bytes
    identity_exchange: bytes
    identity_binding: bytes
    ephemeral: bytes
    signed_prekey_id: int
    kem_prekey_id: int
    kem_ciphertext: bytes
    one_time_prekey_id: int | None
    session_flags: int = SESSION_SIGNED


@dataclass(frozen=True, slots=True)
class Envelope:
    """One encrypted message as it travels through a hub.

    ``header_bytes`` is the exact encoded header the AEAD authenticated; keep it
    rather than re-encoding so that parsing and verification see the same bytes.
    """

    message_id: bytes
    timestamp: int
    sender: str
    recipient: str
    ratchet: RatchetHeader
    prekey: PrekeyMessage | None
    ciphertext: bytes
    header_bytes: bytes = field(repr=False, compare=False, default=b"")

    @property
    def kind(self) -> int:
        return KIND_PREKEY if self.prekey is not None else KIND_NORMAL

    def to_bytes(self) -> bytes:
        header = self.header_bytes or encode_header(
            self.message_id, self.timestamp, self.sender, self.recipient, self.ratchet, self.prekey
        )
        return header + len(self.ciphertext).to_bytes(4, "big") + self.ciphertext

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        return decode_envelope(data)


def envelope_size(
    sender: str, recipient: str, prekey: PrekeyMessage | None, ciphertext_len: int
) -> int:
    """The exact length of an envelope with these fields (see the layout above)."""
    size = 2 + MESSAGE_ID_LEN + 8 + 2 + len(sender.encode()) + len(recipient.encode()) + 40
    if prekey is not None:
        size += 1 + 32 + 32 + 64 + 32 + 8 + 1088 + 1
        size += 4 if prekey.one_time_prekey_id is not None else 0
    return size + 4 + ciphertext_len


def encode_header(
    message_id: bytes,
    timestamp: int,
    sender: str,
    recipient: str,
    ratchet: RatchetHeader,
    prekey: PrekeyMessage | None,
) -> bytes:
    """Encode the authenticated header. Raises ValueError for out-of-range fields."""
    if len(message_id) != MESSAGE_ID_LEN:
        raise ValueError("message id must be 16 bytes")
    if len(ratchet.dh) != 32:
        raise ValueError("ratchet key must be 32 bytes")
    w = Writer()
    w.u8(ENVELOPE_VERSION).u8(KIND_PREKEY if prekey is not None else KIND_NORMAL)
    w.raw(message_id).u64(timestamp)
    w.str8(validate_agent_id(sender)).str8(validate_agent_id(recipient))
    w.raw(ratchet.dh).u32(ratchet.pn).u32(ratchet.n)
    if prekey is not None:
        if prekey.session_flags & ~SESSION_SIGNED:
            raise ValueError("unknown session flags")
        w.u8(prekey.session_flags)
        w.raw(prekey.identity_signing).raw(prekey.identity_exchange).raw(prekey.identity_binding)
        w.raw(prekey.ephemeral).u32(prekey.signed_prekey_id).u32(prekey.kem_prekey_id)
        if len(prekey.kem_ciphertext) != 1088:
            raise ValueError("KEM ciphertext must be 1088 bytes")
        w.raw(prekey.kem_ciphertext)
        if prekey.one_time_prekey_id is None:
            w.u8(0)
        else:
            w.u8(1).u32(prekey.one_time_prekey_id)
    return w.getvalue()


def _agent_id(r: Reader) -> str:
    text = r.str8(64)
    try:
        return validate_agent_id(text)
    except InvalidAgentIdError as exc:
        raise DecodeError(f"envelope: {exc}") from exc


_HEAD = struct.Struct(">BB16sQ")  # version, kind, message id, timestamp
_RATCHET = struct.Struct(">32sII")
_LENGTH = struct.Struct(">I")
_MIN_NORMAL = _HEAD.size + 2 + _RATCHET.size + _LENGTH.size + 16


def decode_envelope(data: bytes, *, max_ciphertext: int = MAX_CIPHERTEXT_LEN) -> Envelope:
    """Parse an envelope strictly. Raises DecodeError on any malformation."""
    fast = _decode_normal(data, max_ciphertext) if type(data) is bytes else None
    return fast if fast is not None else _decode_strict(data, max_ciphertext)


def _decode_normal(data: bytes, max_ciphertext: int) -> Envelope | None:
    """The common case (a well-formed normal envelope) in a few slices; None for anything
    else, which :func:`_decode_strict` then parses (or refuses) with the same rules."""
    size = len(data)
    if size < _MIN_NORMAL or data[0] != ENVELOPE_VERSION or data[1] != KIND_NORMAL:
        return None
    sender_end = 27 + data[26]
    if sender_end >= size:
        return None
    recipient_end = sender_end + 1 + data[sender_end]
    header_end = recipient_end + _RATCHET.size
    if header_end + 4 > size:
        return None
    (length,) = _LENGTH.unpack_from(data, header_end)
    if not 16 <= length <= max_ciphertext or header_end + 4 + length != size:
        return None
    try:
        sender = validate_agent_id(data[27:sender_end].decode("utf-8"))
        recipient = validate_agent_id(data[sender_end + 1 : recipient_end].decode("utf-8"))
    except (UnicodeDecodeError, InvalidAgentIdError):
        return None
    _, _, message_id, timestamp = _HEAD.unpack_from(data)
    dh, pn, n = _RATCHET.unpack_from(data, recipient_end)
    return Envelope(
        message_id=message_id,
        timestamp=timestamp,
        sender=sender,
        recipient=recipient,
        ratchet=RatchetHeader(dh, pn, n),
        prekey=None,
        ciphertext=data[header_end + 4 :],
        header_bytes=data[:header_end],
    )


def _decode_strict(data: bytes, max_ciphertext: int) -> Envelope:
    r = Reader(data, "envelope")
    version = r.u8()
    if version != ENVELOPE_VERSION:
        raise DecodeError(f"envelope: unsupported version {version}")
    kind = r.u8()
    if kind not in (KIND_PREKEY, KIND_NORMAL):
        raise DecodeError(f"envelope: unknown kind {kind}")
    message_id = r.raw(MESSAGE_ID_LEN)
    timestamp = r.u64()
    sender = _agent_id(r)
    recipient = _agent_id(r)
    ratchet = RatchetHeader(dh=r.raw(32), pn=r.u32(), n=r.u32())
    prekey: PrekeyMessage | None = None
    if kind == KIND_PREKEY:
        session_flags = r.u8()
        if session_flags & ~SESSION_SIGNED:
            raise DecodeError("envelope: unknown session flags")
        signing, exchange, binding = r.raw(32), r.raw(32), r.raw(64)
        ephemeral = r.raw(32)
        spk_id, kem_id = r.u32(), r.u32()
        kem_ct = r.raw(1088)
        flag = r.u8()
        if flag not in (0, 1):
            raise DecodeError("envelope: bad one-time prekey flag")
        opk_id = r.u32() if flag == 1 else None
        prekey = PrekeyMessage(
            signing, exchange, binding, ephemeral, spk_id, kem_id, kem_ct, opk_id, session_flags
        )
    header_len = r.position
    ciphertext = r.bytes32(max_ciphertext)
    if len(ciphertext) < 16:
        raise DecodeError("envelope: ciphertext shorter than the GCM tag")
    r.finish()
    return Envelope(
        message_id=message_id,
        timestamp=timestamp,
        sender=sender,
        recipient=recipient,
        ratchet=ratchet,
        prekey=prekey,
        ciphertext=ciphertext,
        header_bytes=bytes(data[:header_len]),
    )
