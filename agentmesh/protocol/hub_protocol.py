"""I/O-free hub connection state machines (client side and hub side).

Each connection is one object: feed it the bytes you received with
``receive_data(data)``, act on the events it returns, and after every call
(and every command) write what ``data_to_send()`` returns to the transport.
When ``state`` is :attr:`State.CLOSED`, write the last bytes and close the
transport. Nothing here reads a clock, a socket or a database; the hub
driver (``agentmesh.hub.server``) and the client driver
(``agentmesh.hub.client``) are thin loops around these objects.

Session::

    hub                                      client
    HELLO(version, nonce, hub names) ------>
                                       <---- LOGIN(agent_id, key, sig, [bundle],
                                                   dialled address, channel binding)
    (check address and binding, verify sig; app binds id -> key)
    LOGGED_IN  or  ERROR(fatal) ----------->
    ... requests <-> responses, PUSH -> / <- ACK, PING <-> PONG ...

The login signature covers :func:`login_message`: ``b"AgentMesh-login-v2" ||
nonce || str8(agent_id) || str8(hub_address) || bytes8(channel_binding) ||
u8(flags)`` (flags: ``LOGIN_EPHEMERAL`` for an agent without a key file),
where ``hub_address`` is the name the *client dialled* (not what the hub
announced) and ``channel_binding`` the SHA-256 of the TLS certificate the
client verified (empty over plain TCP). The hub refuses a login whose address
is not one of its own names (``wrong_hub``) or whose binding is not the hash of
its own certificate (``channel_binding_mismatch``), so a hub that relays an
agent's login to another hub gets it refused there, with or without TLS. The
client also refuses, before signing anything, a hub whose HELLO does not list
the name it dialled. Key rotation (ROTATE_KEY) is signed by the old key
(authorisation) and the new key (possession) over :func:`rotation_message`,
bound the same way.

Which frame may be sent or received in which state is decided by the four
tables below and nowhere else. A frame the table does not allow, a frame that
does not parse, or an oversized frame makes the machine send ERROR(fatal)
and move to CLOSED. A fatal ERROR, sent or received, always ends in CLOSED.
Mistakes by the caller (a command in the wrong state) raise
:class:`~agentmesh.errors.LocalProtocolError`; misbehaviour of the peer never
raises, it becomes a :class:`ConnectionFailed` event.

Never imports asyncio, socket or sqlalchemy.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from agentmesh.crypto import primitives as p
from agentmesh.crypto.prekeys import KIND_KEM, KIND_X25519, PrekeyBundle, SignedPrekey
from agentmesh.crypto.primitives import ed25519_verify
from agentmesh.errors import CryptoError, DecodeError, LocalProtocolError
from agentmesh.ids import validate_agent_id
from agentmesh.wire.codec import Writer
from agentmesh.wire.envelope import MESSAGE_ID_LEN, decode_envelope
from agentmesh.wire.frames import (
    LOGIN_BINDING_VERSION,
    LOGIN_EPHEMERAL,
    NONCE_LEN,
    Ack,
    Agents,
    Bundle,
    Error,
    FetchBundle,
    Frame,
    FrameDecoder,
    FrameTooLargeError,
    GetStats,
    Hello,
    ListAgents,
    LoggedIn,
    Login,
    Ok,
    Ping,
    Pong,
    PrekeysLow,
    PublishBundle,
    Push,
    RotateKey,
    Send,
    SendAck,
    Stats,
    UploadPrekeys,
    encode_frame,
)

#: The protocol version this code speaks (HELLO/LOGIN carry it). Version 2 binds
#: the login to the dialled hub name and the TLS channel; version 1 logins could
#: be relayed from one hub to another, so version 1 is not spoken at all.
PROTOCOL_VERSION = LOGIN_BINDING_VERSION
SUPPORTED_VERSIONS: frozenset[int] = frozenset({PROTOCOL_VERSION})
#: Largest UPLOAD_PREKEYS batch the hub verifies (an agent's pool is 100 of each kind).
MAX_PREKEYS_PER_UPLOAD = 256
#: Domain separation of what an identity key signs for a hub (``Agent.sign_login``
#: signs nothing else); the suffix changes whenever the signed layout does.
LOGIN_CONTEXT = b"AgentMesh-login-v2"
ROTATE_CONTEXT = b"AgentMesh-rotate-v2"
#: Longest comma-separated list of hub names a HELLO can carry (its field is a str8).
MAX_HUB_NAMES_BYTES = 255
#: Default largest envelope a hub accepts.
DEFAULT_MAX_ENVELOPE_BYTES = 1024 * 1024
#: Room in a frame beyond the envelope (request id, lengths, a bundle).
FRAME_OVERHEAD = 64 * 1024
#: A client's default frame limit: the largest envelope the codec allows, plus overhead.
CLIENT_MAX_FRAME_SIZE = 16 * 1024 * 1024 + FRAME_OVERHEAD
_U32_MAX = 0xFFFFFFFF


def is_weak_signing_key(key: bytes) -> bool:
    """Whether ``key`` encodes a small-order Ed25519 point (refused as an identity key)."""
    return p.is_small_order_ed25519(key)


# --- hub names and the channel binding ------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r"[0-9]{1,5}")


def normalize_host(host: str) -> str:
    """The canonical spelling of a host: an IP literal as ``ipaddress`` writes it
    (IPv6 without brackets), a DNS name in lower case without a trailing dot.

    Raises ValueError for anything else (whitespace, commas, controls, IPv6
    zone ids): names end up in HELLO, log lines and error texts.
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" not in text:
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            pass
    name = text.lower()
    name = name[:-1] if name.endswith(".") else name
    if len(name) > 253 or not _HOSTNAME.fullmatch(name):
        raise ValueError(f"invalid host name {host!r}")
    return name


def format_hub_address(host: str, port: int) -> str:
    """The canonical hub name ``host:port`` (``[v6]:port`` for an IPv6 literal)."""
    if not 0 < port < 0x10000:
        raise ValueError(f"invalid port {port!r}")
    name = normalize_host(host)
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def parse_hub_address(text: str, default_port: int | None = None) -> str:
    """Canonical form of one hub name: ``HOST:PORT``, ``[IPv6]:PORT``, or (with
    ``default_port``) ``HOST``, ``[IPv6]`` or a bare IPv6 literal. Raises ValueError."""
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else "!"
        if (rest and not rest.startswith(":")) or ":" not in text[1:end]:
            raise ValueError(f"invalid hub address {text!r}")
        host, port_text = text[1:end], (rest[1:] if rest else None)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a name without a port, or a bare IPv6 literal
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"hub address {text!r} has no port (use HOST:PORT)")
        port = default_port
    elif _PORT.fullmatch(port_text):
        port = int(port_text)
    else:
        raise ValueError(f"invalid port in hub address {text!r}")
    return format_hub_address(host, port)


def parse_hub_names(names: str | Iterable[str], default_port: int | None = None) -> tuple[str, ...]:
    """The canonical, de-duplicated names in ``names`` (a comma-separated string,
    or several of them), in order.

    Raises ValueError if a name is invalid, none is given, or they do not fit
    in a HELLO (:data:`MAX_HUB_NAMES_BYTES`).
    """
    parts = [names] if isinstance(names, str) else list(names)
    found: list[str] = []
    for part in parts:
        for item in part.split(","):
            name = parse_hub_address(item.strip(), default_port)
            if name not in found:
                found.append(name)
    if not found:
        raise ValueError("no hub name given")
    if len(",".join(found).encode()) > MAX_HUB_NAMES_BYTES:
        raise ValueError(f"hub names longer than {MAX_HUB_NAMES_BYTES} bytes in all")
    return tuple(found)


def loopback_names(port: int) -> tuple[str, ...]:
    """The names of a hub that listens on a loopback address for ``port``."""
    return tuple(format_hub_address(host, port) for host in ("127.0.0.1", "localhost", "::1"))


def tls_server_end_point(certificate_der: bytes) -> bytes:
    """The channel binding of a TLS connection: SHA-256 of the server's certificate (DER).

    RFC 5929 ``tls-server-end-point`` hashes with the certificate's signature
    hash (SHA-256 when that is MD5 or SHA-1). AgentMesh always uses SHA-256: it
    needs no certificate parsing, both ends agree without negotiating, and its
    collision resistance suffices; it differs from RFC 5929 only for certificates
    signed with SHA-384/512, so the value is not interchangeable with other stacks.
    """
    return p.sha256(certificate_der)


def login_message(
    nonce: bytes, agent_id: str, hub_address: str, channel_binding: bytes = b"", flags: int = 0
) -> bytes:
    """The bytes an agent signs to log in: context, nonce, agent id, the hub name it
    dialled, the channel binding (empty over plain TCP) and the LOGIN flags."""
    if len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 32 bytes")
    w = Writer().raw(LOGIN_CONTEXT).raw(nonce).str8(validate_agent_id(agent_id))
    return w.str8(hub_address).bytes8(channel_binding).u8(flags).getvalue()


def rotation_message(
    nonce: bytes,
    agent_id: str,
    hub_address: str,
    old_key: bytes,
    new_key: bytes,
    channel_binding: bytes = b"",
) -> bytes:
    """The bytes both the old and the new key sign to rotate an agent's key
    (``hub_address`` and ``channel_binding`` as in the connection's login)."""
    w = Writer().raw(ROTATE_CONTEXT).raw(nonce).str8(validate_agent_id(agent_id))
    w.str8(hub_address).bytes8(channel_binding)
    return w.raw(old_key).raw(new_key).getvalue()


def check_bundle(data: bytes, agent_id: str, signing_key: bytes) -> PrekeyBundle:
    """Parse and verify a bundle published by ``agent_id`` logged in with ``signing_key``.

    Raises DecodeError/CryptoError, or ValueError if the bundle names another
    agent or another identity key.
    """
    bundle = PrekeyBundle.decode(data).verify()
    if bundle.agent_id != agent_id:
        raise ValueError("bundle names another agent")
    if bundle.identity.signing != signing_key:
        raise ValueError("bundle identity is not the logged-in key")
    return bundle


class State(enum.Enum):
    """Connection states. The hub starts in AWAIT_LOGIN, a client in AWAIT_HELLO."""

    AWAIT_HELLO = "AWAIT_HELLO"  # client: connected, waiting for HELLO
    HELLO_RECEIVED = "HELLO_RECEIVED"  # client: may LOGIN (or ask anonymous questions)
    AWAIT_LOGIN = "AWAIT_LOGIN"  # hub: HELLO sent, waiting for LOGIN
    AUTHENTICATING = "AUTHENTICATING"  # LOGIN sent/received, hub deciding
    AUTHENTICATED = "AUTHENTICATED"
    CLOSED = "CLOSED"


_S = State
_Table = Mapping[tuple[State, type[Frame]], State]


def _same(state: State, *frames: type[Frame]) -> dict[tuple[State, type[Frame]], State]:
    return {(state, frame): state for frame in frames}


# --- the transition tables: (state, frame type) -> next state ---------------
# A fatal ERROR (sent or received) leads to CLOSED from every state; that rule
# is applied before these tables are consulted.

#: Client -> hub after login, and hub -> client after login (answers and pushes).
_REQUESTS = (RotateKey, PublishBundle, UploadPrekeys, FetchBundle, Send, Ack, ListAgents, GetStats)
_ANSWERS = (Ok, Error, Bundle, SendAck, Push, PrekeysLow, Agents, Stats)
#: Before login only directory questions (and keepalive) are allowed, anonymously.
_ANONYMOUS_REQUESTS = (ListAgents, GetStats)
_ANONYMOUS_ANSWERS = (Agents, Stats, Error)
_KEEPALIVE = (Ping, Pong)

#: Frames the hub accepts from a client.
HUB_RECEIVES: _Table = {
    (_S.AWAIT_LOGIN, Login): _S.AUTHENTICATING,
    **_same(_S.AWAIT_LOGIN, *_ANONYMOUS_REQUESTS, *_KEEPALIVE),
    **_same(_S.AUTHENTICATING, *_KEEPALIVE),
    **_same(_S.AUTHENTICATED, *_REQUESTS, *_KEEPALIVE),
}

#: Frames the hub may send.
HUB_SENDS: _Table = {
    **_same(_S.AWAIT_LOGIN, *_ANONYMOUS_ANSWERS, *_KEEPALIVE),
    (_S.AUTHENTICATING, LoggedIn): _S.AUTHENTICATED,
    **_same(_S.AUTHENTICATING, *_KEEPALIVE),
    **_same(_S.AUTHENTICATED, *_ANSWERS, *_KEEPALIVE),
}

#: Frames a client accepts from the hub.
CLIENT_RECEIVES: _Table = {
    (_S.AWAIT_HELLO, Hello): _S.HELLO_RECEIVED,
    **_same(_S.HELLO_RECEIVED, *_ANONYMOUS_ANSWERS, *_KEEPALIVE),
    (_S.AUTHENTICATING, LoggedIn): _S.AUTHENTICATED,
    **_same(_S.AUTHENTICATING, *_KEEPALIVE),
    **_same(_S.AUTHENTICATED, *_ANSWERS, *_KEEPALIVE),
}

#: Frames a client may send.
CLIENT_SENDS: _Table = {
    (_S.HELLO_RECEIVED, Login): _S.AUTHENTICATING,
    **_same(_S.HELLO_RECEIVED, *_ANONYMOUS_REQUESTS, *_KEEPALIVE),
    **_same(_S.AUTHENTICATING, *_KEEPALIVE),
    **_same(_S.AUTHENTICATED, *_REQUESTS, *_KEEPALIVE),
}


# --- events ----------------------------------------------------------------


class Event:
    """Base of every event a connection returns from ``receive_data``."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ConnectionFailed(Event):
    """The connection is CLOSED by a fatal error: write ``data_to_send()``, then close.

    ``sent_by_peer``: the peer sent the fatal ERROR; otherwise this side
    detected the peer's violation (``code`` says which) and sent ERROR itself.
    """

    code: str
    detail: str
    sent_by_peer: bool


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    request_id: int


# hub side


@dataclass(frozen=True, slots=True)
class LoginRequested(Event):
    """A LOGIN whose signature verified (and whose bundle, if any, verified).

    The hub must answer with :meth:`ServerConnection.accept_login` or
    :meth:`ServerConnection.refuse_login` (after checking the id's binding).
    """

    request_id: int
    version: int
    agent_id: str
    signing_key: bytes
    bundle: bytes
    #: The agent keeps no key file: its id may be taken over once it is disconnected.
    ephemeral: bool = False


@dataclass(frozen=True, slots=True)
class KeyRotationRequested(Event):
    """Both rotation signatures verified; answer with ``confirm_rotation`` or ``reply_error``."""

    request_id: int
    agent_id: str
    old_key: bytes
    new_key: bytes


@dataclass(frozen=True, slots=True)
class BundlePublished(Event):
    """A verified bundle of the logged-in agent; store it, then ``reply_ok``."""

    request_id: int
    agent_id: str
    bundle: bytes


@dataclass(frozen=True, slots=True)
class PrekeysUploaded(Event):
    """Verified one-time prekeys of the logged-in agent; store them, then ``reply_ok``."""

    request_id: int
    agent_id: str
    prekeys: tuple[SignedPrekey, ...]
    encoded: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class BundleRequested(Event):
    """Answer with ``reply_bundle`` or ``reply_error(request_id, "not_found")``."""

    request_id: int
    agent_id: str


@dataclass(frozen=True, slots=True)
class SendRequested(Event):
    """A well-formed envelope whose sender is the logged-in agent, within the size limit.

    Store it, then ``reply_send_ack`` (only after the commit) or ``reply_error``.
    """

    request_id: int
    message_id: bytes
    sender: str
    recipient: str
    envelope: bytes


@dataclass(frozen=True, slots=True)
class AckReceived(Event):
    """The logged-in agent committed these pushed messages; delete them."""

    agent_id: str
    message_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AgentsRequested(Event):
    request_id: int


@dataclass(frozen=True, slots=True)
class StatsRequested(Event):
    request_id: int


@dataclass(frozen=True, slots=True)
class RequestRejected(Event):
    """The machine itself answered a request with a non-fatal ERROR (for logging)."""

    request_id: int
    code: str
    detail: str


# client side


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """The hub greeted us; call :meth:`ClientConnection.login` (or ask anonymously).

    ``hub_address`` is the HELLO field as sent, ``hub_names`` the names parsed from it.
    """

    version: int
    hub_address: str
    max_frame_size: int
    max_envelope_bytes: int
    hub_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoginAccepted(Event):
    request_id: int
    created: bool


@dataclass(frozen=True, slots=True)
class RequestSucceeded(Event):
    request_id: int


@dataclass(frozen=True, slots=True)
class ErrorReceived(Event):
    """An ERROR from the hub. If ``fatal``, a :class:`ConnectionFailed` follows."""

    request_id: int
    code: str
    text: str
    message_id: bytes
    fatal: bool


@dataclass(frozen=True, slots=True)
class BundleReceived(Event):
    request_id: int
    bundle: bytes


@dataclass(frozen=True, slots=True)
class SendAcknowledged(Event):
    """The hub committed the envelope (``duplicate``: it had it already)."""

    request_id: int
    message_id: bytes
    duplicate: bool


@dataclass(frozen=True, slots=True)
class EnvelopePushed(Event):
    """An envelope for us; after committing it, :meth:`ClientConnection.ack` its id."""

    seq: int
    message_id: bytes
    envelope: bytes


@dataclass(frozen=True, slots=True)
class PrekeysLowReceived(Event):
    remaining: int


@dataclass(frozen=True, slots=True)
class AgentsReceived(Event):
    request_id: int
    agent_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StatsReceived(Event):
    request_id: int
    stats: Mapping[str, int]


# --- the shared machinery --------------------------------------------------


class _Connection:
    """Frame decoding, the transition tables, PING/PONG and fatal errors."""

    _RECEIVES: ClassVar[_Table]
    _SENDS: ClassVar[_Table]
    #: Hub replies may arrive after the connection closed; they are dropped.
    _DROP_WHEN_CLOSED: ClassVar[bool]

    def __init__(self, state: State, max_frame_size: int) -> None:
        self.state = state
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._out = bytearray()
        self._next_request_id = 1
        #: The peer's frame limit (a client learns it from HELLO).
        self.peer_max_frame_size = _U32_MAX

    # -- I/O interface ----------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Process received bytes; return the events they complete, in order.

        Never raises for anything the peer sends. After calling this, write
        :meth:`data_to_send` and, if ``state`` is CLOSED, close the transport.
        Data received after CLOSED is ignored.
        """
        if self.state is State.CLOSED:
            return []
        try:
            frames = self._decoder.feed(data)
        except FrameTooLargeError as exc:
            return [self._violation("frame_too_large", str(exc))]
        except DecodeError as exc:
            return [self._violation("bad_frame", str(exc))]
        events: list[Event] = []
        for frame in frames:
            if self.closed:  # an earlier frame of this chunk ended the connection
                break
            events.extend(self._receive_frame(frame))
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport now (possibly empty); clears the buffer."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def fail(self, code: str, text: str = "") -> None:
        """Send ERROR(fatal) with ``code`` and move to CLOSED (no-op if already closed)."""
        if self.state is not State.CLOSED:
            self._send(Error(0, code, text, fatal=True))

    def ping(self) -> int:
        """Queue a PING; return its request id (the PONG echoes it)."""
        request_id = self._request_id()
        self._send(Ping(request_id))
        return request_id

    # -- internals --------------------------------------------------------

    def _request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id = request_id + 1 if request_id < _U32_MAX else 1
        return request_id

    def _send(self, frame: Frame) -> None:
        if self.state is State.CLOSED:
            if self._DROP_WHEN_CLOSED:
                return
            raise LocalProtocolError(f"cannot send {type(frame).__name__}: connection closed")
        if isinstance(frame, Error) and frame.fatal:
            next_state = State.CLOSED
        else:
            allowed = self._SENDS.get((self.state, type(frame)))
            if allowed is None:
                raise LocalProtocolError(
                    f"cannot send {type(frame).__name__} in state {self.state.value}"
                )
            next_state = allowed
        data = encode_frame(frame)
        if len(data) - 4 > self.peer_max_frame_size:
            raise LocalProtocolError(
                f"{type(frame).__name__} of {len(data)} bytes exceeds the peer's frame limit"
            )
        self._out += data
        self.state = next_state

    def _violation(self, code: str, detail: str) -> ConnectionFailed:
        self.fail(code, detail)
        return ConnectionFailed(code, detail, sent_by_peer=False)

    def _reject(self, request_id: int, code: str, detail: str, message_id: bytes = b"") -> Event:
        self._send(Error(request_id, code, detail, message_id))
        return RequestRejected(request_id, code, detail)

    def _receive_frame(self, frame: Frame) -> list[Event]:
        if isinstance(frame, Error) and frame.fatal:
            self.state = State.CLOSED
            return [*self._on_error(frame), ConnectionFailed(frame.code, frame.text, True)]
        next_state = self._RECEIVES.get((self.state, type(frame)))
        if next_state is None:
            return [
                self._violation(
                    "unexpected_frame",
                    f"{type(frame).__name__} not allowed in state {self.state.value}",
                )
            ]
        self.state = next_state
        if isinstance(frame, Ping):
            self._send(Pong(frame.request_id))
            return []
        if isinstance(frame, Pong):
            return [PongReceived(frame.request_id)]
        return self._handle(frame)

    def _on_error(self, frame: Error) -> list[Event]:
        return []

    def _handle(self, frame: Frame) -> list[Event]:
        raise NotImplementedError


# --- the hub side ----------------------------------------------------------


class ServerConnection(_Connection):
    """The hub's side of one client connection.

    ``hub_address``: the hub's names (one ``host:port``, a comma-separated list,
    or an iterable of them; see :func:`parse_hub_names`), announced in HELLO; a
    LOGIN must be signed for one of them. ``channel_binding``: the
    :func:`tls_server_end_point` of the certificate this connection serves, or
    empty without TLS; a LOGIN must carry exactly this value.

    After construction, ``data_to_send()`` holds the HELLO. Every request
    event must be answered (``reply_*``); answers for a connection that has
    meanwhile closed are dropped silently, so late commit callbacks are safe.
    """

    _RECEIVES = HUB_RECEIVES
    _SENDS = HUB_SENDS
    _DROP_WHEN_CLOSED = True

    def __init__(
        self,
        *,
        nonce: bytes,
        hub_address: str | Iterable[str],
        channel_binding: bytes = b"",
        max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
        max_frame_size: int | None = None,
        versions: frozenset[int] = SUPPORTED_VERSIONS,
    ) -> None:
        if len(nonce) != NONCE_LEN:
            raise ValueError("nonce must be 32 random bytes")
        limit = max_frame_size or max_envelope_bytes + FRAME_OVERHEAD
        super().__init__(State.AWAIT_LOGIN, limit)
        self.nonce = nonce
        self.hub_names = parse_hub_names(hub_address)
        #: The HELLO field: every name, comma separated.
        self.hub_address = ",".join(self.hub_names)
        self.channel_binding = bytes(channel_binding)
        self.max_envelope_bytes = max_envelope_bytes
        self._versions = versions
        self.agent_id: str | None = None
        self.signing_key: bytes | None = None
        self.version = 0
        self._login: LoginRequested | None = None
        #: The name the pending/accepted login was signed for (rotations repeat it).
        self._login_address = ""
        self._out += encode_frame(
            Hello(max(versions), nonce, self.hub_address, limit, max_envelope_bytes)
        )

    # -- answers ----------------------------------------------------------

    def accept_login(self, created: bool) -> None:
        """The id is (now) bound to the presented key: send LOGGED_IN."""
        if self.state is State.CLOSED:
            return
        login = self._login
        if login is None:
            raise LocalProtocolError("no login to accept")
        self._send(LoggedIn(login.request_id, created))
        self.agent_id, self.signing_key, self.version = (
            login.agent_id,
            login.signing_key,
            login.version,
        )
        self._login = None

    def refuse_login(self, code: str, text: str) -> None:
        """Refuse the pending login (e.g. ``identity_mismatch``): ERROR(fatal), CLOSED."""
        request_id = self._login.request_id if self._login is not None else 0
        self._login = None
        if self.state is not State.CLOSED:
            self._send(Error(request_id, code, text, fatal=True))

    def confirm_rotation(self, request_id: int, new_key: bytes) -> None:
        """The store now binds the id to ``new_key``: adopt it and send OK."""
        if self.state is State.AUTHENTICATED:
            self.signing_key = new_key
        self._send(Ok(request_id))

    def reply_ok(self, request_id: int) -> None:
        self._send(Ok(request_id))

    def reply_error(
        self, request_id: int, code: str, text: str = "", message_id: bytes = b""
    ) -> None:
        """Refuse one request; the connection stays open."""
        self._send(Error(request_id, code, text, message_id))

    def reply_bundle(self, request_id: int, bundle: bytes) -> None:
        self._send(Bundle(request_id, bundle))

    def reply_send_ack(self, request_id: int, message_id: bytes, duplicate: bool) -> None:
        """Call only after the transaction holding the envelope committed."""
        self._send(SendAck(request_id, message_id, duplicate))

    def reply_agents(self, request_id: int, agent_ids: list[str]) -> None:
        self._send(Agents(request_id, tuple(agent_ids)))

    def reply_stats(self, request_id: int, stats: Mapping[str, int]) -> None:
        self._send(Stats.from_mapping(request_id, stats))

    def push(self, seq: int, message_id: bytes, envelope: bytes) -> None:
        """Deliver a stored envelope to the logged-in recipient."""
        self._send(Push(seq, message_id, envelope))

    def notify_prekeys_low(self, remaining: int) -> None:
        self._send(PrekeysLow(remaining))

    # -- frame handlers ---------------------------------------------------

    def _handle(self, frame: Frame) -> list[Event]:
        if isinstance(frame, Send):
            return [self._on_send(frame)]
        if isinstance(frame, Ack):
            assert self.agent_id is not None
            return [AckReceived(self.agent_id, frame.message_ids)] if frame.message_ids else []
        if isinstance(frame, Login):
            return [self._on_login(frame)]
        if isinstance(frame, ListAgents):
            return [AgentsRequested(frame.request_id)]
        if isinstance(frame, GetStats):
            return [StatsRequested(frame.request_id)]
        assert self.agent_id is not None and self.signing_key is not None
        if isinstance(frame, FetchBundle):
            return [BundleRequested(frame.request_id, frame.agent_id)]
        if isinstance(frame, PublishBundle):
            try:
                check_bundle(frame.bundle, self.agent_id, self.signing_key)
            except (DecodeError, CryptoError, ValueError) as exc:
                return [self._reject(frame.request_id, "bad_bundle", str(exc))]
            return [BundlePublished(frame.request_id, self.agent_id, frame.bundle)]
        if isinstance(frame, UploadPrekeys):
            return [self._on_upload(frame, self.signing_key)]
        if isinstance(frame, RotateKey):
            return [self._on_rotate(frame, self.agent_id, self.signing_key)]
        raise AssertionError(f"no handler for {type(frame).__name__}")  # pragma: no cover

    def _refuse(self, request_id: int, code: str, detail: str) -> ConnectionFailed:
        """Refuse a LOGIN: ERROR(fatal) naming its request (so the client can tell
        the refusal from a lost connection), then CLOSED."""
        self._send(Error(request_id, code, detail, fatal=True))
        return ConnectionFailed(code, detail, sent_by_peer=False)

    def _on_login(self, frame: Login) -> Event:
        if frame.version not in self._versions:
            return self._refuse(
                frame.request_id, "unsupported_version", f"protocol version {frame.version}"
            )
        if is_weak_signing_key(frame.signing_key):
            return self._refuse(frame.request_id, "weak_key", "small-order identity key")
        # Both fields are what the client saw of its connection; a relay cannot
        # change them, because the signature below covers them.
        try:
            dialled = parse_hub_address(frame.hub_address)
        except ValueError:
            dialled = ""
        if dialled not in self.hub_names:
            return self._refuse(
                frame.request_id,
                "wrong_hub",
                f"the login is for hub {frame.hub_address!r}; this hub is {self.hub_address}",
            )
        if not p.constant_time_equal(frame.channel_binding, self.channel_binding):
            why = (
                "the login was signed for another TLS certificate"
                if self.channel_binding
                else "the login was signed for a TLS connection; this one has no TLS"
            )
            return self._refuse(
                frame.request_id,
                "channel_binding_mismatch",
                f"{why} (is something relaying this connection?)",
            )
        try:
            ed25519_verify(
                frame.signing_key,
                frame.signature,
                login_message(
                    self.nonce,
                    frame.agent_id,
                    frame.hub_address,
                    frame.channel_binding,
                    frame.flags,
                ),
            )
        except CryptoError:
            return self._refuse(
                frame.request_id, "bad_signature", "login signature does not verify"
            )
        self._login_address = frame.hub_address
        if frame.bundle:
            try:
                check_bundle(frame.bundle, frame.agent_id, frame.signing_key)
            except (DecodeError, CryptoError, ValueError) as exc:
                return self._refuse(frame.request_id, "bad_bundle", str(exc))
        self._login = LoginRequested(
            frame.request_id,
            frame.version,
            frame.agent_id,
            frame.signing_key,
            frame.bundle,
            ephemeral=bool(frame.flags & LOGIN_EPHEMERAL),
        )
        return self._login

    def _on_send(self, frame: Send) -> Event:
        data = frame.envelope
        if len(data) > self.max_envelope_bytes:
            message_id = data[2 : 2 + MESSAGE_ID_LEN] if len(data) >= 2 + MESSAGE_ID_LEN else b""
            return self._reject(
                frame.request_id,
                "too_large",
                f"envelope of {len(data)} bytes exceeds {self.max_envelope_bytes}",
                message_id,
            )
        try:
            envelope = decode_envelope(data)
        except DecodeError as exc:
            return self._reject(frame.request_id, "bad_envelope", str(exc))
        if envelope.sender != self.agent_id:
            return self._reject(
                frame.request_id,
                "forged_sender",
                "envelope sender is not the logged-in agent",
                envelope.message_id,
            )
        return SendRequested(
            frame.request_id, envelope.message_id, envelope.sender, envelope.recipient, data
        )

    def _on_upload(self, frame: UploadPrekeys, signing_key: bytes) -> Event:
        assert self.agent_id is not None
        if len(frame.prekeys) > MAX_PREKEYS_PER_UPLOAD:
            # Refused before any signature is checked: verifying thousands of
            # signatures per frame would let one agent stall the hub's loop.
            return self._reject(
                frame.request_id,
                "too_many_prekeys",
                f"at most {MAX_PREKEYS_PER_UPLOAD} prekeys per upload",
            )
        try:
            prekeys = tuple(SignedPrekey.decode(item).verify(signing_key) for item in frame.prekeys)
        except (DecodeError, CryptoError) as exc:
            return self._reject(frame.request_id, "bad_prekey", str(exc))
        if any(prekey.kind not in (KIND_X25519, KIND_KEM) for prekey in prekeys):
            return self._reject(frame.request_id, "bad_prekey", "unknown prekey kind")
        return PrekeysUploaded(frame.request_id, self.agent_id, prekeys, frame.prekeys)

    def _on_rotate(self, frame: RotateKey, agent_id: str, old_key: bytes) -> Event:
        if frame.new_key == old_key:
            return self._reject(frame.request_id, "bad_request", "new key equals the old key")
        if is_weak_signing_key(frame.new_key):
            return self._reject(frame.request_id, "weak_key", "small-order identity key")
        message = rotation_message(
            self.nonce, agent_id, self._login_address, old_key, frame.new_key, self.channel_binding
        )
        try:
            ed25519_verify(old_key, frame.old_signature, message)
            ed25519_verify(frame.new_key, frame.new_signature, message)
        except CryptoError:
            return self._reject(frame.request_id, "bad_signature", "rotation signature invalid")
        return KeyRotationRequested(frame.request_id, agent_id, old_key, frame.new_key)


# --- the client side -------------------------------------------------------


class ClientConnection(_Connection):
    """A client's side of one hub connection.

    ``dialled_address``: the ``host:port`` this client connected to (the TLS
    server name if it set one, else the host). ``expected_hub_address``
    overrides it (connect to one name, expect and sign another). The client
    refuses a HELLO that does not list that name (``wrong_hub``) and signs it
    in the login, so the hub can refuse a login relayed from another hub.
    Without either (sans-IO tools and tests) it signs the hub's first
    announced name and checks nothing; :class:`~agentmesh.hub.client.NetworkHub`
    always passes ``dialled_address``. Over TLS, call
    :meth:`set_channel_binding` before the HELLO is received.

    Wait for :class:`HelloReceived`, then call :meth:`login` with a signature
    over :meth:`login_challenge`. Request methods return the request id the
    response will carry. Calling a method the current state does not allow
    raises :class:`LocalProtocolError`.
    """

    _RECEIVES = CLIENT_RECEIVES
    _SENDS = CLIENT_SENDS
    _DROP_WHEN_CLOSED = False

    def __init__(
        self,
        *,
        max_frame_size: int = CLIENT_MAX_FRAME_SIZE,
        versions: frozenset[int] = SUPPORTED_VERSIONS,
        expected_hub_address: str | None = None,
        dialled_address: str | None = None,
        channel_binding: bytes = b"",
    ) -> None:
        super().__init__(State.AWAIT_HELLO, max_frame_size)
        self._versions = versions
        expected = expected_hub_address if expected_hub_address is not None else dialled_address
        #: The hub name this client expects and signs (raises ValueError if invalid).
        self.expected_hub_address = parse_hub_address(expected) if expected is not None else None
        self.channel_binding = bytes(channel_binding)
        #: The name the login signs (known after HELLO).
        self.login_address = ""
        self.hello: Hello | None = None
        self.version = 0
        self.agent_id: str | None = None
        self._pending_login: tuple[int, str] | None = None

    def set_channel_binding(self, channel_binding: bytes) -> None:
        """Use ``channel_binding`` (:func:`tls_server_end_point` of the verified server
        certificate) in the login. Only before the HELLO is received."""
        if self.state is not State.AWAIT_HELLO:
            raise LocalProtocolError("the channel binding must be set before HELLO")
        self.channel_binding = bytes(channel_binding)

    @property
    def max_envelope_bytes(self) -> int:
        """The hub's envelope limit (0 before HELLO)."""
        return self.hello.max_envelope_bytes if self.hello is not None else 0

    def _hello(self) -> Hello:
        if self.hello is None:
            raise LocalProtocolError("no HELLO received yet")
        return self.hello

    # -- commands ---------------------------------------------------------

    def login_challenge(self, agent_id: str, *, ephemeral: bool = False) -> bytes:
        """The exact bytes ``agent_id``'s identity key must sign for :meth:`login`
        (with the same ``ephemeral``)."""
        hello = self._hello()
        return login_message(
            hello.nonce,
            agent_id,
            self.login_address,
            self.channel_binding,
            LOGIN_EPHEMERAL if ephemeral else 0,
        )

    def login(
        self,
        agent_id: str,
        signing_key: bytes,
        signature: bytes,
        bundle: bytes = b"",
        *,
        ephemeral: bool = False,
    ) -> int:
        """Send LOGIN. ``ephemeral``: the agent keeps no key file, so the hub binds its
        id only until another key logs in while this one is disconnected."""
        request_id = self._request_id()
        self._send(
            Login(
                request_id,
                self.version,
                agent_id,
                signing_key,
                signature,
                bundle,
                self.login_address,
                self.channel_binding,
                LOGIN_EPHEMERAL if ephemeral else 0,
            )
        )
        self._pending_login = (request_id, agent_id)
        return request_id

    def rotation_challenge(self, old_key: bytes, new_key: bytes) -> bytes:
        """The bytes both keys must sign for :meth:`rotate_key`."""
        hello = self._hello()
        if self.agent_id is None:
            raise LocalProtocolError("not logged in")
        return rotation_message(
            hello.nonce, self.agent_id, self.login_address, old_key, new_key, self.channel_binding
        )

    def rotate_key(self, new_key: bytes, old_signature: bytes, new_signature: bytes) -> int:
        request_id = self._request_id()
        self._send(RotateKey(request_id, new_key, old_signature, new_signature))
        return request_id

    def publish_bundle(self, bundle: bytes) -> int:
        request_id = self._request_id()
        self._send(PublishBundle(request_id, bundle))
        return request_id

    def upload_prekeys(self, prekeys: list[bytes]) -> int:
        request_id = self._request_id()
        self._send(UploadPrekeys(request_id, tuple(prekeys)))
        return request_id

    def fetch_bundle(self, agent_id: str) -> int:
        request_id = self._request_id()
        self._send(FetchBundle(request_id, agent_id))
        return request_id

    def send(self, envelope: bytes) -> int:
        """Queue SEND. Raises LocalProtocolError above the hub's envelope limit."""
        if len(envelope) > self.max_envelope_bytes:
            raise LocalProtocolError(
                f"envelope of {len(envelope)} bytes exceeds the hub's {self.max_envelope_bytes}"
            )
        request_id = self._request_id()
        self._send(Send(request_id, envelope))
        return request_id

    def ack(self, message_ids: list[bytes]) -> None:
        """Acknowledge committed pushes (split into frames of at most 65535 ids)."""
        for start in range(0, len(message_ids), 0xFFFF):
            self._send(Ack(tuple(message_ids[start : start + 0xFFFF])))

    def list_agents(self) -> int:
        request_id = self._request_id()
        self._send(ListAgents(request_id))
        return request_id

    def get_stats(self) -> int:
        request_id = self._request_id()
        self._send(GetStats(request_id))
        return request_id

    # -- frame handlers ---------------------------------------------------

    def _on_error(self, frame: Error) -> list[Event]:
        return [
            ErrorReceived(frame.request_id, frame.code, frame.text, frame.message_id, frame.fatal)
        ]

    def _handle(self, frame: Frame) -> list[Event]:
        if isinstance(frame, Push):
            return [EnvelopePushed(frame.seq, frame.message_id, frame.envelope)]
        if isinstance(frame, SendAck):
            return [SendAcknowledged(frame.request_id, frame.message_id, frame.duplicate)]
        if isinstance(frame, Ok):
            return [RequestSucceeded(frame.request_id)]
        if isinstance(frame, Error):
            return self._on_error(frame)
        if isinstance(frame, Bundle):
            return [BundleReceived(frame.request_id, frame.bundle)]
        if isinstance(frame, PrekeysLow):
            return [PrekeysLowReceived(frame.remaining)]
        if isinstance(frame, Agents):
            return [AgentsReceived(frame.request_id, frame.agent_ids)]
        if isinstance(frame, Stats):
            return [StatsReceived(frame.request_id, frame.as_dict())]
        if isinstance(frame, LoggedIn):
            return [self._on_logged_in(frame)]
        if isinstance(frame, Hello):
            return [self._on_hello(frame)]
        raise AssertionError(f"no handler for {type(frame).__name__}")  # pragma: no cover

    def _on_hello(self, frame: Hello) -> Event:
        chosen = min(frame.version, max(self._versions))
        if chosen not in self._versions:
            return self._violation("unsupported_version", f"hub speaks version {frame.version}")
        try:
            names = parse_hub_names(frame.hub_address)
        except ValueError:
            return self._violation("wrong_hub", f"hub calls itself {frame.hub_address!r}")
        expected = self.expected_hub_address
        if expected is not None and expected not in names:
            # Refused before anything is signed: a relay, or a hub configured
            # without the name its agents use (--hub-address).
            return self._violation(
                "wrong_hub",
                f"dialled {expected} but the hub answers to {', '.join(names)}; "
                "dial one of those names, or start the hub with --hub-address "
                f"{expected}",
            )
        self.login_address = expected if expected is not None else names[0]
        self.hello = frame
        self.version = chosen
        self.peer_max_frame_size = frame.max_frame_size
        return HelloReceived(
            chosen, frame.hub_address, frame.max_frame_size, frame.max_envelope_bytes, names
        )

    def _on_logged_in(self, frame: LoggedIn) -> Event:
        if self._pending_login is None or frame.request_id != self._pending_login[0]:
            return self._violation("unexpected_frame", "LOGGED_IN for another request")
        self.agent_id = self._pending_login[1]
        self._pending_login = None
        return LoginAccepted(frame.request_id, frame.created)
