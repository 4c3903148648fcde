"""The hub wire protocol's frames: an I/O-free, strict binary codec.

Every frame on a hub connection (client <-> hub, plain TCP or TLS) is::

    u32     length      number of bytes that follow (type + body), 1..max_frame_size
    u8      type        one of the codes in :data:`FRAME_TYPES`
    ...     body        the frame's fields (big-endian, see each class)

Bodies are built with :class:`agentmesh.wire.codec.Writer` and parsed with
:class:`agentmesh.wire.codec.Reader`, so parsing is strict: an unknown type, a bad
length, an overrun, an invalid agent id or trailing bytes raise
:class:`~agentmesh.errors.DecodeError`. No JSON and no base64 on this path.

``u32 request_id`` on a request is echoed by its response so a client can
pipeline requests. 0 means "no request" (an ERROR not tied to a request).
``bool`` fields are a u8 that must be 0 or 1.

This module performs no I/O and imports nothing beyond ``agentmesh.wire.codec``,
``agentmesh.errors`` and ``agentmesh.ids``. The table of frames is in
docs/PROTOCOL.md ("Hub frames").
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from agentmesh.errors import DecodeError
from agentmesh.ids import InvalidAgentIdError, validate_agent_id
from agentmesh.wire.codec import Reader, Writer

#: Size of the length prefix.
LENGTH_PREFIX = 4
#: Default upper bound for ``length`` (type byte + body) a decoder accepts.
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024 + 64 * 1024
#: Length of an Ed25519 public key / signature, of a hub nonce and of a message id.
KEY_LEN = 32
SIGNATURE_LEN = 64
NONCE_LEN = 32
MESSAGE_ID_LEN = 16
#: Largest u32; field values above it cannot be encoded.
_U32_MAX = 0xFFFFFFFF
#: The first protocol version whose LOGIN carries the hub address and channel binding.
LOGIN_BINDING_VERSION = 2
#: ``Login.flags`` bit 0: the agent keeps no key file, so its id is bound ephemerally
#: (another key may take the id over once this one is disconnected).
LOGIN_EPHEMERAL = 0x01
_LOGIN_FLAGS = LOGIN_EPHEMERAL
#: Longest channel binding a LOGIN may carry (SHA-256 needs 32).
MAX_CHANNEL_BINDING_LEN = 64
#: Largest ERROR text in UTF-8 bytes: enough for any explanation, small enough to log.
MAX_ERROR_TEXT = 1024
#: An ERROR code: a machine-readable word, never anything a log reader could misread.
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


class FrameTooLargeError(DecodeError):
    """A frame declared a length above the decoder's ``max_frame_size``."""


def _read_bool(r: Reader, what: str) -> bool:
    value = r.u8()
    if value not in (0, 1):
        raise DecodeError(f"{what}: boolean field is {value}, not 0 or 1")
    return value == 1


def _read_agent_id(r: Reader, what: str) -> str:
    text = r.str8(64)
    try:
        return validate_agent_id(text)
    except InvalidAgentIdError as exc:
        raise DecodeError(f"{what}: {exc}") from exc


def printable_text(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text`` with every non-printable character escaped, cut at ``limit`` UTF-8 bytes.

    Escaping (rather than dropping) keeps an explanation readable; the cut never
    splits a UTF-8 sequence.
    """
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


class Frame:
    """Base of every frame class. Subclasses are frozen dataclasses.

    ``TYPE`` is the wire code; :meth:`write_body` and :meth:`read_body` encode
    and strictly parse the body (without the length prefix and type byte).
    """

    __slots__ = ()
    TYPE: ClassVar[int]

    def write_body(self, w: Writer) -> None:
        raise NotImplementedError

    @classmethod
    def read_body(cls, r: Reader) -> Frame:
        raise NotImplementedError


# --- session ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RequestIdOnly(Frame):
    """Body: ``u32 request_id`` and nothing else."""

    request_id: int

    def write_body(self, w: Writer) -> None:
        w.u32(self.request_id)

    @classmethod
    def read_body(cls, r: Reader) -> Frame:
        return cls(r.u32())


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """Hub -> client, first frame: ``u16 version, 32 nonce, str8 hub_address,
    u32 max_frame_size, u32 max_envelope_bytes``. ``version`` is the highest
    protocol version the hub speaks; the nonce is fresh random per connection.

    Since version 2 ``hub_address`` lists every name the hub answers to, comma
    separated (``host:port,host:port``); :mod:`agentmesh.protocol.hub_protocol`
    parses it. The layout is version 1's, so an older client can still read
    the version and be refused with ``unsupported_version``."""

    TYPE: ClassVar[int] = 0x01
    version: int
    nonce: bytes
    hub_address: str
    max_frame_size: int
    max_envelope_bytes: int

    def write_body(self, w: Writer) -> None:
        if len(self.nonce) != NONCE_LEN:
            raise ValueError("nonce must be 32 bytes")
        w.u16(self.version).raw(self.nonce).str8(self.hub_address)
        w.u32(self.max_frame_size).u32(self.max_envelope_bytes)

    @classmethod
    def read_body(cls, r: Reader) -> Hello:
        return cls(r.u16(), r.raw(NONCE_LEN), r.str8(), r.u32(), r.u32())


@dataclass(frozen=True, slots=True)
class Login(Frame):
    """Client -> hub: ``u32 request_id, u16 version, str8 agent_id, 32 signing_key,
    64 signature, bytes32 bundle`` (an empty bundle means none), and from version
    2 (:data:`LOGIN_BINDING_VERSION`) on ``str8 hub_address, bytes8 channel_binding,
    u8 flags``: the hub name the client dialled, the TLS channel binding it saw and
    the login's flags (:data:`LOGIN_EPHEMERAL`; other bits must be 0), all covered
    by the signature.

    The version decides the layout, so a version 1 LOGIN still parses and the
    hub can refuse it as ``unsupported_version``; in a version 1 LOGIN both
    trailing fields are empty."""

    TYPE: ClassVar[int] = 0x02
    request_id: int
    version: int
    agent_id: str
    signing_key: bytes
    signature: bytes
    bundle: bytes = b""
    hub_address: str = ""
    channel_binding: bytes = b""
    flags: int = 0

    def write_body(self, w: Writer) -> None:
        if self.flags & ~_LOGIN_FLAGS:
            raise ValueError(f"unknown LOGIN flags {self.flags:#x}")
        if len(self.signing_key) != KEY_LEN or len(self.signature) != SIGNATURE_LEN:
            raise ValueError("signing key must be 32 bytes and signature 64 bytes")
        if len(self.channel_binding) > MAX_CHANNEL_BINDING_LEN:
            raise ValueError(f"channel binding longer than {MAX_CHANNEL_BINDING_LEN} bytes")
        w.u32(self.request_id).u16(self.version).str8(validate_agent_id(self.agent_id))
        w.raw(self.signing_key).raw(self.signature).bytes32(self.bundle)
        if self.version >= LOGIN_BINDING_VERSION:
            w.str8(self.hub_address).bytes8(self.channel_binding).u8(self.flags)
        elif self.hub_address or self.channel_binding or self.flags:
            raise ValueError("a version 1 LOGIN has no hub address, channel binding or flags")

    @classmethod
    def read_body(cls, r: Reader) -> Login:
        request_id, version = r.u32(), r.u16()
        agent_id = _read_agent_id(r, "LOGIN")
        key, signature, bundle = r.raw(KEY_LEN), r.raw(SIGNATURE_LEN), r.bytes32(_U32_MAX)
        if version < LOGIN_BINDING_VERSION:
            return cls(request_id, version, agent_id, key, signature, bundle)
        address = r.str8()
        binding = r.bytes8(MAX_CHANNEL_BINDING_LEN)
        flags = r.u8()
        if flags & ~_LOGIN_FLAGS:
            raise DecodeError(f"LOGIN: unknown flags {flags:#x}")
        return cls(request_id, version, agent_id, key, signature, bundle, address, binding, flags)


@dataclass(frozen=True, slots=True)
class LoggedIn(Frame):
    """Hub -> client: ``u32 request_id, bool created`` (created: this login bound the id)."""

    TYPE: ClassVar[int] = 0x03
    request_id: int
    created: bool

    def write_body(self, w: Writer) -> None:
        w.u32(self.request_id).u8(int(self.created))

    @classmethod
    def read_body(cls, r: Reader) -> LoggedIn:
        return cls(r.u32(), _read_bool(r, "LOGGED_IN"))


@dataclass(frozen=True, slots=True)
class RotateKey(Frame):
    """Client -> hub: ``u32 request_id, 32 new_key, 64 old_signature, 64 new_signature``.

    Both signatures cover :func:`agentmesh.protocol.hub_protocol.rotation_message`.
    """

    TYPE: ClassVar[int] = 0x04
    request_id: int
    new_key: bytes
    old_signature: bytes
    new_signature: bytes

    def write_body(self, w: Writer) -> None:
        if len(self.new_key) != KEY_LEN or {len(self.old_signature), len(self.new_signature)} != {
            SIGNATURE_LEN
        }:
            raise ValueError("key must be 32 bytes and signatures 64 bytes")
        w.u32(self.request_id).raw(self.new_key).raw(self.old_signature).raw(self.new_signature)

    @classmethod
    def read_body(cls, r: Reader) -> RotateKey:
        return cls(r.u32(), r.raw(KEY_LEN), r.raw(SIGNATURE_LEN), r.raw(SIGNATURE_LEN))


@dataclass(frozen=True, slots=True)
class Ok(_RequestIdOnly):
    """Hub -> client: ``u32 request_id``; the request succeeded (and is committed)."""

    TYPE: ClassVar[int] = 0x05


@dataclass(frozen=True, slots=True)
class Error(Frame):
    """Either direction: ``u32 request_id, bool fatal, str8 code, bytes8 message_id
    (empty or 16 bytes), bytes16 text (UTF-8)``. ``fatal``: the sender closes the
    connection after this frame.

    ``code`` matches ``[a-z_]{1,64}``; ``text`` is at most :data:`MAX_ERROR_TEXT`
    bytes of printable characters (``str.isprintable``: no newline, no control
    or format character). Both come from the peer and end up in log lines and
    exception messages, so anything else is refused when parsed; the encoder
    escapes and cuts a text instead of failing."""

    TYPE: ClassVar[int] = 0x06
    request_id: int
    code: str
    text: str = ""
    message_id: bytes = b""
    fatal: bool = False

    def write_body(self, w: Writer) -> None:
        if len(self.message_id) not in (0, MESSAGE_ID_LEN):
            raise ValueError("message id must be empty or 16 bytes")
        if not _ERROR_CODE.fullmatch(self.code):
            raise ValueError(f"error code {self.code!r} does not match [a-z_]{{1,64}}")
        w.u32(self.request_id).u8(int(self.fatal)).str8(self.code).bytes8(self.message_id)
        w.bytes16(printable_text(self.text).encode("utf-8"))

    @classmethod
    def read_body(cls, r: Reader) -> Error:
        request_id = r.u32()
        fatal = _read_bool(r, "ERROR")
        code = r.bytes8(64).decode("ascii", "replace")
        if not _ERROR_CODE.fullmatch(code):
            raise DecodeError("ERROR: code does not match [a-z_]{1,64}")
        message_id = r.bytes8()
        if len(message_id) not in (0, MESSAGE_ID_LEN):
            raise DecodeError("ERROR: message id must be empty or 16 bytes")
        try:
            text = r.bytes16(MAX_ERROR_TEXT).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("ERROR: invalid UTF-8") from exc
        if not text.isprintable():
            raise DecodeError("ERROR: text has non-printable characters")
        return cls(request_id, code, text, message_id, fatal)


@dataclass(frozen=True, slots=True)
class Ping(_RequestIdOnly):
    """Either direction: ``u32 request_id``; the peer answers PONG with the same id."""

    TYPE: ClassVar[int] = 0x07


@dataclass(frozen=True, slots=True)
class Pong(_RequestIdOnly):
    """Either direction: ``u32 request_id`` of the PING it answers."""

    TYPE: ClassVar[int] = 0x08


# --- prekeys ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishBundle(Frame):
    """Client -> hub: ``u32 request_id, bytes32 bundle`` (an encoded ``PrekeyBundle``)."""

    TYPE: ClassVar[int] = 0x10
    request_id: int
    bundle: bytes

    def write_body(self, w: Writer) -> None:
        w.u32(self.request_id).bytes32(self.bundle)

    @classmethod
    def read_body(cls, r: Reader) -> PublishBundle:
        return cls(r.u32(), r.bytes32(_U32_MAX))


@dataclass(frozen=True, slots=True)
class UploadPrekeys(Frame):
    """Client -> hub: ``u32 request_id, u16 count, count x bytes16 prekey`` (each an
    encoded ``SignedPrekey``)."""

    TYPE: ClassVar[int] = 0x11
    request_id: int
    prekeys: tuple[bytes, ...]

    def write_body(self, w: Writer) -> None:
        if len(self.prekeys) > 0xFFFF:
            raise ValueError("at most 65535 prekeys per frame")
        w.u32(self.request_id).u16(len(self.prekeys))
        for prekey in self.prekeys:
            w.bytes16(prekey)

    @classmethod
    def read_body(cls, r: Reader) -> UploadPrekeys:
        request_id = r.u32()
        return cls(request_id, tuple(r.bytes16() for _ in range(r.u16())))


@dataclass(frozen=True, slots=True)
class FetchBundle(Frame):
    """Client -> hub: ``u32 request_id, str8 agent_id``. The hub hands out (and
    deletes) one one-time prekey of each kind with the published bundle."""

    TYPE: ClassVar[int] = 0x12
    request_id: int
    agent_id: str

    def write_body(self, w: Writer) -> None:
        w.u32(self.request_id).str8(validate_agent_id(self.agent_id))

    @classmethod
    def read_body(cls, r: Reader) -> FetchBundle:
        return cls(r.u32(), _read_agent_id(r, "FETCH_BUNDLE"))


@dataclass(frozen=True, slots=True)
class Bundle(Frame):
    """Hub -> client: ``u32 request_id, bytes32 bundle`` (the answer to FETCH_BUNDLE)."""

    TYPE: ClassVar[int] = 0x13
    request_id: int
    bundle: bytes

    def write_body(self, w: Writer) -> None:
        w.u32(self.request_id).bytes32(self.bundle)

    @classmethod
    def read_body(cls, r: Reader) -> Bundle:
        return cls(r.u32(), r.bytes32(_U32_MAX))


@dataclass(frozen=True, slots=True)
class PrekeysLow(Frame):
    """Hub -> owner, unsolicited: ``u32 remaining`` one-time prekeys (the smaller
    of the two kinds) after a fetch left the pool below the low-water mark."""

    TYPE: ClassVar[int] = 0x14
    remaining: int

    def write_body(self, w: Writer) -> None:
        w.u32(self.remaining)

    @classmethod
    def read_body(cls, r: Reader) -> PrekeysLow:
        return cls(r.u32())


# --- envelopes -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send(Frame):
    """Client -> hub: ``u32 request_id, bytes32 envelope``."""

    TYPE: ClassVar[int] = 0x20
    request_id: int
    envelope: bytes

    def write_body(self, w: Writer) -> None:
        w.u32(self.request_id).bytes32(self.envelope)

    @classmethod
    def read_body(cls, r: Reader) -> Send:
        return cls(r.u32(), r.bytes32(_U32_MAX))


@dataclass(frozen=True, slots=True)
class SendAck(Frame):
    """Hub -> client: ``u32 request_id, 16 message_id, bool duplicate``; sent only
    after the transaction holding the envelope committed."""

    TYPE: ClassVar[int] = 0x21
    request_id: int
    message_id: bytes
    duplicate: bool = False

    def write_body(self, w: Writer) -> None:
        if len(self.message_id) != MESSAGE_ID_LEN:
            raise ValueError("message id must be 16 bytes")
        w.u32(self.request_id).raw(self.message_id).u8(int(self.duplicate))

    @classmethod
    def read_body(cls, r: Reader) -> SendAck:
        return cls(r.u32(), r.raw(MESSAGE_ID_LEN), _read_bool(r, "SEND_ACK"))


@dataclass(frozen=True, slots=True)
class Push(Frame):
    """Hub -> recipient: ``u64 seq, 16 message_id, bytes32 envelope``; the recipient
    answers with ACK once it has committed the message."""

    TYPE: ClassVar[int] = 0x22
    seq: int
    message_id: bytes
    envelope: bytes

    def write_body(self, w: Writer) -> None:
        if len(self.message_id) != MESSAGE_ID_LEN:
            raise ValueError("message id must be 16 bytes")
        w.u64(self.seq).raw(self.message_id).bytes32(self.envelope)

    @classmethod
    def read_body(cls, r: Reader) -> Push:
        return cls(r.u64(), r.raw(MESSAGE_ID_LEN), r.bytes32(_U32_MAX))


@dataclass(frozen=True, slots=True)
class Ack(Frame):
    """Recipient -> hub: ``u16 count, count x 16 message_id``; the hub may delete them.
    No response."""

    TYPE: ClassVar[int] = 0x23
    message_ids: tuple[bytes, ...]

    def write_body(self, w: Writer) -> None:
        if len(self.message_ids) > 0xFFFF:
            raise ValueError("at most 65535 message ids per ACK")
        w.u16(len(self.message_ids))
        for message_id in self.message_ids:
            if len(message_id) != MESSAGE_ID_LEN:
                raise ValueError("message id must be 16 bytes")
            w.raw(message_id)

    @classmethod
    def read_body(cls, r: Reader) -> Ack:
        return cls(tuple(r.raw(MESSAGE_ID_LEN) for _ in range(r.u16())))


# --- directory -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListAgents(_RequestIdOnly):
    """Client -> hub: ``u32 request_id``. Allowed before login."""

    TYPE: ClassVar[int] = 0x30


@dataclass(frozen=True, slots=True)
class Agents(Frame):
    """Hub -> client: ``u32 request_id, u32 count, count x str8 agent_id``."""

    TYPE: ClassVar[int] = 0x31
    request_id: int
    agent_ids: tuple[str, ...]

    def write_body(self, w: Writer) -> None:
        w.u32(self.request_id).u32(len(self.agent_ids))
        for agent_id in self.agent_ids:
            w.str8(validate_agent_id(agent_id))

    @classmethod
    def read_body(cls, r: Reader) -> Agents:
        request_id = r.u32()
        count = r.u32()
        if count > r.remaining() // 2:  # each id takes at least 2 bytes
            raise DecodeError("AGENTS: count exceeds the frame")
        return cls(request_id, tuple(_read_agent_id(r, "AGENTS") for _ in range(count)))


@dataclass(frozen=True, slots=True)
class GetStats(_RequestIdOnly):
    """Client -> hub: ``u32 request_id``. Allowed before login."""

    TYPE: ClassVar[int] = 0x32


@dataclass(frozen=True, slots=True)
class Stats(Frame):
    """Hub -> client: ``u32 request_id, u16 count, count x (str8 key, u64 value)``.
    Keys are unique."""

    TYPE: ClassVar[int] = 0x33
    request_id: int
    values: tuple[tuple[str, int], ...]

    @classmethod
    def from_mapping(cls, request_id: int, values: Mapping[str, int]) -> Stats:
        return cls(request_id, tuple(sorted(values.items())))

    def as_dict(self) -> dict[str, int]:
        return dict(self.values)

    def write_body(self, w: Writer) -> None:
        if len(self.values) > 0xFFFF:
            raise ValueError("at most 65535 statistics")
        w.u32(self.request_id).u16(len(self.values))
        for key, value in self.values:
            w.str8(key).u64(value)

    @classmethod
    def read_body(cls, r: Reader) -> Stats:
        request_id = r.u32()
        values = tuple((r.str8(), r.u64()) for _ in range(r.u16()))
        if len({key for key, _ in values}) != len(values):
            raise DecodeError("STATS: duplicate key")
        return cls(request_id, values)


#: Wire code -> frame class.
FRAME_TYPES: Mapping[int, type[Frame]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Login,
        LoggedIn,
        RotateKey,
        Ok,
        Error,
        Ping,
        Pong,
        PublishBundle,
        UploadPrekeys,
        FetchBundle,
        Bundle,
        PrekeysLow,
        Send,
        SendAck,
        Push,
        Ack,
        ListAgents,
        Agents,
        GetStats,
        Stats,
    )
}


# Hot-path frames (SEND, SEND_ACK, PUSH, ACK) in one struct call each. Byte for byte
# what write_body/read_body produce and accept; anything unusual takes the general
# path, which raises the usual errors.
_SEND_HEAD = struct.Struct(">IBII")
_SEND_ACK = struct.Struct(">IBI16sB")
_PUSH_HEAD = struct.Struct(">IBQ16sI")
_TWO_U32 = struct.Struct(">II")
_PUSH_BODY = struct.Struct(">Q16sI")
_SEND_ACK_BODY = struct.Struct(">I16sB")


def _encode_fast(frame: Frame) -> bytes | None:
    kind = type(frame)
    if kind is Send:
        assert isinstance(frame, Send)
        data = frame.envelope
        if type(data) is bytes and len(data) <= _U32_MAX - 9:
            return _SEND_HEAD.pack(len(data) + 9, Send.TYPE, frame.request_id, len(data)) + data
    elif kind is SendAck:
        assert isinstance(frame, SendAck)
        if len(frame.message_id) == MESSAGE_ID_LEN:
            return _SEND_ACK.pack(
                22, SendAck.TYPE, frame.request_id, frame.message_id, int(frame.duplicate)
            )
    elif kind is Push:
        assert isinstance(frame, Push)
        data = frame.envelope
        if len(frame.message_id) == MESSAGE_ID_LEN and type(data) is bytes:
            if len(data) <= _U32_MAX - 29:
                head = _PUSH_HEAD.pack(
                    len(data) + 29, Push.TYPE, frame.seq, frame.message_id, len(data)
                )
                return head + data
    return None


def _decode_send(body: bytes) -> Frame | None:
    if len(body) >= 8:
        request_id, length = _TWO_U32.unpack_from(body)
        if length == len(body) - 8:
            return Send(request_id, body[8:])
    return None


def _decode_send_ack(body: bytes) -> Frame | None:
    if len(body) == _SEND_ACK_BODY.size:
        request_id, message_id, duplicate = _SEND_ACK_BODY.unpack(body)
        if duplicate in (0, 1):
            return SendAck(request_id, message_id, duplicate == 1)
    return None


def _decode_push(body: bytes) -> Frame | None:
    if len(body) >= _PUSH_BODY.size:
        seq, message_id, length = _PUSH_BODY.unpack_from(body)
        if length == len(body) - _PUSH_BODY.size:
            return Push(seq, message_id, body[_PUSH_BODY.size :])
    return None


def _decode_ack(body: bytes) -> Frame | None:
    if len(body) >= 2:
        count = int.from_bytes(body[:2], "big")
        if len(body) == 2 + MESSAGE_ID_LEN * count:
            return Ack(tuple(body[i : i + MESSAGE_ID_LEN] for i in range(2, len(body), 16)))
    return None


_FAST_DECODERS: dict[int, Callable[[bytes], Frame | None]] = {
    Send.TYPE: _decode_send,
    SendAck.TYPE: _decode_send_ack,
    Push.TYPE: _decode_push,
    Ack.TYPE: _decode_ack,
}


def encode_frame(frame: Frame) -> bytes:
    """Encode one frame with its length prefix. Raises ValueError for out-of-range fields."""
    fast = _encode_fast(frame)
    if fast is not None:
        return fast
    w = Writer()
    frame.write_body(w)
    body = w.getvalue()
    if len(body) + 1 > _U32_MAX:
        raise ValueError("frame too large to encode")
    return (len(body) + 1).to_bytes(LENGTH_PREFIX, "big") + bytes((frame.TYPE,)) + body


def decode_frame(frame_type: int, body: bytes) -> Frame:
    """Strictly parse one frame body of ``frame_type``. Raises DecodeError."""
    fast = _FAST_DECODERS.get(frame_type)
    if fast is not None and type(body) is bytes:
        frame = fast(body)
        if frame is not None:
            return frame
    cls = FRAME_TYPES.get(frame_type)
    if cls is None:
        raise DecodeError(f"frame: unknown type 0x{frame_type:02x}")
    r = Reader(body, f"frame 0x{frame_type:02x}")
    frame = cls.read_body(r)
    r.finish()
    return frame


class FrameDecoder:
    """Splits a byte stream into frames.

    Call :meth:`feed` with every chunk received, in order; it returns the
    frames completed so far and keeps a partial frame buffered. A frame whose
    declared length exceeds ``max_frame_size`` raises :class:`FrameTooLargeError`
    as soon as its length prefix is seen (nothing of it is buffered); any
    other malformation raises :class:`DecodeError`. After an error the stream
    is unusable: every later :meth:`feed` raises again.
    """

    __slots__ = ("_buffer", "_failed", "max_frame_size")

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 1 <= max_frame_size <= _U32_MAX:
            raise ValueError("max_frame_size must be between 1 and 2**32 - 1")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return every frame it completes, in order. Raises DecodeError."""
        if self._failed:
            raise DecodeError("frame stream failed earlier")
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        pos = 0
        try:
            while len(buf) - pos >= LENGTH_PREFIX:
                length = int.from_bytes(buf[pos : pos + LENGTH_PREFIX], "big")
                if length == 0:
                    raise DecodeError("frame: zero length")
                if length > self.max_frame_size:
                    raise FrameTooLargeError(
                        f"frame: declared length {length} exceeds {self.max_frame_size}"
                    )
                start = pos + LENGTH_PREFIX
                if len(buf) - start < length:
                    break
                frames.append(decode_frame(buf[start], bytes(buf[start + 1 : start + length])))
                pos = start + length
        except DecodeError:
            self._failed = True
            buf.clear()
            raise
        del buf[:pos]
        return frames
