"""``Agent`` and ``Message``: the version 1 API, on PQXDH and the Double Ratchet.

An :class:`Agent` is the synchronous driver of one
:class:`~agentmesh.agent_core.AgentCore` (identity, sessions, prekey schedule, seal
and open, with no threads, locks or sockets) over its durable state
(:mod:`agentmesh.state`), and talks to any hub with the
:class:`~agentmesh.protocol.hub_interface.Hub` shape. The driver owns what the core
must not: the lock that serialises calls into the core, the hub calls (bundle
fetches, transmits, prekey uploads, made with no lock held), the pipelined
transmitter thread, handler dispatch, the pull API and request/reply waiters.

Send order (issue "agent state"): encrypt → commit the session and the
outbox row in one transaction → transmit → drop the outbox row when the hub
acknowledges. Receive order: decrypt on a copy → commit session, replay
record and inbox row in one transaction → acknowledge → run the handlers →
delete the inbox row. After a crash, the outbox is resent (same message ids;
the hub drops duplicates) and unhandled inbox rows are dispatched again.

Threads: ``agentmesh-send-<id>`` (``send(wait=False)``'s transmitter, stopped by
:meth:`Agent.close`) and the module's one-worker signature verifier. Handlers run
in the thread that dispatches (see :meth:`AgentEndpoint.dispatch_pending`).

Lock order (docs/ARCHITECTURE.md): ``Agent._lock`` (every call into the core),
then ``_queue_ready`` or ``_arrival``, then ``AgentState._lock``. ``_dispatch_cv``
nests with nothing. No lock is held while a handler runs or while the hub is
called: bundles are fetched before ``_lock`` is taken and new prekeys published
after it is released.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentmesh.agent_core import AgentCore, InboxRow, SignatureChecks, verify_each
from agentmesh.crypto import primitives as p
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.crypto.prekeys import (
    ONE_TIME_POOL_SIZE,
    PrekeyBundle,
)
from agentmesh.crypto.proof import encode_proof, verify_proof
from agentmesh.crypto.ratchet import DEFAULT_LIMITS, RatchetLimits
from agentmesh.errors import (
    ConfigurationError,
    CryptoError,
    DecodeError,
    HubError,
    HubUnavailableError,
    InvalidKeyError,
    LocalProtocolError,
    NoHubError,
    NoSessionError,
    PeerNotFoundError,
    RequestTimeoutError,
)
from agentmesh.ids import validate_agent_id
from agentmesh.keyfile import load_or_create_key_file
from agentmesh.protocol.hub_interface import (
    BackgroundRegisteringHub,
    DeliveryReport,
    EnvelopeLimitedHub,
    Hub,
    PipelinedHub,
    PrekeyRefreshingHub,
    RoutingHub,
    supports,
)
from agentmesh.state import AgentState, StateLock, state_path_for
from agentmesh.wire.envelope import decode_envelope
from agentmesh.wire.payload import decode_payload, encode_payload

#: Replay window: ids are remembered this long, and older messages are refused.
DEFAULT_REPLAY_WINDOW_MS = 30 * 24 * 3600 * 1000

Handler = Callable[["Message"], Any]
#: send(wait=False) group commit: while sends stream in, a group waits this long
#: (or until this many envelopes) for company before its one fsync.
_GROUP_WAIT_S = 0.001
_GROUP_MAX = 64
#: Batches this large verify their signatures on two threads (see _verify_all).
_PARALLEL_VERIFY_MIN = 8
#: Receipts whose handlers run at once (LocalHub) commit without an fsync; every
#: this many in a row, one is durable, so that a power cut rolls a receiving chain
#: back by fewer messages than the skip limit absorbs (see _receive_and_handle).
_RELAXED_RECEIPTS_MAX = 64


#: How many times a handler that raises is run for one message, and the waits between.
DEFAULT_MAX_HANDLER_ATTEMPTS = 3
_HANDLER_RETRY_S = 0.05
_HANDLER_RETRY_MAX_S = 1.0
#: At interpreter exit an open agent waits this long for the hub to take its outbox.
DEFAULT_EXIT_FLUSH_TIMEOUT_S = 5.0
#: How long an envelope may wait in the outbox before it is dead-lettered as expired
#: (the hub's own default TTL: the hub would have dropped it by then).
DEFAULT_OUTBOX_TTL_S = 7 * 24 * 3600.0
#: A session notice (see Agent._send_session_notices): at most one per sender this often.
_NOTICE_INTERVAL_MS = 60_000
_NOTICE_PEERS_MAX = 10_000
_SESSION_NOTICE: dict[str, Any] = {
    "type": "agentmesh.session_notice",
    "text": "your message could not be opened here: start a new session",
}
#: Hub refusals of an envelope that no resend can cure: it leaves the outbox at once.
_UNCURABLE_REFUSALS = frozenset({"too_large", "bad_envelope", "forged_sender"})
#: How much of a failing handler's error a dead letter keeps.
_REASON_MAX = 500


def text_payload(text: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Version 1's message payload: ``{"type": "message", "text": text, **extra}``
    (``type=`` in ``extra`` overrides the type)."""
    return {"type": "message", "text": text, **extra}


def handler_retry_delay(attempt: int) -> float:
    """The wait before rerunning a handler after its ``attempt``-th failure (1-based)."""
    return float(min(_HANDLER_RETRY_MAX_S, _HANDLER_RETRY_S * 2 ** (attempt - 1)))


def handler_failed(
    log: logging.Logger,
    handler: object,
    message: Message,
    exc: Exception,
    attempt: int,
    attempts: int,
) -> bool:
    """Log a handler's failure on its ``attempt``-th run (of ``attempts``); return
    whether to run it again, after :func:`handler_retry_delay` (both drivers' rule)."""
    if attempt >= attempts:
        log.error(
            "message handler %r raised on message %s (attempt %d of %d)",
            handler,
            message.message_id,
            attempt,
            attempts,
            exc_info=exc,
        )
        return False
    log.warning(
        "message handler %r raised %s on message %s (attempt %d of %d); retrying",
        handler,
        type(exc).__name__,
        message.message_id,
        attempt,
        attempts,
    )
    return True


def failure_reason(handler: object, exc: BaseException) -> str:
    """A dead letter's reason: which handler raised what (bounded)."""
    name = getattr(handler, "__qualname__", None) or type(handler).__name__
    return f"handler {name} raised {type(exc).__name__}: {exc}"[:_REASON_MAX]


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be handled or sent, kept with the reason.

    ``direction`` is ``"in"`` (received; its handler kept failing) or ``"out"``;
    ``message_id`` is hex; ``payload`` the decoded dict (or None); ``timestamp`` the
    sender's, in milliseconds. See :meth:`Agent.dead_letters`.
    """

    direction: str
    message_id: str
    peer: str
    reason: str
    payload: dict[str, Any] | None
    timestamp: int


@dataclass(frozen=True)
class OutboxEntry:
    """An envelope in the outbox: committed, not yet acknowledged by the hub.

    ``message_id`` is hex, ``created_ms`` when it was committed (milliseconds since
    the epoch), ``size`` the envelope's length in bytes. See :meth:`Agent.outbox`.
    """

    message_id: str
    recipient: str
    created_ms: int
    size: int


@dataclass(frozen=True)
class Message:
    """A decrypted message as handlers receive it (version 1 fields, plus audit data)."""

    sender: str
    recipient: str
    payload: dict[str, Any]
    timestamp: int
    message_id: str = ""
    #: The sender's Ed25519 signature (inside the ciphertext), if it signed.
    signature: bytes | None = field(default=None, repr=False)
    #: The envelope exactly as received (version 1's ``raw_envelope``).
    raw_envelope: bytes = field(default=b"", repr=False)
    #: The id of the message this one answers (see :meth:`Agent.request`), or None.
    in_reply_to: str | None = None
    #: The sender's public identity as pinned when the message was handed out, and the
    #: payload bytes exactly as signed: what :meth:`export_proof` needs.
    _sender_identity: bytes | None = field(default=None, repr=False, compare=False)
    _payload_bytes: bytes = field(default=b"", repr=False, compare=False)
    #: The agent that received it (for :meth:`reply`).
    _agent: Agent | None = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        return str(self.payload.get("text", ""))

    @property
    def type(self) -> str:
        return str(self.payload.get("type", "message"))

    @property
    def signed(self) -> bool:
        return self.signature is not None

    def reply(self, text: str = "", **kwargs: Any) -> str:
        """Answer this message: send ``{"type": "message", "text": text, **kwargs}`` to its
        sender as a reply (``in_reply_to`` = this message's id), which goes to the
        sender's waiting :meth:`Agent.request`. Returns the reply's message id.
        Same as ``agent.reply(msg, text, **kwargs)``."""
        if self._agent is None:
            raise LocalProtocolError("this message was not received by an agent: nothing replies")
        return self._agent.reply(self, text, **kwargs)

    def export_proof(self) -> bytes:
        """A transferable proof that the sender's identity key signed this message.

        Anyone can check it with :func:`agentmesh.verify_proof`, which returns the
        sender, recipient, message id, sender timestamp, payload and the signer's
        fingerprint (docs/PROTOCOL.md, "Proof of origin"). Keep it yourself (for
        example from a handler): the agent does not retain handled messages.
        Raises ValueError for an unsigned message (unsigned sessions are deniable by
        design), and CryptoError if the proof does not verify against the sender's
        identity as pinned now (``trust()`` replaced it after the message arrived).
        """
        if self.signature is None or self._sender_identity is None or not self.raw_envelope:
            raise ValueError("unsigned message: an unsigned session gives no proof of origin")
        header = decode_envelope(self.raw_envelope).header_bytes
        proof = encode_proof(
            self._sender_identity,
            header,
            self._payload_bytes,
            self.signature,
            None if self.in_reply_to is None else bytes.fromhex(self.in_reply_to),
        )
        verify_proof(proof)  # never hand out a proof that does not verify
        return proof


def _now_ms() -> int:
    return int(time.time() * 1000)


#: How many handlers (of any agent) this thread is running: a handler's own sends
#: never wait for another thread's dispatcher (see AgentEndpoint.dispatch_pending).
_handler_depth = threading.local()


def _in_handler() -> int:
    return int(getattr(_handler_depth, "value", 0))


_verifier_lock = threading.Lock()
_verifier: concurrent.futures.ThreadPoolExecutor | None = None


def _verify_all(checks: SignatureChecks) -> bool:
    """Whether every ``(key, signature, message)`` verifies: half on a helper thread
    (the core's ``verify_batch`` hook; Ed25519 verification releases the GIL)."""
    global _verifier
    with _verifier_lock:
        if _verifier is None:
            _verifier = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="agentmesh-verify"
            )
        pool = _verifier
    half = len(checks) // 2
    theirs = pool.submit(verify_each, checks[:half])
    mine = verify_each(checks[half:])
    return theirs.result() and mine


def _close_at_exit(ref: weakref.ref[Agent]) -> None:
    """atexit: flush an agent that is still open (bounded by its exit_flush_timeout_s),
    say what is still queued, then close it."""
    agent = ref()
    if agent is None or agent._closed:
        return
    try:
        if agent._exit_flush_timeout_s > 0 and not agent.flush(agent._exit_flush_timeout_s):
            agent.log.warning(
                "exiting with %d envelopes not yet taken by the hub; they stay in the "
                "outbox and are sent at the next start",
                agent._state.outbox_size(),
            )
        agent.close()
    except Exception:  # exit must go on
        agent.log.exception("closing the agent at exit failed")


#: _run_handler's answer when the agent closed while a handler waited for a retry.
_INTERRUPTED = object()


def _message_id_bytes(message_id: str) -> bytes:
    try:
        raw = bytes.fromhex(message_id)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise LocalProtocolError(f"not a message id (32 hex digits): {message_id!r}")
    return raw


class _PendingRequest:
    """One request() waiting for its reply (fields guarded by ``Agent._arrival``)."""

    __slots__ = ("callback", "claimed", "done", "reply")

    def __init__(self, callback: Callable[[], None] | None = None) -> None:
        self.callback = callback
        self.claimed = False  # a reply is being committed for it
        self.done = False
        self.reply: Message | None = None


class Agent:
    """An agent with an end-to-end encrypted identity.

    ``Agent(agent_id, hub=None, keypair_path=None, log_level=logging.WARNING)``
    keeps version 1's signature. With ``keypair_path`` the identity lives in
    that file (mode 0600, written atomically; ``passphrase`` encrypts it) and
    sessions, prekeys, pins, the replay window, the outbox and the inbox live
    in ``<name>.state.sqlite`` beside it, locked to one process. Without it,
    everything is kept in memory.

    Keyword-only extras: ``passphrase``, ``sign_messages`` (default True: every
    message carries an Ed25519 signature inside the ciphertext),
    ``require_signatures`` (default: the value of ``sign_messages``),
    ``ratchet_limits``, ``replay_window_ms``, ``clock_ms``, ``max_handler_attempts``
    (see :meth:`on_message`), ``exit_flush_timeout_s`` (at interpreter exit an
    agent still open waits up to this long for the hub to take its outbox, logs what
    is left, and closes; 0 skips the wait) and ``outbox_ttl_s`` (an envelope the hub
    has not taken after this long, default 7 days, moves to :meth:`dead_letters`).

    The signing mode belongs to a session, fixed by whoever starts it and
    authenticated by every message (docs/PROTOCOL.md, "Per-message signature"):
    sessions this agent starts are signed if ``sign_messages`` or
    ``require_signatures`` is true, and both sides then sign every message; in a
    signed session an unsigned message is refused. With ``require_signatures``
    an initial message that opens an unsigned session is refused too.
    ``_rng`` is a test hook (deterministic keys); never pass it in production.
    """

    def __init__(
        self,
        agent_id: str,
        hub: Hub | None = None,
        keypair_path: str | os.PathLike[str] | None = None,
        log_level: int = logging.WARNING,
        *,
        passphrase: str | None = None,
        sign_messages: bool = True,
        require_signatures: bool | None = None,
        ratchet_limits: RatchetLimits = DEFAULT_LIMITS,
        replay_window_ms: int = DEFAULT_REPLAY_WINDOW_MS,
        prekey_pool_size: int = ONE_TIME_POOL_SIZE,
        max_handler_attempts: int = DEFAULT_MAX_HANDLER_ATTEMPTS,
        exit_flush_timeout_s: float = DEFAULT_EXIT_FLUSH_TIMEOUT_S,
        outbox_ttl_s: float = DEFAULT_OUTBOX_TTL_S,
        clock_ms: Callable[[], int] = _now_ms,
        _rng: p.RandomBytes = p.random_bytes,
    ) -> None:
        self._id = validate_agent_id(agent_id)
        self._endpoint = AgentEndpoint(self)
        self.log = logging.getLogger(f"agentmesh.agent.{agent_id}")
        self.log.setLevel(log_level)
        self._clock = clock_ms
        self._rng = rng = _rng
        if max_handler_attempts < 1:
            raise ConfigurationError("max_handler_attempts must be at least 1")
        self._max_handler_attempts = max_handler_attempts
        self._exit_flush_timeout_s = exit_flush_timeout_s
        if not outbox_ttl_s > 0:
            raise ConfigurationError("outbox_ttl_s must be positive")
        self._outbox_ttl_ms = int(outbox_ttl_s * 1000)
        #: When each sender last got a session notice (see _send_session_notices).
        self._notices: dict[str, int] = {}
        self._exit_hook: Callable[[], None] | None = None
        self._handlers: list[Handler] = []
        # send(wait=False): envelopes committed but not yet synced and handed to the hub.
        self._queue: list[bytes] = []
        self._queue_busy = False
        self._queue_ready = threading.Condition()
        self._transmitter: threading.Thread | None = None
        self._lock = threading.RLock()  # serialises every call into self._core
        #: Who runs the handlers now (one thread at a time, no lock held meanwhile),
        #: and whether rows arrived while it did (see dispatch_pending).
        self._dispatch_cv = threading.Condition()
        self._dispatcher: threading.Thread | None = None
        self._dispatch_again = False
        #: request() calls waiting for a reply, by the request's message id, and the ids
        #: of committed replies being handed to them (never dispatched or pulled).
        #: Guarded by _arrival, which next_message also waits on for new messages.
        self._waiting: dict[bytes, _PendingRequest] = {}
        self._claimed: set[bytes] = set()
        #: Relaxed receipts (see _receive_and_handle): how many in a row, and the ids of
        #: those not handled yet. Changed under _lock; the dispatcher discards ids.
        self._relaxed_receipts = 0
        self._unhandled_relaxed: set[bytes] = set()
        self._arrival = threading.Condition()
        #: Called, with no lock held, after messages were committed and on close (the
        #: asyncio driver wakes its loop with it); and the callbacks of request waiters
        #: whose replies were handed over, waiting for the lock to be released.
        self._arrival_listeners: list[Callable[[], None]] = []
        self._callbacks_due: list[Callable[[], None]] = []
        self._closed = False
        self._lock_file: StateLock | None = None
        if keypair_path is not None:
            key_path = Path(keypair_path)
            if key_path.is_dir():  # refused before anything touches it (or its mode)
                raise ConfigurationError(
                    f"keypair_path {key_path} is a directory: pass the path of a key file "
                    f"in it, for example {key_path / (agent_id + '.json')}"
                )
            key_path.parent.mkdir(parents=True, exist_ok=True)
            state_file = state_path_for(key_path)
            self._lock_file = StateLock(state_file.with_suffix(".lock"))
            self._lock_file.acquire()
            try:
                self._keypair = load_or_create_key_file(key_path, passphrase)
                self._state = AgentState(state_file)
            except BaseException:
                self._lock_file.release()
                raise
        else:
            self._keypair = AgentKeyPair.generate(rng)
            self._state = AgentState(None)
        self.hub: Hub | None = None
        try:
            self._core = AgentCore(
                self._id,
                self._keypair,
                self._state,
                sign_messages=sign_messages,
                require_signatures=(
                    sign_messages if require_signatures is None else require_signatures
                ),
                limits=ratchet_limits,
                replay_window_ms=replay_window_ms,
                pool_size=prekey_pool_size,
                clock=clock_ms,
                rng=rng,
                verify_batch=_verify_all,
            )
            if hub is not None:
                self.hub = hub
                self._register(hub)
                # A script that sends with wait=False and just exits must still
                # deliver: at exit, give the hub a bounded chance to take the outbox.
                self._exit_hook = functools.partial(_close_at_exit, weakref.ref(self))
                atexit.register(self._exit_hook)
        except BaseException:
            # e.g. AuthFailedError: don't leave the state open and the identity locked
            self._closed = True
            self._state.close()
            if self._lock_file is not None:
                self._lock_file.release()
            raise

    def _register(self, hub: Hub) -> None:
        """Register with the hub; an agent with a key file also starts while the hub is
        unreachable (its sends wait in the outbox until the hub is back)."""
        try:
            hub.register(self._endpoint)
        except HubUnavailableError as exc:
            if self._state.path is None or not supports(hub, BackgroundRegisteringHub):
                raise
            self.log.warning(
                "hub unreachable at start (%s); running offline: sends wait in the outbox "
                "and the agent registers when the hub is back",
                exc,
            )
            hub.register_in_background(self._endpoint)

    # -- identity ---------------------------------------------------------

    @property
    def agent_id(self) -> str:
        return self._id

    @property
    def id(self) -> str:
        """The agent id (version 1's attribute; the same as :attr:`agent_id`)."""
        return self._id

    @property
    def endpoint(self) -> AgentEndpoint:
        """What a hub talks to for this agent (:class:`AgentEndpoint`): login signing,
        prekeys, the outbox, received envelopes. Only hub implementations (and tests
        that play the network) need it; the agent registers it itself."""
        return self._endpoint

    @property
    def keypair(self) -> AgentKeyPair:
        return self._keypair

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the identity key, 32 hex digits in 8 colon-joined groups."""
        return self._core.fingerprint

    @property
    def public_bundle(self) -> dict[str, Any]:
        """This agent's public keys as a JSON-safe dict (includes ``agent_id``)."""
        with self._lock:
            return self._core.public_bundle()

    def safety_number(self, peer_id: str) -> str:
        """The 60-digit safety number of this agent and a pinned peer (same on both sides)."""
        peer_id = validate_agent_id(peer_id)
        with self._lock:
            return self._core.safety_number(peer_id)

    def trust(self, peer_id: str, fingerprint: str) -> None:
        """Accept a peer's new identity key after verifying ``fingerprint`` out of band.

        The new key is the one the peer last presented (recorded when
        :class:`IdentityChangedError` was raised) or, if it matches neither that nor
        the pinned one, the one the hub now holds for the peer (after an operator
        released the id for a lost key, say, before the peer wrote). Replaces the pin
        and drops the old sessions; messages held back by IdentityChangedError are then
        delivered (the hub redelivers them), and outbox envelopes sealed for the old
        key move to :meth:`dead_letters`. Raises ValueError if ``fingerprint`` matches
        none of these keys (nothing changes), PeerNotFoundError if the peer is unknown.
        """
        peer_id = validate_agent_id(peer_id)
        wanted = fingerprint.strip().lower().encode()
        pinned = self._state.pinned_identity(peer_id)
        if pinned is None:
            raise ValueError(f"No identity known for peer {peer_id!r}")
        current, pending = pinned
        matched = AgentCore.matching_identity(wanted, pending, current)
        if matched is None and self.hub is not None:
            try:
                offered = self._fetch_bundle(peer_id).identity.encode()  # verified
            except (HubUnavailableError, PeerNotFoundError, CryptoError, DecodeError) as exc:
                self.log.info("could not read %s's identity on the hub: %s", peer_id, exc)
            else:
                if AgentCore.matching_identity(wanted, offered) is not None:
                    matched = pending = offered
        if matched is None:
            raise ValueError(
                f"Fingerprint {fingerprint!r} does not match any identity of {peer_id!r}"
            )
        if matched is current and matched is not pending:
            return  # already the pinned key
        with self._lock:
            # Sealed for the key just replaced: the trusted one can never read them,
            # so they must not wait in the outbox.
            self._dead_letter_sent(
                self._core.repin(peer_id, matched),
                f"identity_changed: sealed for {peer_id}'s previous identity key; send it again",
            )
        self.log.warning("trusted identity %s for peer %s", fingerprint, peer_id)
        if self.hub is not None:
            self.hub.register(self._endpoint)  # redeliver what was held back

    # -- handlers ---------------------------------------------------------

    def on_message(self, handler: Handler) -> Handler:
        """Register a handler; usable as ``@agent.on_message`` or ``agent.on_message(fn)``.

        Handlers run in registration order; one that raises is logged, rerun after a
        short backoff up to ``max_handler_attempts`` times, and the others still run
        (once each); if it keeps raising, the message goes to :meth:`dead_letters`.
        Messages that arrived before any handler existed are handed to the first one
        registered.
        """
        if not callable(handler):
            raise TypeError("on_message expects a callable")
        self._handlers.append(handler)
        if len(self._handlers) == 1:
            self._dispatch_pending()
        return handler

    # -- pulling ----------------------------------------------------------

    def next_message(self, timeout: float | None = None) -> Message:
        """The oldest message not handled yet, waiting up to ``timeout`` seconds (None:
        for ever) for one to arrive. It then counts as handled.

        For agents without handlers: while none is registered with :meth:`on_message`,
        messages wait in the durable inbox for this call (and survive restarts); with
        a handler registered they go to the handlers, and this raises
        LocalProtocolError. Raises the built-in ``TimeoutError`` if nothing arrives in
        time, and LocalProtocolError once the agent is closed. Replies to a waiting
        :meth:`request` never come out here.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._arrival:
            while True:
                if self._handlers:
                    raise LocalProtocolError(
                        "next_message() is for agents without handlers: messages go to the "
                        "on_message handlers"
                    )
                message = self._take_message()
                if message is not None:
                    return message
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message for {self._id!r} within {timeout} s")
                self._arrival.wait(remaining)

    def _take_message(self) -> Message | None:
        """The oldest unhandled message, now counted as handled; None if there is none.
        Raises LocalProtocolError once the agent is closed. Never waits."""
        with self._arrival:
            if self._closed:
                raise LocalProtocolError(f"Agent {self._id!r} is closed")
            rows = self._unclaimed(1)
            if not rows:
                return None
            self._state.mark_handled(rows[0].seq)
            return self._message(rows[0])

    def _peek_messages(self, limit: int) -> list[tuple[int, Message]]:
        """Up to ``limit`` unhandled messages, oldest first, with their inbox sequence
        numbers for :meth:`_mark_handled` (the asyncio driver's dispatch)."""
        with self._arrival:
            if self._closed:
                return []
            return [(row.seq, self._message(row)) for row in self._unclaimed(limit)]

    def _mark_handled(self, seq: int) -> None:
        self._state.mark_handled(seq)

    def messages(self) -> Iterator[Message]:
        """Iterate over messages as they arrive (:meth:`next_message` with no timeout);
        the iteration ends when the agent is closed."""
        while True:
            try:
                yield self.next_message()
            except LocalProtocolError:
                if self._closed:
                    return
                raise

    # -- sending ----------------------------------------------------------

    def send(self, recipient_id: str, text: str = "", *, wait: bool = True, **kwargs: Any) -> str:
        """Encrypt and send ``{"type": "message", "text": text, **kwargs}``; return its id.

        ``type=`` overrides the type; every other extra keyword reaches
        ``msg.payload`` (``wait`` is not a payload field: see :meth:`send_payload`).
        """
        payload = text_payload(text, kwargs)
        return self.send_payload(recipient_id, payload, wait=wait)

    def reply(self, message: Message, text: str = "", **kwargs: Any) -> str:
        """Answer ``message``: send ``{"type": "message", "text": text, **kwargs}`` to its
        sender with ``in_reply_to`` set to its id (inside the ciphertext). The sender's
        waiting :meth:`request` gets it; if that timed out, the sender's handlers (or
        ``next_message``) do. Returns the reply's message id."""
        payload = text_payload(text, kwargs)
        try:
            answered = bytes.fromhex(message.message_id)
        except ValueError as exc:
            raise ValueError(f"cannot reply to a message without an id: {message!r}") from exc
        return self._send(message.sender, payload, wait=True, in_reply_to=answered).hex()

    def request(
        self, peer_id: str, text: str = "", *, timeout: float = 30.0, **kwargs: Any
    ) -> Message:
        """Send ``{"type": "message", "text": text, **kwargs}`` and wait for the reply.

        Returns the peer's reply (a :class:`Message` whose ``in_reply_to`` is the
        request's id; it goes to this call, not to the handlers). Raises
        :class:`~agentmesh.errors.RequestTimeoutError` (a ``TimeoutError``) if none
        arrives within ``timeout`` seconds; a reply that comes later is delivered
        like any other message. Any number of requests may wait at once, from any
        threads; each gets its own reply. Send errors propagate as from :meth:`send`.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        message_id = self._rng(16)
        waiter = self._await_reply(message_id)
        reply = None
        try:
            payload = text_payload(text, kwargs)
            self._send(peer_id, payload, wait=True, message_id=message_id)
            with self._arrival:
                self._arrival.wait_for(lambda: waiter.done, timeout)
        finally:
            reply = self._stop_waiting(message_id, waiter)
        if reply is None:
            raise RequestTimeoutError(peer_id, message_id.hex(), timeout)
        return reply

    def _await_reply(
        self, message_id: bytes, callback: Callable[[], None] | None = None
    ) -> _PendingRequest:
        """Register a request's waiter before it is sent (with LocalHub the reply comes
        during the send). ``callback`` runs, from the receiving thread and with no lock
        held, once the reply is handed over (the asyncio driver's hook)."""
        waiter = _PendingRequest(callback)
        with self._arrival:
            self._waiting[message_id] = waiter
        return waiter

    def _stop_waiting(self, message_id: bytes, waiter: _PendingRequest) -> Message | None:
        """Stop waiting for the reply to ``message_id``; return it if it came. A reply
        being committed at this moment is waited for (briefly), so none is lost; one
        that comes later goes to the handlers or next_message."""
        with self._arrival:
            self._waiting.pop(message_id, None)
            if waiter.claimed:
                self._arrival.wait_for(lambda: waiter.done or not waiter.claimed)
            return waiter.reply

    def send_payload(self, recipient_id: str, payload: dict[str, Any], *, wait: bool = True) -> str:
        """Encrypt ``payload`` (a JSON-safe dict) for ``recipient_id`` and hand it to the hub.

        With ``wait=True`` (the default) it returns once the hub has durably
        accepted the envelope (with LocalHub: once the recipient's handlers have
        run), or, if the hub is unreachable, once the envelope is safely in this
        agent's outbox; it is then resent on reconnect. Raises
        RuntimeError("No hub configured") without a hub, ValueError("Peer 'x' not
        found on hub") for an unknown recipient, IdentityChangedError if the
        recipient's identity key changed, and MailboxFullError if the
        recipient's mailbox is full (the envelope stays in the outbox and is
        retried on reconnect). This agent's own commit (session state and outbox
        row) survives a crash of the process at once; it waits for the disk only
        once every ``RESERVE_AHEAD`` (64) sends to a peer, when it reserves the
        next sending counters (docs/PERFORMANCE.md, "Reserved counters"), and when
        the hub is unreachable.

        With ``wait=False`` (pipelining, for hubs that support it such as
        :class:`~agentmesh.NetworkHub`; with others it is the same as
        ``wait=True``) it returns as soon as the envelope and the new session
        state are committed to the state file, without waiting for the disk or
        the hub (group commit):

        * from then on a crash of this process (even ``kill -9``) cannot lose the
          envelope: it is in the outbox and sent after the restart;
        * a background thread makes the commits durable against power loss with
          one fsync for every envelope queued meanwhile, and only then hands them
          to the hub connection, in call order: nothing leaves this machine that
          a power failure could make this agent forget (a power failure between
          the return and that fsync can lose the message, never the ratchet's
          consistency);
        * the hub's acknowledgement removes it from the outbox; until then it is
          resent after a reconnect or a restart (the hub drops duplicates);
        * a refusal by the hub (unknown recipient, full mailbox) is logged, not
          raised, and the envelope stays in the outbox (retried on reconnect);
        * at most ``NetworkHub(send_window=...)`` envelopes await an
          acknowledgement; beyond that the background thread waits.

        Envelopes sent with either ``wait`` reach the hub, and so each recipient,
        in call order. :meth:`flush` waits until the hub has acknowledged everything.
        Returns the message id (hex).
        """
        return self._send(recipient_id, payload, wait=wait).hex()

    def _send(
        self,
        recipient_id: str,
        payload: dict[str, Any],
        *,
        wait: bool,
        in_reply_to: bytes | None = None,
        message_id: bytes | None = None,
        control: bool = False,
    ) -> bytes:
        """:meth:`send_payload`, optionally as a reply, a control message (for the peer
        agent, not its handlers) or with a chosen id; returns the id. A control message
        always starts a new session (from a fresh bundle), which any holder of the
        peer's current identity can open; the old sessions stay archived."""
        if self.hub is None:
            raise NoHubError()
        recipient_id = validate_agent_id(recipient_id)
        if recipient_id == self._id:
            raise ValueError("An agent cannot send to itself")
        plaintext = encode_payload(payload)
        self._maintain_prekeys_if_due()
        self._publish_prekeys()
        hub = self.hub
        limit = hub.envelope_limit(self._id) if supports(hub, EnvelopeLimitedHub) else None
        pipelined = not wait and supports(hub, PipelinedHub)
        if message_id is None:
            message_id = self._rng(16)
        with self._locked_with_bundle(recipient_id, fresh=control) as bundle:
            data = self._core.seal(
                recipient_id,
                plaintext,
                bundle,
                message_id=message_id,
                in_reply_to=in_reply_to,
                control=control,
                limit=limit,
                durable=False,  # safe against power loss by reserved counters (seal)
            )
            if pipelined:
                with self._queue_ready:  # under the lock: queued in commit order
                    self._queue.append(data)
                    self._queue_ready.notify_all()
                    self._start_transmitter()
                return message_id
        self._wait_queue_sent(None)  # keep call order behind earlier pipelined sends
        self._transmit(message_id, data)
        return message_id

    def _start_transmitter(self) -> None:
        if self._transmitter is None:
            self._transmitter = threading.Thread(
                target=self._transmit_forever, name=f"agentmesh-send-{self._id}", daemon=True
            )
            self._transmitter.start()

    def _transmit_forever(self) -> None:
        """Background thread of ``send(wait=False)``: one fsync per group, then transmit."""
        busy = False
        while True:
            with self._queue_ready:
                while not self._queue and not self._closed:
                    self._queue_ready.wait()
                if busy and len(self._queue) < _GROUP_MAX and not self._closed:
                    # Sends are streaming: let the group grow a little (an fsync costs
                    # ~0.1 ms of CPU and more of waiting), at most _GROUP_WAIT_S.
                    self._queue_ready.wait_for(
                        lambda: len(self._queue) >= _GROUP_MAX or self._closed, _GROUP_WAIT_S
                    )
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
                busy = len(batch) > 1
                self._queue_busy = True
            try:
                self._transmit_batch(batch)
            finally:
                with self._queue_ready:
                    self._queue_busy = False
                    self._queue_ready.notify_all()

    def _transmit_batch(self, batch: list[bytes]) -> None:
        hub = self.hub
        try:
            self._state.sync()  # durable before anything leaves (one fsync for all)
        except Exception:
            self.log.exception("could not sync the state file; %d envelopes wait", len(batch))
            return  # still in the outbox: sent after the next successful sync or login
        if not supports(hub, PipelinedHub):
            return
        submit = hub.submit
        for data in batch:
            try:
                submit(data)
            except HubUnavailableError as exc:
                self.log.warning("hub unreachable; envelopes kept in the outbox: %s", exc)
                return  # the rest is in the outbox too: the next login re-sends it
            except Exception:
                self.log.exception("handing envelopes to the hub failed; kept in the outbox")
                return

    def _wait_queue_sent(self, timeout: float | None) -> bool:
        """Wait until pipelined envelopes queued so far were handed to the hub."""
        with self._queue_ready:
            return self._queue_ready.wait_for(
                lambda: not self._queue and not self._queue_busy, timeout
            )

    def _transmit(self, message_id: bytes, data: bytes) -> None:
        hub = self.hub
        assert hub is not None
        try:
            if supports(hub, RoutingHub):
                hub.route(data)  # the recipient's verdict stays the recipient's
            else:
                hub.deliver(data)
        except HubUnavailableError as exc:
            self.log.warning("hub unreachable; message kept in the outbox for resend: %s", exc)
            self._state.sync()  # send() says "safely in the outbox": through a power cut too
            return
        except (HubError, PeerNotFoundError) as exc:
            self._envelope_refused(message_id, exc)
            raise
        self._state.defer_outbox_removal([message_id])

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the hub has acknowledged every envelope in the outbox.

        Returns True once the outbox is empty, False if ``timeout`` seconds
        passed first (e.g. the hub is unreachable: the outbox is resent on
        reconnect). Useful after ``send(..., wait=False)``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        wait_acked = self.hub.wait_acked if supports(self.hub, PipelinedHub) else None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._wait_queue_sent(remaining)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait_acked is not None:
                wait_acked(self._id, remaining)
            if self._state.outbox_size() == 0:
                return True
            if remaining is not None and remaining <= 0:
                return False
            time.sleep(0.01 if remaining is None else min(0.01, remaining))

    def _can_send_to(self, peer_id: str) -> bool:
        with self._lock:
            return self._core.can_send_to(peer_id)

    def _fetch_bundle(self, peer_id: str) -> PrekeyBundle:
        """Fetch the peer's bundle from the hub. Called without holding the state lock,
        because the hub may call back into other agents (e.g. "prekeys low")."""
        if self.hub is None:
            raise NoHubError()
        bundle = PrekeyBundle.decode(self.hub.fetch_prekey_bundle(peer_id))
        if bundle.agent_id != peer_id:
            raise CryptoError(f"hub returned a bundle for {bundle.agent_id!r}, not {peer_id!r}")
        # Verify before anything is recorded from it (finding F-6): an identity that
        # fails its own signatures must never become a pending identity to trust().
        return bundle.verify()

    @contextlib.contextmanager
    def _locked_with_bundle(
        self, peer_id: str, *, fresh: bool = False
    ) -> Iterator[PrekeyBundle | None]:
        """Hold the lock with either a session that can send to ``peer_id`` or a fresh
        bundle of the peer's (then yielded; always, if ``fresh``). The bundle is fetched
        with no lock held, since the hub may call back into agents; if the session
        vanished meanwhile (``trust()`` dropped it), a bundle is fetched after all."""
        bundle = None if self._can_send_to(peer_id) and not fresh else self._fetch_bundle(peer_id)
        while True:
            with self._lock:
                if bundle is not None or self._can_send_to(peer_id):
                    yield bundle
                    return
            bundle = self._fetch_bundle(peer_id)

    def connect(self, peer_id: str) -> None:
        """Set up a session with ``peer_id`` ahead of time (optional: send connects itself)."""
        if self.hub is None:
            raise NoHubError()
        peer_id = validate_agent_id(peer_id)
        with self._locked_with_bundle(peer_id) as bundle:
            self._core.connect(peer_id, bundle)

    def connect_with_bundle(self, bundle: dict[str, Any]) -> None:
        """Set up a session from a peer's ``public_bundle`` handed over directly (peer to peer)."""
        parsed = PrekeyBundle.from_dict(bundle).verify()  # before anything is recorded (F-6)
        # The "bundle" blob is authoritative; refuse a dict whose readable fields
        # (what a user verifies: id, keys, fingerprint) describe someone else.
        shown = parsed.to_dict()
        for key in (
            "agent_id",
            "identity_public",
            "exchange_public",
            "identity_binding",
            "fingerprint",
        ):
            if key in bundle and bundle[key] != shown[key]:
                raise CryptoError(f"bundle field {key!r} does not match the signed bundle")
        validate_agent_id(parsed.agent_id)
        with self._lock:
            self._core.connect_with_bundle(parsed)

    def list_peers(self) -> list[str]:
        """The other agents registered on the hub (never this one)."""
        if self.hub is None:
            raise NoHubError()
        return [a for a in self.hub.list_agents() if a != self._id]

    def wait_for_peer(self, peer_id: str, timeout: float | None = None) -> None:
        """Return once ``peer_id`` is registered on the hub, so agents may start in any
        order. Raises the built-in ``TimeoutError`` if it is not within ``timeout``
        seconds (None: wait for ever). While the hub cannot be reached it keeps
        asking (with a backoff up to 1 s) until the timeout."""
        if self.hub is None:
            raise NoHubError()
        peer_id = validate_agent_id(peer_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                if peer_id in self.hub.list_agents():
                    return
            except HubUnavailableError:
                pass
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"peer {peer_id!r} did not register within {timeout} s")
            with self._arrival:  # close() wakes this wait
                if self._arrival.wait_for(
                    lambda: self._closed, delay if remaining is None else min(delay, remaining)
                ):
                    raise LocalProtocolError(f"Agent {self._id!r} is closed")
            delay = min(1.0, delay * 2)

    def status(self) -> dict[str, Any]:
        """A snapshot: id, fingerprint, sessions, pinned peers, handlers, queues."""
        with self._lock:
            return {
                "agent_id": self._id,
                "fingerprint": self.fingerprint,
                "active_sessions": self._state.session_peers(),
                "known_peers": self._state.known_peers(),
                "handlers": len(self._handlers),
                "hub": type(self.hub).__name__ if self.hub is not None else None,
                "persistent": self._state.path is not None,
                "outbox": self._state.outbox_size(),
                "inbox_pending": self._state.inbox_pending(),
                "one_time_prekeys": len(self._core.prekeys.one_time),
                "sign_messages": self._core.sign_messages,
                "dead_letters": self._state.dead_letter_count(),
            }

    # -- receiving (HubEndpoint) -----------------------------------------

    def _receive_envelope(self, data: bytes) -> DeliveryReport:
        """Decrypt one envelope and commit it to the inbox (receive steps 1 and 2).

        Returns ``DeliveryReport(accepted=True, duplicate=...)``; a duplicate (a
        message id already committed) is reported, not decrypted again. Raises
        DecodeError, CryptoError subclasses or IdentityChangedError; then no
        state has changed. Handlers run in :meth:`AgentEndpoint.dispatch_pending`.
        """
        [outcome] = self._receive_envelopes([data])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _receive_and_handle(self, data: bytes) -> DeliveryReport:
        """:meth:`AgentEndpoint.receive_and_handle`: commit one envelope without waiting
        for the disk, run the handlers, and return once it is handled or durable.

        For a hub that delivers synchronously in this process (LocalHub), whose
        sender's ``send()`` returns after this: a message handled before that needs
        no fsync of its own, since a power cut can then lose only the record of
        something that already happened (its handlers may run again if its sender
        resends it: at least once, as ever after power loss). If the handlers could
        not run it now (none registered, another thread or an outer handler
        dispatches, they kept failing into the dead letters' durable commit, or the
        agent closed), the state file is synced before this returns. Batches that
        start a session, pin a peer or consume a prekey are durable anyway (see
        :meth:`AgentCore.commit_batch`), as is every ``_RELAXED_RECEIPTS_MAX``-th.
        """
        [outcome] = self._receive_envelopes([data], relaxed=True)
        if isinstance(outcome, Exception):
            raise outcome
        try:
            self._dispatch_pending()
        finally:
            self._settle_relaxed()
        return outcome

    def _settle_relaxed(self) -> None:
        """Sync the state file if a relaxed receipt is still unhandled."""
        with self._lock:
            if not self._unhandled_relaxed or self._closed:
                return  # close() syncs
            # The sync covers every commit made so far, so every id recorded so far.
            self._unhandled_relaxed = set()
        self._state.sync()

    def _receive_envelopes(
        self, items: list[bytes], *, relaxed: bool = False
    ) -> list[DeliveryReport | Exception]:
        """:meth:`AgentEndpoint.receive_envelope` for several envelopes, committed in ONE
        transaction.

        Each envelope is decrypted in order (on copies, each building on the
        state the previous ones left); then the new session records, replay
        records and inbox rows of all that decrypted are committed together,
        before this returns, so the hub may be acknowledged for each of them.
        Returns one outcome per envelope, in order: a DeliveryReport, or the
        exception :meth:`AgentEndpoint.receive_envelope` would have raised for it (that
        envelope changed nothing). If the commit itself fails, every envelope
        that was to be committed gets that exception. Batches of at least
        ``_PARALLEL_VERIFY_MIN`` verify their signatures on two threads before
        the commit (see :meth:`AgentCore.open_batch`); the outcomes are the same.
        ``relaxed``: see :meth:`_receive_and_handle`.
        """
        try:
            return self._receive_locked(items, relaxed)
        finally:
            self._publish_prekeys()  # a consumed one-time key may need replacing
            self._notify_arrival()

    def _unreadable_envelope(self, sender: str, error: Exception) -> None:
        """The hub delivered an envelope from ``sender`` that this agent refused with
        ``error``. If no session here could open it, tell the sender (a session notice).

        That happens when the sender holds a session (or a bundle) of an identity this
        id no longer has: our key was lost and the id re-registered, or we lost our
        state. The notice is a control message in a fresh session (a PQXDH initial
        message), so the sender learns our current identity: a sender that pinned the
        old one gets IdentityChangedError naming both fingerprints (and can trust() the
        new one); a sender whose pin matches simply continues in the new session. Only
        hubs call this, for envelopes whose sender they authenticated (a network hub
        refuses envelopes not from the logged-in agent); envelopes handed straight to
        :meth:`AgentEndpoint.receive_envelopes` never cause one. At most one notice per sender per
        minute. Called with no lock held.
        """
        if self.hub is None or not isinstance(error, NoSessionError | InvalidKeyError):
            return
        now = self._clock()
        if sender == self._id:
            return
        if now - self._notices.get(sender, -_NOTICE_INTERVAL_MS) < _NOTICE_INTERVAL_MS:
            return
        if len(self._notices) >= _NOTICE_PEERS_MAX:
            self._notices.clear()  # a bound, not a cache: forgetting allows one more
        self._notices[sender] = now
        try:
            self._send(sender, _SESSION_NOTICE, wait=False, control=True)
            self.log.info("told %s that its messages cannot be opened here", sender)
        except Exception as exc:  # the sender may be gone, or its identity changed
            self.log.info("could not send a session notice to %s: %s", sender, exc)

    def _notify_arrival(self) -> None:
        """Run due reply callbacks and tell the arrival listeners (call with no lock
        held; a spurious call is harmless)."""
        with self._arrival:
            due, self._callbacks_due = self._callbacks_due, []
        for listener in [*due, *self._arrival_listeners]:
            try:
                listener()
            except Exception:
                self.log.exception("arrival listener %r raised", listener)

    def _receive_locked(
        self, items: list[bytes], relaxed: bool
    ) -> list[DeliveryReport | Exception]:
        with self._lock:
            batch = self._core.open_batch(items, parallel=len(items) >= _PARALLEL_VERIFY_MIN)
            if not batch.messages:
                return batch.outcomes
            replies = self._claim_replies(batch.messages)
            durable = not relaxed or self._relaxed_receipts >= _RELAXED_RECEIPTS_MAX - 1
            try:
                durable = self._core.commit_batch(batch, durable=durable)
            except Exception as exc:
                self._hand_over_replies(replies, committed=False)
                return batch.failed(exc)
            if durable:
                self._relaxed_receipts = 0
            else:
                self._relaxed_receipts += 1
                self._unhandled_relaxed.update(
                    row.message_id for row in batch.messages if not row.control
                )
            self._hand_over_replies(replies, committed=True)
            with self._arrival:  # wake next_message()
                self._arrival.notify_all()
            self._core.after_commit(batch)
        return batch.outcomes

    def _claim_replies(self, rows: list[InboxRow]) -> list[tuple[InboxRow, _PendingRequest]]:
        """Before a commit: the rows that answer a waiting request(), claimed so that no
        dispatcher or puller takes them once they are committed."""
        claims: list[tuple[InboxRow, _PendingRequest]] = []
        with self._arrival:
            if not self._waiting:
                return claims
            for row in rows:
                waiter = self._waiting.get(row.in_reply_to) if row.in_reply_to else None
                if waiter is not None and not waiter.claimed:
                    waiter.claimed = True
                    self._claimed.add(row.message_id)
                    claims.append((row, waiter))
        return claims

    def _hand_over_replies(
        self, claims: list[tuple[InboxRow, _PendingRequest]], *, committed: bool
    ) -> None:
        """After the commit: give each claimed reply to its request() (it counts as
        handled), or, if the commit failed, release the claims (the hub redelivers)."""
        handed: list[tuple[_PendingRequest, Message | None]] = []
        for row, waiter in claims:
            message = None
            if committed:
                seq = self._state.inbox_seq(row.message_id)
                if seq is not None:
                    self._state.mark_handled(seq)
                self._unhandled_relaxed.discard(row.message_id)
                message = self._message(row)
            handed.append((waiter, message))
        with self._arrival:
            for (row, _), (waiter, message) in zip(claims, handed, strict=True):
                self._claimed.discard(row.message_id)
                waiter.claimed = False
                if committed:
                    waiter.reply, waiter.done = message, True
            if committed:  # run by _notify_arrival, once no lock is held
                self._callbacks_due.extend(w.callback for w, _ in handed if w.callback)
            self._arrival.notify_all()

    def _dispatch_pending(self) -> int:
        """Run the handlers for committed, unhandled messages (receive steps 4 and 5).

        Returns how many messages this call handled. Does nothing while no handler
        is registered. Safe to call from any thread; messages are handled one at a
        time, in arrival order, by one thread at a time (the *dispatcher*), which
        holds no lock while a handler runs. A call while another thread dispatches
        leaves the new messages to it and waits until it is done, so that (with
        LocalHub) a send returns after the recipient's handlers ran; a call made
        from inside a handler (any agent's) never waits, so handlers that send to
        each other cannot deadlock.
        """
        me = threading.current_thread()
        with self._dispatch_cv:
            if self._dispatcher is not None:
                self._dispatch_again = True
                if self._dispatcher is not me and not _in_handler():
                    self._dispatch_cv.wait_for(lambda: self._dispatcher is None)
                return 0
            self._dispatcher = me
            self._dispatch_again = False
        handled = 0
        try:
            while True:
                handled += self._dispatch_all()
                with self._dispatch_cv:
                    if not self._dispatch_again or self._closed:
                        break
                    self._dispatch_again = False
        finally:
            with self._dispatch_cv:
                self._dispatcher = None
                self._dispatch_cv.notify_all()
        return handled

    def _wait_dispatch_idle(self) -> None:
        """Wait until no other thread runs this agent's handlers (holding no lock)."""
        me = threading.current_thread()
        with self._dispatch_cv:
            self._dispatch_cv.wait_for(lambda: self._dispatcher in (None, me))

    def _message(self, row: InboxRow) -> Message:
        pinned = self._state.pinned_identity(row.sender)
        return Message(
            sender=row.sender,
            recipient=self._id,
            payload=decode_payload(row.payload),
            timestamp=row.timestamp_ms,
            message_id=row.message_id.hex(),
            signature=row.signature,
            raw_envelope=row.envelope,
            in_reply_to=None if row.in_reply_to is None else row.in_reply_to.hex(),
            _sender_identity=None if pinned is None else pinned[0],
            _payload_bytes=row.payload,
            _agent=self,
        )

    def _unclaimed(self, limit: int) -> list[InboxRow]:
        """Unhandled rows, oldest first, without replies being handed to request()."""
        rows = self._state.unhandled(limit=limit)
        with self._arrival:
            claimed = set(self._claimed)
        return [row for row in rows if row.message_id not in claimed]

    def _dispatch_all(self) -> int:
        handled = 0
        while self._handlers and not self._closed:
            rows = self._unclaimed(256)
            if not rows:
                break
            for row in rows:
                message = self._message(row)
                failure: tuple[Handler, Exception] | None = None
                for handler in list(self._handlers):
                    outcome = self._run_handler(handler, message)
                    if outcome is _INTERRUPTED:
                        return handled  # closing: left in the inbox, dispatched after restart
                    if isinstance(outcome, Exception):
                        failure = (handler, outcome)
                if failure is None:
                    self._state.mark_handled(row.seq)
                else:
                    self._dead_letter(row.seq, message, failure_reason(*failure))
                self._unhandled_relaxed.discard(row.message_id)
                handled += 1
        return handled

    def _run_handler(self, handler: Handler, message: Message) -> Exception | object | None:
        """Run one handler, rerunning it after a short backoff while it raises, up to
        ``max_handler_attempts`` times (handlers that succeeded are not rerun). Returns
        None, the last error, or ``_INTERRUPTED`` if the agent closed meanwhile."""
        for attempt in range(1, self._max_handler_attempts + 1):
            _handler_depth.value = _in_handler() + 1
            try:
                handler(message)
                return None
            except Exception as exc:
                if not handler_failed(
                    self.log, handler, message, exc, attempt, self._max_handler_attempts
                ):
                    return exc
            finally:
                _handler_depth.value -= 1
            with self._arrival:  # close() wakes this wait
                if self._arrival.wait_for(lambda: self._closed, handler_retry_delay(attempt)):
                    return _INTERRUPTED
        return None  # not reached: the loop returns

    def _dead_letter(self, seq: int, message: Message, reason: str) -> None:
        """Move a received message whose handler kept failing to the dead letters."""
        row = InboxRow(
            seq,
            bytes.fromhex(message.message_id),
            message.sender,
            message._payload_bytes,
            message.timestamp,
            message.signature,
            message.raw_envelope,
            None if message.in_reply_to is None else bytes.fromhex(message.in_reply_to),
        )
        self._state.dead_letter_received(row, reason)
        self.log.warning(
            "message %s from %s moved to the dead letters", message.message_id, message.sender
        )

    # -- dead letters -------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        """The dead-letter list, oldest first. It persists in the state file; nothing in
        it is lost or retried until you call :meth:`retry_dead_letter` or
        :meth:`discard_dead_letter`.

        * ``direction="in"``: received messages whose handler kept raising after
          ``max_handler_attempts`` attempts, with the error as ``reason``.
        * ``direction="out"``: sent messages that left the outbox because no resend
          could deliver them (``payload`` is None: only the ciphertext was kept):
          the hub refused them for good (too large, malformed), their recipient
          stayed unknown to the hub for ``outbox_ttl_s``, the hub did not take them
          within ``outbox_ttl_s`` (expired), or they were sealed for a peer's
          identity key that :meth:`trust` replaced. Later messages are never
          held behind them."""
        return [
            DeadLetter(
                direction,
                message_id.hex(),
                peer,
                reason,
                None if payload is None else decode_payload(payload),
                timestamp,
            )
            for direction, message_id, peer, reason, payload, timestamp in (
                self._state.dead_letters()
            )
        ]

    def retry_dead_letter(self, message_id: str) -> None:
        """Hand a received dead letter to the handlers again (or to ``next_message``),
        after the messages already waiting. Put a sent one back into the outbox and hand
        it to the hub at once, as it was (e.g. after the hub's limit was raised); if the
        hub is unreachable it waits in the outbox, and if the hub refuses it again the
        error is raised (and a refusal no resend can cure makes it a dead letter again).
        Raises LocalProtocolError if there is no dead letter with that id."""
        mid = _message_id_bytes(message_id)
        retried = self._state.retry_dead_letter(mid, self._clock())
        if retried is None:
            raise LocalProtocolError(f"no dead letter with id {message_id!r}")
        direction, envelope = retried
        if direction == "out":
            if self.hub is not None:
                self._transmit(mid, envelope)
            return
        with self._arrival:
            self._arrival.notify_all()
        self._notify_arrival()
        self._dispatch_pending()

    def discard_dead_letter(self, message_id: str) -> None:
        """Delete a dead letter for good. Raises LocalProtocolError if there is none."""
        if not self._state.discard_dead_letter(_message_id_bytes(message_id)):
            raise LocalProtocolError(f"no dead letter with id {message_id!r}")

    # -- outbox -------------------------------------------------------------

    def outbox(self) -> list[OutboxEntry]:
        """The envelopes the hub has not acknowledged yet, oldest first. They are sent
        again at every login; :meth:`flush` waits for them to go."""
        return [OutboxEntry(m.hex(), r, c, n) for m, r, c, n in self._state.outbox_entries()]

    def discard_outbox(self, message_id: str) -> None:
        """Drop an envelope from the outbox: it is not sent again (if the hub already
        took it, it is delivered all the same). Raises LocalProtocolError if there is
        no envelope with that id in the outbox."""
        if not self._state.remove_from_outbox(_message_id_bytes(message_id)):
            raise LocalProtocolError(f"no envelope with id {message_id!r} in the outbox")

    # -- hub endpoint plumbing --------------------------------------------

    def _prekey_bundle_bytes(self) -> bytes:
        with self._lock:
            return self._core.prekey_bundle_bytes()

    def _one_time_prekeys(self) -> list[bytes]:
        with self._lock:
            return self._core.one_time_prekeys()

    def _one_time_prekeys_uploaded(self, encoded: list[bytes]) -> None:
        with self._lock:
            self._core.one_time_prekeys_uploaded(encoded)

    def _prekeys_low(self, remaining: int) -> None:
        self.log.info("hub reports %d one-time prekeys left; topping up", remaining)
        with self._lock:
            self._core.prekeys_low(remaining)
        self._publish_prekeys()

    def _unacked_envelopes(self) -> list[bytes]:
        self._dead_letter_sent(
            self._state.outbox_older_than(self._clock() - self._outbox_ttl_ms),
            "expired: the hub did not take it within outbox_ttl_s",
        )
        self._state.sync()  # a (re)login re-sends these: they must be on disk first
        return [env for _, env in self._state.outbox()]

    def _envelope_refused(self, message_id: bytes, error: Exception) -> None:
        """The hub refused an outbox envelope. One that no resend can cure (too large,
        malformed, or addressed to an id that stayed unknown for ``outbox_ttl_s``)
        moves to the dead letters, so it neither blocks nor arrives after later
        messages; other refusals (a full mailbox) keep it for the next resend."""
        code = getattr(error, "code", "")
        if isinstance(error, PeerNotFoundError):
            code = "unknown_recipient"
            expired = self._state.outbox_older_than(self._clock() - self._outbox_ttl_ms)
            if message_id not in expired:
                self.log.warning(
                    "recipient of %s is unknown to the hub; kept in the outbox until it "
                    "registers or outbox_ttl_s passes",
                    message_id.hex(),
                )
                return
        elif code not in _UNCURABLE_REFUSALS:
            return
        self._dead_letter_sent([message_id], f"refused by the hub: {error}")

    def _dead_letter_sent(self, message_ids: list[bytes], reason: str) -> None:
        moved = self._state.dead_letter_sent(message_ids, reason) if message_ids else []
        for message_id in moved:
            self.log.warning("sent message %s is now a dead letter: %s", message_id.hex(), reason)

    def _envelope_acked(self, message_id: bytes) -> None:
        self._state.defer_outbox_removal([message_id])

    def _envelopes_acked(self, message_ids: list[bytes]) -> None:
        """The hub stored these envelopes: drop them from the outbox (with the next write)."""
        self._state.defer_outbox_removal(message_ids)

    def _maintain_prekeys_if_due(self) -> None:
        with self._lock:
            self._core.maintain_prekeys_if_due()

    def _publish_prekeys(self) -> None:
        """Tell the hub about changed prekeys, if any. Call with no lock held: the hub
        calls back into this agent (``prekey_bundle_bytes``, ``one_time_prekeys``)."""
        with self._lock:
            if not self._core.take_publish_due():
                return
        hub = self.hub
        if not supports(hub, PrekeyRefreshingHub):
            return
        try:
            hub.refresh_prekeys(self._endpoint)
        except (HubError, HubUnavailableError) as exc:
            self.log.warning("could not upload prekeys yet: %s", exc)
            with self._lock:
                self._core.publish_failed()  # retried with the next send, receipt or report

    # -- lifecycle --------------------------------------------------------

    def close(self) -> None:
        """Leave the hub, close the state file and release the identity lock. Idempotent.

        A handler running in another thread is waited for (it may still send); no
        further message is dispatched. Holds no lock while it waits.
        """
        if self._closed:
            return
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
            self._exit_hook = None
        self._wait_queue_sent(5.0)  # hand pipelined envelopes over while still connected
        self._closed = True
        with self._queue_ready:
            self._queue_ready.notify_all()
        if self.hub is not None:
            try:
                self.hub.unregister(self._id)
            except Exception:  # closing must not fail because the hub is gone
                self.log.debug("hub unregister failed", exc_info=True)
        if self._transmitter is not None and self._transmitter is not threading.current_thread():
            self._transmitter.join(10.0)
        with self._arrival:  # wake next_message(), messages() and a handler's retry wait
            self._arrival.notify_all()
        self._wait_dispatch_idle()
        self._notify_arrival()
        with self._lock:
            self._state.close()
            if self._lock_file is not None:
                self._lock_file.release()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Agent({self._id!r}, fingerprint={self.fingerprint!r})"


class AgentEndpoint:
    """The hub-facing side of one :class:`Agent`: the
    :class:`~agentmesh.protocol.hub_interface.HubEndpoint` methods and the optional
    endpoint capabilities a hub calls, kept off the Agent's public surface.

    Every method delegates to the agent; a hub calls them with none of its own locks
    held (the agent may call the hub back). ``receive_envelope(s)`` decrypt and
    durably commit before they return, so a hub may then forget the envelopes.
    """

    __slots__ = ("_agent",)

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def __repr__(self) -> str:
        return f"AgentEndpoint({self._agent.agent_id!r})"

    @property
    def agent_id(self) -> str:
        return self._agent.agent_id

    @property
    def signing_public_key(self) -> bytes:
        return self._agent._core.signing_public_key

    @property
    def ephemeral_identity(self) -> bool:
        """No key file: hubs bind the id ephemerally (docs/PROTOCOL.md)."""
        return self._agent._core.ephemeral

    def sign_login(self, challenge: bytes) -> bytes:
        return self._agent._core.sign_login(challenge)

    def prekey_bundle_bytes(self) -> bytes:
        return self._agent._prekey_bundle_bytes()

    def one_time_prekeys(self) -> list[bytes]:
        return self._agent._one_time_prekeys()

    def one_time_prekeys_uploaded(self, encoded: list[bytes]) -> None:
        self._agent._one_time_prekeys_uploaded(encoded)

    def prekeys_low(self, remaining: int) -> None:
        self._agent._prekeys_low(remaining)

    def receive_envelope(self, data: bytes) -> DeliveryReport:
        """Decrypt and commit one envelope (see :meth:`receive_envelopes`)."""
        return self._agent._receive_envelope(data)

    def receive_envelopes(self, items: list[bytes]) -> list[DeliveryReport | Exception]:
        """Decrypt several envelopes and commit them in one transaction; one outcome
        each, in order: a report, or the error that envelope raised (it changed
        nothing)."""
        return self._agent._receive_envelopes(items)

    def dispatch_pending(self) -> int:
        """Run the handlers for committed, unhandled messages; returns how many."""
        return self._agent._dispatch_pending()

    def receive_and_handle(self, data: bytes) -> DeliveryReport:
        """Decrypt and commit one envelope and run the handlers; returns once the
        message is handled or durable (see ``Agent._receive_and_handle``)."""
        return self._agent._receive_and_handle(data)

    def unacked_envelopes(self) -> list[bytes]:
        return self._agent._unacked_envelopes()

    def envelope_acked(self, message_id: bytes) -> None:
        self._agent._envelope_acked(message_id)

    def envelopes_acked(self, message_ids: list[bytes]) -> None:
        self._agent._envelopes_acked(message_ids)

    def envelope_refused(self, message_id: bytes, error: Exception) -> None:
        self._agent._envelope_refused(message_id, error)

    def unreadable_envelope(self, sender: str, error: Exception) -> None:
        self._agent._unreadable_envelope(sender, error)
