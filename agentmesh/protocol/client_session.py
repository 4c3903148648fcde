"""The sans-I/O client session: one agent's life with a hub, across connections.

:class:`ClientSession` owns everything a hub client decides, and nothing it
does: the :class:`~agentmesh.protocol.hub_protocol.ClientConnection` of the
current connection, the table of outstanding requests, the send window, the
order login -> prekey upload -> outbox flush -> resume, the batching of ACKs,
the de-duplication of one-time prekey uploads, the retries of ``rate_limited``
sends, the keepalive and the verdict on a received envelope (ack, hold or drop).
A driver (:mod:`agentmesh.hub.client` on its I/O thread) owns the sockets, TLS,
threads, timers and the calls into the endpoint, and is a thin loop around it.

Calling contract (as websockets' ``Protocol`` and h11's ``Connection``)
    * When the transport is up (after TLS), call :meth:`~ClientSession.connected`
      with the channel binding; when it is gone, :meth:`~ClientSession.connection_lost`.
    * Feed received bytes to :meth:`~ClientSession.receive_data`, and act on the
      effects it returns, in order.
    * After **every** call, write :meth:`~ClientSession.data_to_send` to the
      transport; when :attr:`~ClientSession.closed_by_protocol` is true, close it.
    * After every call, arm a timer for :meth:`~ClientSession.next_timer` (a
      time on the injected ``clock``) and call :meth:`~ClientSession.handle_timer`
      when it fires.
    * Effects that ask the endpoint something (:class:`NeedLoginSignature`,
      :class:`NeedPrekeys`, :class:`NeedOutbox`, ...) are answered by calling the
      matching method with the endpoint's result and the effect's
      ``generation``; an answer for an older connection is ignored, so a slow
      endpoint can never sign one connection's challenge into another's login.

The login order, on every connection::

    HELLO -> NeedLoginSignature -> login() -> LOGIN ... LOGGED_IN
          -> NeedPrekeys -> upload_prekeys() -> UPLOAD_PREKEYS ... OK (PrekeysStored)
          -> NeedOutbox -> outbox() -> SEND ... SEND_ACK, ERROR  (OutboxFlushed)
          -> outbox_recorded() -> held submissions sent -> SessionReady

Nothing here reads a clock other than the injected one, touches a socket,
a thread or a file, or logs: what deserves a log line is an effect
(:class:`Refused`, :class:`ConnectionClosed`, ...), logged by the driver.
Not thread-safe: a driver that calls it from several threads holds one lock
around every call (and never calls anything else while holding it).

Never imports asyncio, socket, ssl or threading (``lint-imports`` checks it).
"""

from __future__ import annotations

import enum
import heapq
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from agentmesh.errors import (
    CryptoError,
    DecodeError,
    HubError,
    IdentityChangedError,
    LocalProtocolError,
)
from agentmesh.protocol import hub_protocol as hp
from agentmesh.wire.envelope import decode_envelope

#: Hub error codes after which reconnecting may help.
RETRYABLE_CODES = frozenset(
    {
        "shutting_down",
        "too_many_connections",
        "handshake_timeout",
        "idle_timeout",
        "internal",
        "rate_limited",
    }
)
#: Why a client gives up on a hub before login: it is not the hub it dialled, or too old.
HELLO_REFUSALS = frozenset({"wrong_hub", "unsupported_version"})
#: Bytes of an UPLOAD_PREKEYS frame besides the prekeys (length, type, request id, count).
_UPLOAD_OVERHEAD = 4 + 1 + 4 + 2


def backoff(
    initial: float = 0.1,
    maximum: float = 10.0,
    factor: float = 2.0,
    rng: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Retry delays: exponential growth capped at ``maximum``, with full jitter.

    The n-th value is uniform in ``[0, min(maximum, initial * factor**n))``
    (``rng`` returns floats in [0, 1); inject it for deterministic tests).
    """
    ceiling = initial
    while True:
        yield rng() * ceiling
        ceiling = min(maximum, ceiling * factor)


def chunk_prekeys(prekeys: list[bytes], max_frame_size: int) -> list[list[bytes]]:
    """Split encoded prekeys into UPLOAD_PREKEYS frames within ``max_frame_size``."""
    chunks: list[list[bytes]] = []
    current: list[bytes] = []
    size = _UPLOAD_OVERHEAD
    for prekey in prekeys:
        cost = 2 + len(prekey)
        if current and (size + cost > max_frame_size or len(current) >= hp.MAX_PREKEYS_PER_UPLOAD):
            chunks.append(current)
            current, size = [], _UPLOAD_OVERHEAD
        current.append(prekey)
        size += cost
    if current:
        chunks.append(current)
    return chunks


# --- the verdict on a received envelope --------------------------------------


class Verdict(enum.Enum):
    """What the hub should do with a pushed envelope, given what the endpoint did with it."""

    #: Committed (or committed before: a redelivery). ACK it: the hub deletes it.
    ACK = "ack"
    #: Poison (forged, tampered, replayed): it can never be processed. ACK it too.
    DROP = "drop"
    #: From a peer whose identity key changed: left on the hub (no ACK) until the
    #: user trusts the new key; it is pushed again after the next login.
    HOLD = "hold"
    #: Receiving it failed for another reason: left on the hub, redelivered later.
    RETRY = "retry"

    @property
    def acks(self) -> bool:
        return self in (Verdict.ACK, Verdict.DROP)


def verdict(outcome: object) -> Verdict:
    """The verdict on an envelope whose hand-over returned (a report) or raised ``outcome``."""
    if isinstance(outcome, IdentityChangedError):
        return Verdict.HOLD
    if isinstance(outcome, CryptoError | DecodeError):
        return Verdict.DROP
    if isinstance(outcome, BaseException):
        return Verdict.RETRY
    return Verdict.ACK


# --- effects -----------------------------------------------------------------


class Effect:
    """Base of everything a session asks its driver to do (frozen dataclasses)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Greeted(Effect):
    """The hub's HELLO arrived and names the hub this session dialled."""

    hub_names: tuple[str, ...]
    max_envelope_bytes: int


@dataclass(frozen=True, slots=True)
class NeedLoginSignature(Effect):
    """Sign ``challenge`` (``endpoint.sign_login``), read ``endpoint.prekey_bundle_bytes()``,
    then call :meth:`ClientSession.login`."""

    generation: int
    challenge: bytes


@dataclass(frozen=True, slots=True)
class NeedPrekeys(Effect):
    """Logged in: read ``endpoint.one_time_prekeys()``, then call
    :meth:`ClientSession.upload_prekeys`."""

    generation: int


@dataclass(frozen=True, slots=True)
class PrekeysStored(Effect):
    """The hub holds these one-time prekeys: ``endpoint.one_time_prekeys_uploaded``."""

    encoded: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class NeedOutbox(Effect):
    """Prekeys are up: read ``endpoint.unacked_envelopes()``, then call
    :meth:`ClientSession.outbox`. Submissions from now on wait for the flush."""

    generation: int


@dataclass(frozen=True, slots=True)
class OutboxFlushed(Effect):
    """Every re-sent outbox envelope was answered. Record ``acked`` (the hub stored
    them: ``endpoint.envelopes_acked``), then call :meth:`ClientSession.outbox_recorded`."""

    generation: int
    acked: tuple[bytes, ...]
    sent: int


@dataclass(frozen=True, slots=True)
class SessionReady(Effect):
    """Logged in (or, anonymously, greeted) and flushed: resume dispatching pushes."""

    envelope_limit: int


@dataclass(frozen=True, slots=True)
class LoginFailed(Effect):
    """The hub refused the login or its prekey upload: close the transport and raise
    the hub error for ``code``."""

    code: str
    text: str


@dataclass(frozen=True, slots=True)
class DeliverEnvelopes(Effect):
    """New pushes, in the hub's order: hand them to the endpoint, then report the
    outcomes with :meth:`ClientSession.envelopes_handled`."""

    items: tuple[hp.EnvelopePushed, ...]


@dataclass(frozen=True, slots=True)
class AckResolved(Effect):
    """The hub stored these envelopes: drop them from the outbox
    (``endpoint.envelopes_acked``), then call :meth:`ClientSession.acks_recorded`
    with ``window_slots``."""

    message_ids: tuple[bytes, ...]
    window_slots: int


@dataclass(frozen=True, slots=True)
class PrekeysLow(Effect):
    """The hub's pool of our one-time prekeys is low: ``endpoint.prekeys_low``, then
    :meth:`ClientSession.publish` the bundle and the new prekeys."""

    remaining: int


@dataclass(frozen=True, slots=True)
class Answer(Effect):
    """The answer to an awaited request (``token`` as returned when it was made)."""

    token: int
    event: hp.Event


@dataclass(frozen=True, slots=True)
class Refused(Effect):
    """Something the session sent on its own was refused (logged, never raised).

    ``what``: ``"envelope"`` (a submitted one; it stays in the outbox), ``"outbox"``
    (a re-sent one), ``"prekeys"`` (a top-up) or ``"unsolicited"`` (an ERROR that
    answers nothing outstanding). ``report``: tell the endpoint
    (``envelope_refused(message_id, error)`` with the hub error for ``code`` and
    ``recipient``), which decides whether a resend can ever cure it.
    """

    what: str
    code: str
    text: str
    message_id: bytes = b""
    recipient: str = ""
    report: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Effect):
    """The connection failed (a fatal ERROR, sent or received): write the last bytes,
    close the transport. ``hello_refused``: before any login, the hub is not one this
    client may log in to (``wrong_hub``, ``unsupported_version``): do not retry."""

    code: str
    detail: str
    sent_by_peer: bool
    hello_refused: bool


@dataclass(frozen=True, slots=True)
class Unresponsive(Effect):
    """Nothing received for three keepalive intervals: abort the transport."""

    silent: float


# --- the session -------------------------------------------------------------


class Phase(enum.Enum):
    """Where the current connection is in the login order."""

    DISCONNECTED = "DISCONNECTED"
    AWAIT_HELLO = "AWAIT_HELLO"
    SIGNING = "SIGNING"  # NeedLoginSignature out
    LOGGING_IN = "LOGGING_IN"  # LOGIN sent
    UPLOADING = "UPLOADING"  # NeedPrekeys out, or the login's upload in flight
    FLUSHING = "FLUSHING"  # NeedOutbox out, re-sends in flight, or OutboxFlushed out
    READY = "READY"
    CLOSED = "CLOSED"  # close(): for good


class _Kind(enum.Enum):
    LOGIN = "login"
    LOGIN_UPLOAD = "login upload"
    UPLOAD = "upload"
    PUBLISH = "publish"
    OUTBOX = "outbox send"
    PIPELINED = "pipelined send"
    AWAITED = "awaited send"
    QUERY = "query"


@dataclass(slots=True, eq=False)
class _Request:
    kind: _Kind
    token: int
    message_id: bytes = b""
    data: bytes = b""
    chunk: tuple[bytes, ...] = ()
    deadline: float | None = None
    delays: Iterator[float] | None = None


@dataclass(order=True, slots=True)
class _Retry:
    due: float
    seq: int
    request: _Request = field(compare=False)


#: Push events and SEND_ACK/ERROR answers that complete a request.
_ANSWERS = (
    hp.RequestSucceeded,
    hp.BundleReceived,
    hp.AgentsReceived,
    hp.StatsReceived,
    hp.SendAcknowledged,
    hp.ErrorReceived,
    hp.LoginAccepted,
)


class ClientSession:
    """One agent's session with a hub (or, with ``agent_id=None``, an anonymous one
    that only asks directory questions), across its connections. See the module
    docstring for the calling contract.

    ``stored_prekeys``: the one-time prekeys the hub acknowledged for this agent;
    pass the same set to the agent's next session (a re-registration) so a key the
    hub may already have handed out is never uploaded twice. ``retry_delays``
    makes the backoff of ``rate_limited`` sends; ``clock`` and ``rng`` are
    injected for deterministic tests.
    """

    def __init__(
        self,
        agent_id: str | None = None,
        signing_public_key: bytes = b"",
        *,
        send_window: int = 1024,
        ping_interval: float = 20.0,
        ack_timeout: float = 30.0,
        max_frame_size: int = hp.CLIENT_MAX_FRAME_SIZE,
        expected_hub_address: str | None = None,
        dialled_address: str | None = None,
        stored_prekeys: set[bytes] | None = None,
        ephemeral: bool = False,
        retry_delays: Callable[[], Iterator[float]] = backoff,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if send_window < 1:
            raise ValueError("send_window must be at least 1")
        self.agent_id = agent_id
        self.signing_public_key = signing_public_key
        #: Log in for an ephemeral binding (the agent keeps no key file).
        self.ephemeral = ephemeral
        self.send_window = send_window
        self.ping_interval = ping_interval
        self.ack_timeout = ack_timeout
        self.max_frame_size = max_frame_size
        self.expected_hub_address = expected_hub_address
        self.dialled_address = dialled_address
        self.stored_prekeys: set[bytes] = set() if stored_prekeys is None else stored_prekeys
        self._retry_delays = retry_delays
        self._clock = clock
        self._rng = rng
        self.phase = Phase.DISCONNECTED
        self.conn: hp.ClientConnection | None = None
        #: Increases with every connection; results for an older one are ignored.
        self.generation = 0
        #: The hub's envelope limit on the last connection (None before the first HELLO).
        self.envelope_limit: int | None = None
        #: The code of the fatal ERROR that ended the current connection, if any.
        self.close_reason: str | None = None
        self._requests: dict[int, _Request] = {}
        self._retries: list[_Retry] = []
        self._retry_seq = 0
        self._next_token = 1
        self._in_flight = 0
        self._held: list[_Request] = []
        self._acks: list[bytes] = []
        self._queued: set[bytes] = set()
        self._uploading: set[bytes] = set()
        self._login_chunks: set[int] = set()
        self._outbox_pending: set[int] = set()
        self._outbox_acked: list[bytes] = []
        self._outbox_sent = 0
        self._outbox_read = False
        self._last_rx = 0.0
        self._keepalive_at: float | None = None

    # -- state ----------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """Logged in on the current connection (requests may be sent)."""
        return self.conn is not None and self.conn.state is hp.State.AUTHENTICATED

    @property
    def ready(self) -> bool:
        """Logged in and flushed (or anonymously greeted): the normal running state."""
        return self.phase is Phase.READY

    @property
    def flushing(self) -> bool:
        """Between asking for the outbox and being ready: a new envelope would miss the
        re-send, so submissions are held and sent right after it."""
        return self.phase is Phase.FLUSHING

    @property
    def closed_by_protocol(self) -> bool:
        """The connection state machine is CLOSED: close the transport after writing."""
        return self.conn is not None and self.conn.closed

    @property
    def in_flight(self) -> int:
        """Submitted envelopes not yet acknowledged (and recorded), refused or given back."""
        return self._in_flight

    @property
    def has_room(self) -> bool:
        """Whether the send window has room for another :meth:`submit`."""
        return self._in_flight < self.send_window

    @property
    def outstanding(self) -> int:
        """Requests sent on the current connection and not answered yet."""
        return len(self._requests)

    # -- connection lifecycle -----------------------------------------------

    def connected(self, channel_binding: bytes = b"") -> None:
        """A new transport is up (after its TLS handshake: ``channel_binding`` is
        :func:`~agentmesh.protocol.hub_protocol.tls_server_end_point` of the
        certificate it verified, empty without TLS). The hub speaks first."""
        if self.phase is Phase.CLOSED:
            raise LocalProtocolError("this session is closed")
        if self.phase is not Phase.DISCONNECTED:
            self.connection_lost()
        self.generation += 1
        self.conn = hp.ClientConnection(
            max_frame_size=self.max_frame_size,
            expected_hub_address=self.expected_hub_address,
            dialled_address=self.dialled_address,
            channel_binding=channel_binding,
        )
        self.close_reason = None
        self.phase = Phase.AWAIT_HELLO
        self._last_rx = self._clock()

    def connection_lost(self) -> None:
        """The transport is gone. Everything tied to it is forgotten: unanswered
        requests, pending retries and ACKs (the hub redelivers unacknowledged pushes),
        and submitted envelopes not yet acknowledged, which free their window slots
        (they stay in the outbox, which the next login re-sends)."""
        self._forget()
        self.conn = None
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.DISCONNECTED

    def _forget(self) -> None:
        lost = sum(1 for r in self._requests.values() if r.kind is _Kind.PIPELINED)
        lost += sum(1 for r in self._retries if r.request.kind is _Kind.PIPELINED)
        lost += len(self._held)
        self._in_flight -= lost
        self._requests.clear()
        self._retries.clear()
        self._held.clear()
        self._acks.clear()
        self._uploading.clear()
        self._login_chunks.clear()
        self._outbox_pending.clear()
        self._outbox_acked.clear()
        self._outbox_read = False
        self._keepalive_at = None

    def close(self) -> None:
        """Stop for good. Pending ACKs still go out with the next :meth:`data_to_send`;
        submitted envelopes not yet acknowledged free their window slots."""
        acks = self._acks
        self._forget()
        self._acks = acks
        self.phase = Phase.CLOSED

    def data_to_send(self) -> bytes:
        """Bytes to write now: what the requests queued, plus one ACK frame for every
        push handled since the last call (while logged in). Clears both."""
        conn = self.conn
        if conn is None:
            return b""
        if self._acks and conn.state is hp.State.AUTHENTICATED:
            acks, self._acks = self._acks, []
            conn.ack(acks)
        return conn.data_to_send()

    # -- timers -------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` is due next (on ``clock``), or None."""
        due = self._retries[0].due if self._retries else None
        if self._keepalive_at is not None and (due is None or self._keepalive_at < due):
            due = self._keepalive_at
        return due

    def handle_timer(self) -> list[Effect]:
        """Re-send ``rate_limited`` envelopes whose delay passed, and keep the connection
        alive: PING after one silent ``ping_interval``, :class:`Unresponsive` after three."""
        now = self._clock()
        effects: list[Effect] = []
        while self._retries and self._retries[0].due <= now:
            self._resend(heapq.heappop(self._retries).request, effects)
        if self._keepalive_at is not None and self._keepalive_at <= now:
            interval = self.ping_interval
            silent = now - self._last_rx
            if silent >= 3 * interval:
                self._keepalive_at = None
                effects.append(Unresponsive(silent))
            else:
                if silent >= interval and self.authenticated:
                    assert self.conn is not None
                    self.conn.ping()
                self._keepalive_at = now + interval
        return effects

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Effect]:
        """Process bytes from the hub; return the effects, in the order to apply them."""
        conn = self.conn
        if conn is None or self.phase in (Phase.DISCONNECTED, Phase.CLOSED):
            return []
        self._last_rx = self._clock()
        effects: list[Effect] = []
        pushes: list[hp.EnvelopePushed] = []
        acked: list[bytes] = []
        slots = 0
        for event in conn.receive_data(data):
            if isinstance(event, hp.EnvelopePushed):
                if event.message_id not in self._queued:
                    self._queued.add(event.message_id)
                    pushes.append(event)
            elif isinstance(event, hp.SendAcknowledged):
                slots += self._on_send_ack(event, acked, effects)
            elif isinstance(event, _ANSWERS):
                self._on_answer(event, effects)
            elif isinstance(event, hp.HelloReceived):
                self._on_hello(event, effects)
            elif isinstance(event, hp.PrekeysLowReceived):
                effects.append(PrekeysLow(event.remaining))
            elif isinstance(event, hp.ConnectionFailed):
                self.close_reason = event.code
                effects.append(
                    ConnectionClosed(
                        event.code,
                        event.detail,
                        event.sent_by_peer,
                        self.phase is Phase.AWAIT_HELLO and event.code in HELLO_REFUSALS,
                    )
                )
        if acked:
            effects.append(AckResolved(tuple(acked), slots))
        if pushes:
            effects.append(DeliverEnvelopes(tuple(pushes)))
        return effects

    def _on_hello(self, event: hp.HelloReceived, effects: list[Effect]) -> None:
        assert self.conn is not None
        self.envelope_limit = event.max_envelope_bytes
        effects.append(Greeted(event.hub_names, event.max_envelope_bytes))
        if self.agent_id is None:
            self.phase = Phase.READY  # anonymous: directory questions only
            effects.append(SessionReady(event.max_envelope_bytes))
            return
        self.phase = Phase.SIGNING
        effects.append(
            NeedLoginSignature(
                self.generation,
                self.conn.login_challenge(self.agent_id, ephemeral=self.ephemeral),
            )
        )

    def _on_send_ack(
        self, event: hp.SendAcknowledged, acked: list[bytes], effects: list[Effect]
    ) -> int:
        """Returns 1 if the ack frees a window slot (once recorded)."""
        request = self._requests.pop(event.request_id, None)
        if request is None or request.kind is _Kind.PIPELINED:
            # A pipelined send's ack, or one that came after an awaited send was
            # abandoned: either way the envelope can leave the outbox.
            acked.append(event.message_id)
            return 0 if request is None else 1
        if request.kind is _Kind.OUTBOX:
            self._outbox_acked.append(event.message_id)
            self._outbox_answered(request.token, effects)
        else:
            effects.append(Answer(request.token, event))
        return 0

    def _on_answer(self, event: hp.Event, effects: list[Effect]) -> None:
        request_id: int = getattr(event, "request_id", 0)
        request = self._requests.pop(request_id, None) if request_id else None
        if request is None:
            if isinstance(event, hp.ErrorReceived) and not event.fatal:
                effects.append(Refused("unsolicited", event.code, event.text, event.message_id))
            return  # a fatal one is reported by the ConnectionFailed that follows
        error = event if isinstance(event, hp.ErrorReceived) else None
        kind = request.kind
        if kind is _Kind.LOGIN:
            if error is not None:
                effects.append(LoginFailed(error.code, error.text))
            else:
                self.phase = Phase.UPLOADING
                effects.append(NeedPrekeys(self.generation))
        elif kind is _Kind.LOGIN_UPLOAD or kind is _Kind.UPLOAD:
            self._uploading.difference_update(request.chunk)
            if error is not None:
                if kind is _Kind.LOGIN_UPLOAD:
                    effects.append(LoginFailed(error.code, error.text))
                else:
                    effects.append(Refused("prekeys", error.code, error.text))
                return
            self.stored_prekeys.update(request.chunk)
            effects.append(PrekeysStored(request.chunk))
            if kind is _Kind.LOGIN_UPLOAD:
                self._login_chunks.discard(request_id)
                if not self._login_chunks and self.phase is Phase.UPLOADING:
                    self._start_flush(effects)
        elif kind is _Kind.PUBLISH:
            if error is not None:
                effects.append(Refused("prekeys", error.code, error.text))
        elif kind is _Kind.QUERY:
            effects.append(Answer(request.token, event))
        elif error is None:
            # Not an answer to a SEND (a misbehaving hub): the send stays unanswered
            # and, if awaited, times out; its envelope stays in the outbox.
            self._requests[request_id] = request
        elif error.code == "rate_limited" and self._retry(request):
            return
        elif kind is _Kind.PIPELINED:
            self._in_flight -= 1
            effects.append(self._refused("envelope", error, request))
        elif kind is _Kind.OUTBOX:
            effects.append(self._refused("outbox", error, request))
            self._outbox_answered(request.token, effects)
        else:  # AWAITED
            effects.append(Answer(request.token, event))

    @staticmethod
    def _refused(what: str, error: hp.ErrorReceived, request: _Request) -> Refused:
        recipient = _recipient(request.data)
        return Refused(what, error.code, error.text, request.message_id, recipient, report=True)

    def _retry(self, request: _Request) -> bool:
        """Schedule a re-send of a ``rate_limited`` envelope; False past its deadline."""
        now = self._clock()
        if request.kind is _Kind.PIPELINED:
            delay = 0.05 + 0.2 * self._rng()  # no deadline: until the connection drops
        else:
            if request.delays is None:
                request.delays = self._retry_delays()
            delay = next(request.delays)
            if request.deadline is not None and now + delay >= request.deadline:
                return False
        self._retry_seq += 1
        heapq.heappush(self._retries, _Retry(now + delay, self._retry_seq, request))
        return True

    def _resend(self, request: _Request, effects: list[Effect]) -> None:
        if not self.authenticated:
            return  # connection_lost forgets it (and frees its window slot)
        assert self.conn is not None
        rid = self.conn.send(request.data)
        self._requests[rid] = request

    # -- endpoint results: the login order ------------------------------------

    def login(self, generation: int, signature: bytes, bundle: bytes = b"") -> list[Effect]:
        """The endpoint signed :class:`NeedLoginSignature`'s challenge: send LOGIN
        (publishing ``bundle``)."""
        if generation != self.generation or self.phase is not Phase.SIGNING:
            return []
        assert self.conn is not None and self.agent_id is not None
        rid = self.conn.login(
            self.agent_id, self.signing_public_key, signature, bundle, ephemeral=self.ephemeral
        )
        self._requests[rid] = _Request(_Kind.LOGIN, self._token())
        self.phase = Phase.LOGGING_IN
        return []

    def upload_prekeys(self, generation: int, prekeys: Sequence[bytes]) -> list[Effect]:
        """The endpoint's unpublished one-time prekeys (:class:`NeedPrekeys`): upload
        those the hub does not hold yet."""
        if generation != self.generation or self.phase is not Phase.UPLOADING:
            return []
        if self._login_chunks:
            return []  # answered twice: the first upload is in flight
        effects: list[Effect] = []
        self._login_chunks = self._upload(prekeys, _Kind.LOGIN_UPLOAD, effects)
        if not self._login_chunks:
            self._start_flush(effects)
        return effects

    def _upload(self, prekeys: Iterable[bytes], kind: _Kind, effects: list[Effect]) -> set[int]:
        """UPLOAD_PREKEYS for every key the hub neither stores nor is being sent; report
        the stored ones at once. Never a key twice: the hub may have handed it out (and
        deleted it) since, and a second copy would be handed out again, to a sender whose
        initial message then cannot decrypt. (A login, a PREKEYS_LOW top-up and a refresh
        can all read the same not-yet-marked keys.)"""
        assert self.conn is not None
        known: list[bytes] = []
        fresh: list[bytes] = []
        for prekey in dict.fromkeys(prekeys):
            if prekey in self.stored_prekeys:
                known.append(prekey)
            elif prekey not in self._uploading:
                fresh.append(prekey)
        if known:
            effects.append(PrekeysStored(tuple(known)))
        request_ids: set[int] = set()
        for chunk in chunk_prekeys(fresh, self.conn.peer_max_frame_size):
            rid = self.conn.upload_prekeys(chunk)
            self._requests[rid] = _Request(kind, self._token(), chunk=tuple(chunk))
            self._uploading.update(chunk)
            request_ids.add(rid)
        return request_ids

    def _start_flush(self, effects: list[Effect]) -> None:
        self.phase = Phase.FLUSHING
        effects.append(NeedOutbox(self.generation))

    def outbox(self, generation: int, envelopes: Sequence[bytes]) -> list[Effect]:
        """The endpoint's outbox, oldest first (:class:`NeedOutbox`): re-send it all."""
        if generation != self.generation or self.phase is not Phase.FLUSHING:
            return []
        if self._outbox_read:
            return []
        assert self.conn is not None
        self._outbox_read = True
        effects: list[Effect] = []
        deadline = self._clock() + self.ack_timeout
        limit = self.conn.max_envelope_bytes
        self._outbox_sent = len(envelopes)
        for data in envelopes:
            message_id = _message_id(data)
            if len(data) > limit:
                effects.append(
                    Refused(
                        "outbox",
                        "too_large",
                        f"envelope of {len(data)} bytes exceeds the hub's limit",
                        message_id,
                        _recipient(data),
                        report=True,
                    )
                )
                continue
            rid = self.conn.send(data)
            request = _Request(_Kind.OUTBOX, self._token(), message_id, data, deadline=deadline)
            self._requests[rid] = request
            self._outbox_pending.add(request.token)
        if not self._outbox_pending:
            self._outbox_done(effects)
        return effects

    def _outbox_answered(self, token: int, effects: list[Effect]) -> None:
        self._outbox_pending.discard(token)
        if not self._outbox_pending:
            self._outbox_done(effects)

    def _outbox_done(self, effects: list[Effect]) -> None:
        acked, self._outbox_acked = tuple(self._outbox_acked), []
        if not acked and not self._outbox_sent:
            self._become_ready(effects)  # nothing to record
            return
        effects.append(OutboxFlushed(self.generation, acked, self._outbox_sent))

    def outbox_recorded(self, generation: int) -> list[Effect]:
        """The endpoint recorded :class:`OutboxFlushed`'s acks: send what was submitted
        meanwhile and resume."""
        if generation != self.generation or self.phase is not Phase.FLUSHING:
            return []
        if not self._outbox_read or self._outbox_pending:
            return []
        effects: list[Effect] = []
        self._become_ready(effects)
        return effects

    def _become_ready(self, effects: list[Effect]) -> None:
        self.phase = Phase.READY
        held, self._held = self._held, []
        for request in held:
            self._in_flight -= 1  # counted again by _send_pipelined
            self._send_pipelined(request.data, request.message_id, effects)
        self._keepalive_at = self._clock() + self.ping_interval
        assert self.envelope_limit is not None
        effects.append(SessionReady(self.envelope_limit))

    # -- endpoint results: after the login ------------------------------------

    def publish(self, bundle: bytes, prekeys: Sequence[bytes]) -> list[Effect]:
        """Publish ``bundle`` and upload the new ones of ``prekeys`` (a top-up or a
        refresh); a no-op while not logged in (the next login uploads them)."""
        if not self.authenticated or self.phase is Phase.CLOSED:
            return []
        assert self.conn is not None
        rid = self.conn.publish_bundle(bundle)
        self._requests[rid] = _Request(_Kind.PUBLISH, self._token())
        effects: list[Effect] = []
        self._upload(prekeys, _Kind.UPLOAD, effects)
        return effects

    def envelopes_handled(self, results: Sequence[tuple[bytes, object]]) -> list[Verdict]:
        """What handing pushed envelopes to the endpoint returned or raised, as
        ``(message id, outcome)``: decide each verdict and batch the ACKs (they go
        out with the next :meth:`data_to_send`)."""
        verdicts: list[Verdict] = []
        for message_id, outcome in results:
            self._queued.discard(message_id)
            decided = verdict(outcome)
            if decided.acks:
                self._acks.append(message_id)
            verdicts.append(decided)
        return verdicts

    def acks_recorded(self, window_slots: int) -> None:
        """The endpoint recorded an :class:`AckResolved`: free its window slots."""
        self._in_flight -= window_slots

    # -- sending --------------------------------------------------------------

    def submit(self, envelope: bytes, message_id: bytes) -> list[Effect]:
        """Send ``envelope`` without waiting for its ack (call only while
        :attr:`has_room`). Ready: sent now. Flushing: held, sent right after the
        flush. Otherwise dropped here: it is in the outbox, which the next login
        re-sends."""
        effects: list[Effect] = []
        if self.phase is Phase.READY and self.authenticated:
            self._send_pipelined(envelope, message_id, effects)
        elif self.phase is Phase.FLUSHING:
            self._in_flight += 1
            self._held.append(_Request(_Kind.PIPELINED, 0, message_id, envelope))
        return effects

    def _send_pipelined(self, data: bytes, message_id: bytes, effects: list[Effect]) -> None:
        assert self.conn is not None
        try:
            rid = self.conn.send(data)
        except LocalProtocolError as exc:  # larger than this hub accepts
            effects.append(Refused("envelope", "too_large", str(exc), message_id))
            return
        self._in_flight += 1
        self._requests[rid] = _Request(_Kind.PIPELINED, self._token(), message_id, data)

    def send(self, envelope: bytes, message_id: bytes, deadline: float | None = None) -> int:
        """Send ``envelope`` and return a token; its :class:`Answer` (SEND_ACK, or the
        ERROR) carries it. ``rate_limited`` is retried until ``deadline`` (default
        ``ack_timeout`` from now). Raises HubError ``too_large`` above the hub's limit,
        LocalProtocolError while not logged in."""
        conn = self._logged_in()
        if len(envelope) > conn.max_envelope_bytes:
            raise HubError(
                "too_large", f"envelope of {len(envelope)} bytes exceeds the hub's limit"
            )
        if deadline is None:
            deadline = self._clock() + self.ack_timeout
        request = _Request(_Kind.AWAITED, self._token(), message_id, envelope, deadline=deadline)
        self._requests[conn.send(envelope)] = request
        return request.token

    def abandon(self, token: int) -> None:
        """Nobody waits for ``token`` any more (a timeout): forget it. A SEND_ACK that
        still comes for it becomes an :class:`AckResolved` (without a window slot)."""
        for rid, request in list(self._requests.items()):
            if request.token == token:
                del self._requests[rid]
        kept = [r for r in self._retries if r.request.token != token]
        if len(kept) != len(self._retries):
            heapq.heapify(kept)
            self._retries = kept

    def _token(self) -> int:
        """Tokens are unique for the session's life (request ids restart per connection)."""
        token, self._next_token = self._next_token, self._next_token + 1
        return token

    # -- queries --------------------------------------------------------------

    def _logged_in(self) -> hp.ClientConnection:
        if self.conn is None or self.conn.state is not hp.State.AUTHENTICATED:
            raise LocalProtocolError("not logged in to the hub")
        return self.conn

    def _query(self, make: Callable[[hp.ClientConnection], int], anonymous: bool) -> int:
        conn = self.conn
        if conn is None or conn.closed:
            raise LocalProtocolError("not connected to the hub")
        if not anonymous:
            conn = self._logged_in()
        request = _Request(_Kind.QUERY, self._token())
        self._requests[make(conn)] = request
        return request.token

    def fetch_bundle(self, agent_id: str) -> int:
        """FETCH_BUNDLE; returns the token of its :class:`Answer`."""
        return self._query(lambda conn: conn.fetch_bundle(agent_id), anonymous=False)

    def list_agents(self) -> int:
        """LIST_AGENTS (anonymously too); returns the token of its :class:`Answer`."""
        return self._query(lambda conn: conn.list_agents(), anonymous=True)

    def get_stats(self) -> int:
        """GET_STATS (anonymously too); returns the token of its :class:`Answer`."""
        return self._query(lambda conn: conn.get_stats(), anonymous=True)

    def rotation_challenge(self, old_key: bytes, new_key: bytes) -> bytes:
        """The bytes both keys sign for :meth:`rotate_key` on this connection."""
        return self._logged_in().rotation_challenge(old_key, new_key)

    def rotate_key(self, new_key: bytes, old_signature: bytes, new_signature: bytes) -> int:
        """ROTATE_KEY; returns the token of its :class:`Answer`."""
        return self._query(
            lambda conn: conn.rotate_key(new_key, old_signature, new_signature), anonymous=False
        )


def _message_id(data: bytes) -> bytes:
    try:
        return decode_envelope(data).message_id
    except DecodeError:
        return b""


def _recipient(data: bytes) -> str:
    try:
        return decode_envelope(data).recipient
    except DecodeError:
        return ""
