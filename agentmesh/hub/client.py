"""The network hub client: :class:`NetworkHub`, a :class:`~agentmesh.protocol.hub_interface.Hub`
over TCP/TLS.

Threads
    One background I/O thread runs an asyncio event loop for every
    connection of one ``NetworkHub`` (started lazily, never per call). Each
    registered agent has its own authenticated connection and its own
    *dispatcher* thread, which hands pushed envelopes to
    ``endpoint.receive_envelope`` one at a time, in the order the hub pushed
    them, and then acknowledges them (acks are batched). Other endpoint
    calls made by the client (signing the login, reading prekeys and the
    outbox) run in the loop's executor so they never block the loop.

Reconnect
    After a lost connection the link retries with :func:`backoff` (exponential,
    full jitter, capped) while :func:`is_retryable` says so, always in this
    order: cancel the pinger -> connect -> LOGIN (publishing the bundle) ->
    upload one-time prekeys -> re-send the agent's outbox
    (``endpoint.unacked_envelopes()``) -> resume dispatching pushes.

Login binding
    Every connection signs, in its LOGIN, the hub name it dialled
    (``server_hostname`` if TLS sets one, else ``host``, and ``port``; or
    ``expected_hub_address``) and, over TLS, the SHA-256 of the certificate it
    verified. A hub whose HELLO does not list that name is refused before
    anything is signed (``wrong_hub``, an :class:`~agentmesh.errors.AuthFailedError`).

Foreign exceptions (``OSError``, ``ssl.SSLError``, timeouts) are mapped to
:class:`~agentmesh.errors.HubUnavailableError` at this boundary; refusals
by the hub become :class:`~agentmesh.errors.HubError` subclasses.

Never logs keys, signatures or envelope contents; codes and texts the hub
sent are logged with ``%r``, so they cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import random
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from agentmesh.crypto.prekeys import PrekeyBundle
from agentmesh.errors import (
    AuthFailedError,
    ConfigurationError,
    CryptoError,
    DecodeError,
    HubError,
    HubUnavailableError,
    IdentityChangedError,
    LocalProtocolError,
    MailboxFullError,
    PeerNotFoundError,
)
from agentmesh.protocol import hub_protocol as hp
from agentmesh.protocol.hub_interface import (
    BatchEndpoint,
    DispatchingEndpoint,
    EndpointOwner,
    HubEndpoint,
    NoticingEndpoint,
    RefusalAwareEndpoint,
    endpoint_of,
    is_ephemeral,
    supports,
)
from agentmesh.wire.envelope import Envelope, decode_envelope

logger = logging.getLogger("agentmesh.hub.client")

_T = TypeVar("_T")
DEFAULT_PORT = 7700
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
_AUTH_CODES = frozenset(
    {
        "identity_mismatch",
        "bad_signature",
        "unknown_agent",
        "wrong_hub",
        "channel_binding_mismatch",
    }
)
#: Why a client gives up on a hub before login: it is not the hub it dialled, or too old.
_HELLO_REFUSALS = frozenset({"wrong_hub", "unsupported_version"})
#: Bytes of an UPLOAD_PREKEYS frame besides the prekeys (length, type, request id, count).
_UPLOAD_OVERHEAD = 4 + 1 + 4 + 2


def backoff(
    initial: float = 0.1,
    maximum: float = 10.0,
    factor: float = 2.0,
    rng: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Reconnect delays: exponential growth capped at ``maximum``, with full jitter.

    The n-th value is uniform in ``[0, min(maximum, initial * factor**n))``
    (``rng`` returns floats in [0, 1); inject it for deterministic tests).
    """
    ceiling = initial
    while True:
        yield rng() * ceiling
        ceiling = min(maximum, ceiling * factor)


def is_retryable(exc: BaseException) -> bool:
    """Whether reconnecting after ``exc`` may succeed (auth refusals never do)."""
    if isinstance(exc, AuthFailedError):
        return False
    if isinstance(exc, HubError):
        return exc.code in RETRYABLE_CODES
    return isinstance(exc, HubUnavailableError | OSError | asyncio.TimeoutError | DecodeError)


def hub_error(code: str, text: str, recipient: str | None = None) -> Exception:
    """The exception a client raises for a hub ERROR with ``code``."""
    if code == "unknown_recipient" and recipient is not None:
        return PeerNotFoundError(recipient)
    if code == "mailbox_full":
        return MailboxFullError(code, text)
    if code in _AUTH_CODES:
        return AuthFailedError(code, text)
    return HubError(code, text)


def _context_trusting(ca_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A client TLS context that trusts the certificates in ``ca_file`` (PEM), for a
    hub with a self-signed or private-CA certificate. Hostname checking stays on."""
    path = os.fspath(ca_file)
    if not os.path.isfile(path):
        raise ConfigurationError(f"tls: CA file {path!r} does not exist or is not a file")
    try:
        return ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigurationError(
            f"tls: {path!r} holds no PEM certificate a hub could be verified with ({exc})"
        ) from exc


def _chunk_prekeys(prekeys: list[bytes], max_frame_size: int) -> list[list[bytes]]:
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


# --- one connection --------------------------------------------------------


class _Wire(asyncio.Protocol):
    """One hub connection: a :class:`ClientConnection`, its transport, and request waiters.

    Loop thread only. ``on_event`` receives every event that is not the answer
    to a request (pushes, PREKEYS_LOW, fatal errors).
    """

    def __init__(
        self, conn: hp.ClientConnection, on_event: Callable[[hp.Event], None] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        self.conn = conn
        self.on_event = on_event
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[hp.HelloReceived] = loop.create_future()
        self.lost: asyncio.Future[str | None] = loop.create_future()
        self.close_reason: str | None = None
        self.last_rx = loop.time()
        self._waiters: dict[int, asyncio.Future[hp.Event]] = {}

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Called after the TLS handshake: the certificate is the one just verified.
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            certificate = ssl_object.getpeercert(binary_form=True)
            if certificate:
                self.conn.set_channel_binding(hp.tls_server_end_point(certificate))

    def data_received(self, data: bytes) -> None:
        self.last_rx = asyncio.get_running_loop().time()
        for event in self.conn.receive_data(data):
            self._handle(event)
        self.write()

    def connection_lost(self, exc: Exception | None) -> None:
        error = HubUnavailableError(
            f"connection to the hub lost ({self.close_reason or exc or 'closed'})"
        )
        if not self.hello.done():
            self.hello.set_exception(error)
            self.hello.exception()  # mark retrieved: open_wire may have stopped waiting
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()
        if not self.lost.done():
            self.lost.set_result(self.close_reason)

    # driving

    def require_open(self) -> None:
        """Raise HubUnavailableError if the connection is closed or closing."""
        if self.lost.done() or self.conn.closed:
            raise HubUnavailableError(
                f"connection to the hub closed ({self.close_reason or 'connection lost'})"
            )

    @property
    def authenticated(self) -> bool:
        return self.conn.state is hp.State.AUTHENTICATED and not self.lost.done()

    def write(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self.conn.data_to_send()
        if data:
            transport.write(data)
        if self.conn.closed:
            transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _handle(self, event: hp.Event) -> None:
        if isinstance(event, hp.HelloReceived):
            if not self.hello.done():
                self.hello.set_result(event)
            return
        if (
            isinstance(event, hp.ConnectionFailed)
            and event.code in _HELLO_REFUSALS
            and not self.hello.done()
        ):
            # Not a hub this client may log in to: open_wire raises why (not retried),
            # rather than "connection lost", which would be retried for ever.
            self.hello.set_exception(hub_error(event.code, event.detail))
            self.hello.exception()  # mark retrieved: open_wire may have stopped waiting
        request_id = getattr(event, "request_id", None)
        if request_id and request_id in self._waiters:
            future = self._waiters.pop(request_id)
            if not future.done():
                future.set_result(event)
            return
        if isinstance(event, hp.ConnectionFailed):
            self.close_reason = event.code
            log = logger.info if event.code == "shutting_down" else logger.warning
            log("hub connection closed: %r %r", event.code, event.detail)
        elif isinstance(event, hp.ErrorReceived) and not event.fatal:
            logger.warning("hub error: %r %r", event.code, event.text)
        if self.on_event is not None:
            self.on_event(event)

    async def request(self, request_id: int, timeout: float) -> hp.Event:
        """Send what is queued and wait for the answer to ``request_id``.

        Raises HubUnavailableError if the connection drops or no answer
        arrives within ``timeout`` seconds.
        """
        if self.lost.done():
            raise HubUnavailableError("not connected to the hub")
        future: asyncio.Future[hp.Event] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        self.write()
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise HubUnavailableError(f"no answer from the hub within {timeout}s") from None
        finally:
            self._waiters.pop(request_id, None)


def _expect(event: hp.Event, kind: type[_T], recipient: str | None = None) -> _T:
    if isinstance(event, kind):
        return event
    if isinstance(event, hp.ErrorReceived):
        raise hub_error(event.code, event.text, recipient)
    raise HubError("protocol", f"unexpected answer {type(event).__name__}")  # pragma: no cover


# --- the I/O thread --------------------------------------------------------


class _IOThread:
    """A daemon thread running one event loop forever; coroutines are submitted to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="agentmesh-hub-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # stop() cancelled every task; let them finish cancelling before the loop is
        # closed, or each is "destroyed but pending" (an asyncio ERROR on stderr).
        pending = asyncio.all_tasks(self.loop)
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        """Run ``coro`` on the loop and wait; on timeout cancel it and raise HubUnavailableError."""
        if threading.current_thread() is self._thread:
            raise LocalProtocolError("NetworkHub methods must not be called from its I/O thread")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise HubUnavailableError(f"the hub did not answer within {timeout}s") from None

    def stop(self) -> None:
        def shutdown() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.stop()

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(shutdown)
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
            if not self._thread.is_alive():
                self.loop.close()


# --- one registered agent --------------------------------------------------

_STOP = object()
#: Queued to the dispatcher after each login: run handlers for already-committed messages.
_DISPATCH = object()
#: Run the endpoint's handlers at least this often while pushes keep arriving.
_DISPATCH_EVERY = 64
#: At most this many queued pushes go to ``endpoint.receive_envelopes`` (one commit).
_RECEIVE_BATCH = 128


class _Link:
    """One registered agent: its connection (re-made after losses), its dispatcher
    thread (hands pushes to the endpoint and acks them) and its handler thread (runs
    the endpoint's handlers), so that a handler waiting for a reply (``request``)
    does not stop the reply from being received."""

    def __init__(self, hub: NetworkHub, endpoint: HubEndpoint, loop: asyncio.AbstractEventLoop):
        self.hub = hub
        self.endpoint = endpoint
        self.agent_id = endpoint.agent_id
        self.loop = loop
        self.wire: _Wire | None = None
        #: The hub's announced envelope limit on the last connection (None: none yet).
        self.envelope_limit: int | None = None
        self.connected = asyncio.Event()
        self.failure: BaseException | None = None
        self.closing = False
        #: Between reading the outbox for a re-send and being connected: a new
        #: envelope would miss that re-send, so senders wait instead of failing.
        self.flushing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._acks: list[bytes] = []
        self._queued: set[bytes] = set()
        # Pipelined sends (NetworkHub.submit). ``_flow`` guards ``_in_flight``: envelopes
        # submitted and not yet acknowledged, refused, or handed back to the outbox.
        self._flow = threading.Condition()
        self._in_flight = 0
        #: Loop thread: request id -> (message id, envelope) of pipelined SENDs on ``wire``.
        self._pipelined: dict[int, tuple[bytes, bytes]] = {}
        #: Loop thread: submitted while a login re-sends the outbox; sent right after it.
        self._held: list[tuple[bytes, bytes]] = []
        #: Loop thread: acknowledged message ids for the endpoint, and whether each was
        #: a pipelined send (counted in ``_in_flight``).
        self._acked_ids: list[tuple[bytes, bool]] = []
        #: (sender, error) of pushed envelopes the endpoint refused (dispatcher thread).
        self._unreadable: list[tuple[str, Exception]] = []
        self._write_pending = False
        self._upload_lock = asyncio.Lock()
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._dispatching = threading.Event()
        self._dispatcher = threading.Thread(
            target=self._dispatch_forever, name=f"agentmesh-dispatch-{self.agent_id}", daemon=True
        )
        #: Set when committed messages may wait for the handlers (see _handle_forever).
        self._handlers_due = threading.Event()
        self._handler_thread = threading.Thread(
            target=self._handle_forever, name=f"agentmesh-handlers-{self.agent_id}", daemon=True
        )

    # -- lifecycle (loop thread) ------------------------------------------

    async def start(self, *, background: bool = False) -> None:
        """Connect and log in once; raise if that fails (no background retry then).

        ``background``: return at once and keep trying to log in (with the
        reconnect backoff) until it works or the hub refuses for good.
        """
        self._dispatcher.start()
        self._handler_thread.start()
        first: asyncio.Future[None] = self.loop.create_future()
        if background:
            first.set_result(None)  # nobody waits for the first login
        self._supervisor = self.loop.create_task(self._supervise(first))
        await first

    async def close(self) -> None:
        self.closing = True
        self.failure = HubUnavailableError("unregistered from this NetworkHub")
        self.connected.set()  # wake senders waiting for a reconnect
        self._give_back()
        with self._flow:
            self._flow.notify_all()  # wake pipelined senders waiting for room
        for task in (self._pinger, self._supervisor):
            if task is not None:
                task.cancel()
        if self.wire is not None:
            self.flush_acks()
            self.wire.close()
        self._inbox.put(_STOP)
        self._dispatching.set()
        self._handlers_due.set()

    def join(self, timeout: float) -> None:
        """Wait for the dispatcher and handler threads to finish what they are doing
        (never for the calling thread itself)."""
        for thread in (self._dispatcher, self._handler_thread):
            if thread.is_alive() and threading.current_thread() is not thread:
                thread.join(timeout)

    async def _supervise(self, first: asyncio.Future[None]) -> None:
        delays = self.hub.make_backoff()
        while not self.closing:
            try:
                wire = await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not first.done():
                    first.set_exception(exc)
                    return
                if not is_retryable(exc):
                    logger.error("%s: giving up reconnecting: %s", self.agent_id, exc)
                    self.failure = exc
                    self.connected.set()  # wake senders so they see the failure
                    return
                delay = next(delays)
                logger.warning(
                    "%s: reconnect failed (%s); retry in %.2fs", self.agent_id, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            if not first.done():
                first.set_result(None)
            delays = self.hub.make_backoff()
            reason = await wire.lost
            self._disconnected()
            if self.closing:
                return
            if reason == "replaced":
                logger.error("%s: another connection logged in as this agent", self.agent_id)
                self.failure = HubError("replaced", "another connection logged in as this agent")
                self.connected.set()
                return
            delay = next(delays)
            logger.warning("%s: connection lost; reconnecting in %.2fs", self.agent_id, delay)
            await asyncio.sleep(delay)

    def _disconnected(self) -> None:
        # Order matters: stop the pinger and dispatching before anything reconnects.
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        self.connected.clear()
        self._dispatching.clear()
        self._acks.clear()  # unacked pushes are redelivered after the next login
        self._give_back()  # unacknowledged pipelined sends: the next login re-sends the outbox

    async def _connect(self) -> _Wire:
        hub, endpoint = self.hub, self.endpoint
        wire = await hub.open_wire(self._on_event)
        try:
            conn = wire.conn
            ephemeral = is_ephemeral(endpoint)
            challenge = conn.login_challenge(self.agent_id, ephemeral=ephemeral)
            signature = await self._call(endpoint.sign_login, challenge)
            bundle = await self._call(endpoint.prekey_bundle_bytes)
            wire.require_open()
            rid = conn.login(
                self.agent_id, endpoint.signing_public_key, signature, bundle, ephemeral=ephemeral
            )
            _expect(await wire.request(rid, hub.request_timeout), hp.LoginAccepted)
            self.wire = wire
            self.envelope_limit = conn.max_envelope_bytes
            await self._upload_prekeys(wire, await self._call(endpoint.one_time_prekeys))
            await self._flush_outbox(wire)
        except BaseException:
            self.flushing = False
            self._give_back()
            wire.close()
            raise
        self.flushing = False
        self.connected.set()
        held, self._held = self._held, []
        for data, message_id in held:
            self._send_pipelined(wire, data, message_id)
        self._inbox.put(_DISPATCH)
        self._dispatching.set()
        self._pinger = self.loop.create_task(self._keepalive(wire))
        logger.info("%s: logged in to the hub", self.agent_id)
        return wire

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self.loop.run_in_executor(None, fn, *args)

    async def _upload_prekeys(self, wire: _Wire, prekeys: list[bytes]) -> None:
        # One upload at a time, and never a key the hub already stored: it may have
        # handed that key out (and deleted it) since, and a second copy would be
        # handed out again, to a sender whose initial message then cannot decrypt.
        # (A login, a PREKEYS_LOW top-up and a refresh can all read the same
        # not-yet-marked keys.)
        async with self._upload_lock:
            stored = self.hub.stored_prekeys.setdefault(self.agent_id, set())
            known = [p for p in prekeys if p in stored]
            if known:
                await self._call(self.endpoint.one_time_prekeys_uploaded, known)
            fresh = [p for p in prekeys if p not in stored]
            for chunk in _chunk_prekeys(fresh, wire.conn.peer_max_frame_size):
                rid = wire.conn.upload_prekeys(chunk)
                _expect(await wire.request(rid, self.hub.request_timeout), hp.RequestSucceeded)
                stored.update(chunk)
                await self._call(self.endpoint.one_time_prekeys_uploaded, chunk)

    async def _flush_outbox(self, wire: _Wire) -> None:
        self.flushing = True
        outbox = await self._call(self.endpoint.unacked_envelopes)
        if not outbox:
            return
        results = await asyncio.gather(
            *(self._send_on(wire, data) for data in outbox), return_exceptions=True
        )
        for data, result in zip(outbox, results, strict=True):
            if isinstance(result, HubUnavailableError):
                raise result
            if isinstance(result, BaseException):
                logger.warning("%s: outbox envelope refused by the hub: %s", self.agent_id, result)
                if isinstance(result, Exception):
                    await self._refused(decode_envelope(data).message_id, result)
                continue
            await self._call(self.endpoint.envelope_acked, result)
        logger.info("%s: re-sent %d outbox envelopes", self.agent_id, len(outbox))

    async def _keepalive(self, wire: _Wire) -> None:
        interval = self.hub.ping_interval
        while not wire.lost.done():
            await asyncio.sleep(interval)
            silent = self.loop.time() - wire.last_rx
            if silent >= 3 * interval:
                logger.warning("%s: hub silent for %.0fs; reconnecting", self.agent_id, silent)
                if wire.transport is not None:
                    wire.transport.abort()
                return
            if silent >= interval and wire.authenticated:
                wire.conn.ping()
                wire.write()

    # -- sending ----------------------------------------------------------

    async def _send_on(
        self,
        wire: _Wire,
        data: bytes,
        envelope: Envelope | None = None,
        deadline: float | None = None,
    ) -> bytes:
        """SEND on ``wire`` until acknowledged (by ``deadline``, default ``ack_timeout``
        from now); return the message id. Retries ``rate_limited`` with backoff."""
        if envelope is None:
            envelope = decode_envelope(data)
        if len(data) > wire.conn.max_envelope_bytes:
            raise HubError("too_large", f"envelope of {len(data)} bytes exceeds the hub's limit")
        delays = self.hub.make_backoff()
        if deadline is None:
            deadline = self.loop.time() + self.hub.ack_timeout
        while True:
            if not wire.authenticated:
                raise HubUnavailableError("not connected to the hub")
            rid = wire.conn.send(data)
            event = await wire.request(rid, max(0.0, deadline - self.loop.time()))
            if isinstance(event, hp.ErrorReceived) and event.code == "rate_limited":
                delay = next(delays)
                if self.loop.time() + delay < deadline:
                    await asyncio.sleep(delay)
                    continue
            _expect(event, hp.SendAcknowledged, envelope.recipient)
            return envelope.message_id

    async def send(self, data: bytes, envelope: Envelope) -> bytes:
        """SEND and wait for the ack (``ack_timeout`` in all).

        Raises HubUnavailableError at once while disconnected: the envelope is
        in the agent's outbox, and the next login re-sends it. Only while a
        login is re-sending the outbox (which it read before this envelope was
        added) does it wait for the connection instead.
        """
        deadline = self.loop.time() + self.hub.ack_timeout
        if not self.connected.is_set() and not self.flushing:
            raise HubUnavailableError("not connected to the hub; the envelope stays in the outbox")
        try:
            await asyncio.wait_for(self.connected.wait(), self.hub.ack_timeout)
        except asyncio.TimeoutError:
            raise HubUnavailableError("not connected to the hub") from None
        if self.failure is not None:
            raise HubUnavailableError(f"disconnected from the hub: {self.failure}")
        wire = self.wire
        if wire is None or not wire.authenticated:
            raise HubUnavailableError("not connected to the hub")
        return await self._send_on(wire, data, envelope, deadline)

    # -- pipelined sending (NetworkHub.submit) -----------------------------

    def submit(self, data: bytes, envelope: Envelope) -> None:
        """Caller thread: queue a SEND without waiting for its ack (see NetworkHub.submit)."""
        window = self.hub.send_window
        with self._flow:
            room = self._flow.wait_for(
                lambda: self._in_flight < window or self.closing or self.failure is not None,
                self.hub.ack_timeout,
            )
            if self.failure is not None:
                raise HubUnavailableError(f"disconnected from the hub: {self.failure}")
            if not room:
                raise HubUnavailableError(
                    f"{window} envelopes unacknowledged for {self.hub.ack_timeout}s"
                )
            self._in_flight += 1
        try:
            self.loop.call_soon_threadsafe(self._submit, data, envelope.message_id)
        except RuntimeError:  # the loop is gone
            self._resolve(1)
            raise HubUnavailableError("this NetworkHub is closed") from None

    def wait_idle(self, timeout: float | None) -> bool:
        """Caller thread: wait until no pipelined send is unresolved; False on timeout."""
        with self._flow:
            return self._flow.wait_for(lambda: self._in_flight == 0, timeout)

    def _resolve(self, count: int) -> None:
        with self._flow:
            self._in_flight -= count
            self._flow.notify_all()

    def _give_back(self) -> None:
        """Loop thread: forget unacknowledged pipelined sends (they stay in the outbox)."""
        lost = len(self._pipelined) + len(self._held)
        self._pipelined.clear()
        self._held.clear()
        if lost:
            self._resolve(lost)

    def _submit(self, data: bytes, message_id: bytes) -> None:
        wire = self.wire
        if self.connected.is_set() and wire is not None and wire.authenticated:
            self._send_pipelined(wire, data, message_id)
        elif self.flushing and not self.closing:
            self._held.append((data, message_id))
        else:
            self._resolve(1)  # not connected: the next login re-sends the outbox

    def _send_pipelined(self, wire: _Wire, data: bytes, message_id: bytes) -> None:
        if not wire.authenticated:
            self._resolve(1)
            return
        try:
            request_id = wire.conn.send(data)
        except LocalProtocolError as exc:  # larger than this hub accepts
            logger.warning("%s: envelope %s not sent: %s", self.agent_id, message_id.hex(), exc)
            self._resolve(1)
            return
        self._pipelined[request_id] = (message_id, data)
        if not self._write_pending:  # one write for every SEND queued in this loop turn
            self._write_pending = True
            self.loop.call_soon(self._write, wire)

    def _write(self, wire: _Wire) -> None:
        self._write_pending = False
        wire.write()

    def _pipelined_refused(self, event: hp.ErrorReceived) -> None:
        message_id, data = self._pipelined.pop(event.request_id)
        wire = self.wire
        if event.code == "rate_limited" and wire is not None:
            delay = 0.05 + 0.2 * random.random()  # noqa: S311 - jitter, not crypto
            self.loop.call_later(delay, self._send_pipelined, wire, data, message_id)
            return
        logger.warning(
            "%s: the hub refused envelope %s (%r)", self.agent_id, message_id.hex(), event.code
        )
        error = hub_error(event.code, event.text, decode_envelope(data).recipient)
        task = self.loop.create_task(self._refused(message_id, error))
        self.hub.tasks.add(task)
        task.add_done_callback(self.hub.tasks.discard)
        self._resolve(1)

    async def _refused(self, message_id: bytes, error: Exception) -> None:
        """Tell the endpoint the hub refused an outbox envelope (it may dead-letter it)."""
        if supports(self.endpoint, RefusalAwareEndpoint):
            try:
                await self._call(self.endpoint.envelope_refused, message_id, error)
            except Exception:
                logger.exception("%s: recording a refusal failed", self.agent_id)

    def _queue_ack(self, message_id: bytes, counted: bool) -> None:
        if not self._acked_ids:
            self.loop.call_soon(self._hand_acks)
        self._acked_ids.append((message_id, counted))

    def _hand_acks(self) -> None:
        batch, self._acked_ids = self._acked_ids, []
        if batch:
            self.loop.run_in_executor(None, self._apply_acks, batch)

    def _apply_acks(self, batch: list[tuple[bytes, bool]]) -> None:
        """Executor thread: drop acknowledged envelopes from the endpoint's outbox."""
        try:
            ids = [message_id for message_id, _ in batch]
            if supports(self.endpoint, BatchEndpoint):
                self.endpoint.envelopes_acked(ids)
            else:
                for message_id in ids:
                    self.endpoint.envelope_acked(message_id)
        except Exception:
            logger.exception("%s: recording %d acknowledgements failed", self.agent_id, len(batch))
        finally:
            counted = sum(1 for _, pipelined in batch if pipelined)
            if counted:
                self._resolve(counted)

    async def request(self, build: Callable[[hp.ClientConnection], int]) -> hp.Event:
        """Issue one request on this agent's connection and return the answer event."""
        wire = self.wire
        if wire is None or not wire.authenticated:
            raise HubUnavailableError("not connected to the hub")
        return await wire.request(build(wire.conn), self.hub.request_timeout)

    # -- receiving --------------------------------------------------------

    def _on_event(self, event: hp.Event) -> None:
        if isinstance(event, hp.SendAcknowledged):
            # A pipelined send's ack, or one that came after deliver() gave up waiting:
            # either way, drop the envelope from the outbox.
            pipelined = self._pipelined.pop(event.request_id, None) is not None
            self._queue_ack(event.message_id, pipelined)
        elif isinstance(event, hp.ErrorReceived) and event.request_id in self._pipelined:
            self._pipelined_refused(event)
        elif isinstance(event, hp.EnvelopePushed):
            if event.message_id not in self._queued:
                self._queued.add(event.message_id)
                self._inbox.put(event)
        elif isinstance(event, hp.PrekeysLowReceived):
            task = self.loop.create_task(self._replenish(event.remaining))
            self.hub.tasks.add(task)
            task.add_done_callback(self.hub.tasks.discard)

    async def _replenish(self, remaining: int) -> None:
        try:
            await self._call(self.endpoint.prekeys_low, remaining)
            bundle = await self._call(self.endpoint.prekey_bundle_bytes)
            prekeys = await self._call(self.endpoint.one_time_prekeys)
        except Exception as exc:
            logger.warning("%s: topping up prekeys failed: %s", self.agent_id, exc)
            return
        await self.upload(bundle, prekeys)

    async def upload(self, bundle: bytes, prekeys: list[bytes]) -> None:
        """Publish ``bundle`` and upload ``prekeys`` on the current connection (logs failures)."""
        wire = self.wire
        if wire is None or not wire.authenticated:
            return
        try:
            rid = wire.conn.publish_bundle(bundle)
            _expect(await wire.request(rid, self.hub.request_timeout), hp.RequestSucceeded)
            await self._upload_prekeys(wire, prekeys)
        except Exception as exc:
            logger.warning("%s: uploading prekeys failed: %s", self.agent_id, exc)

    def _dispatch_forever(self) -> None:
        """Dispatcher thread: hand pushes to the endpoint in order, ack them, run handlers.

        Pushes waiting in the queue (up to ``_RECEIVE_BATCH``) go to the endpoint
        together, so it commits them in one transaction; their ACKs follow at
        once. The endpoint's handlers (``dispatch_pending``, if it has one) run
        whenever the queue is empty, every ``_DISPATCH_EVERY`` messages, and after
        each login.
        """
        since_dispatch = 0
        follow: object = None
        while True:
            item, follow = (follow, None) if follow is not None else (self._inbox.get(), None)
            self._dispatching.wait()
            if item is _STOP or self.closing:
                return
            if isinstance(item, hp.EnvelopePushed):
                batch = [item]
                while len(batch) < _RECEIVE_BATCH:
                    try:
                        more = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(more, hp.EnvelopePushed):
                        follow = more  # _STOP or _DISPATCH: handled next, in order
                        break
                    batch.append(more)
                results = self._receive_batch(batch)
                since_dispatch += len(batch)
                with contextlib.suppress(RuntimeError):  # the loop is gone: no ack needed
                    self.loop.call_soon_threadsafe(self._processed_batch, results)
                self._report_unreadable()
            if follow is None and (since_dispatch >= _DISPATCH_EVERY or self._inbox.empty()):
                since_dispatch = 0
                self._run_handlers()

    def _receive_batch(self, batch: list[hp.EnvelopePushed]) -> list[tuple[bytes, bool]]:
        """Hand envelopes to the endpoint; return (message id, may the hub drop it) each."""
        endpoint = self.endpoint
        if not supports(endpoint, BatchEndpoint) or len(batch) == 1:
            return [(item.message_id, self._receive(item)) for item in batch]
        try:
            outcomes = endpoint.receive_envelopes([item.envelope for item in batch])
        except Exception:
            logger.exception("%s: receiving %d envelopes failed", self.agent_id, len(batch))
            return [(item.message_id, False) for item in batch]
        return [
            (item.message_id, self._verdict(item, outcome))
            for item, outcome in zip(batch, outcomes, strict=True)
        ]

    def _receive(self, item: hp.EnvelopePushed) -> bool:
        """Hand one envelope to the endpoint; return whether the hub may drop it."""
        try:
            self.endpoint.receive_envelope(item.envelope)
        except Exception as exc:
            return self._verdict(item, exc)
        return True

    def _verdict(self, item: hp.EnvelopePushed, outcome: object) -> bool:
        """Whether the hub may drop ``item``, given what receiving it returned or raised."""
        try:
            if isinstance(outcome, Exception):
                raise outcome
        except IdentityChangedError as exc:
            # Held on the hub (not acked) until the user trusts the new key; it is
            # pushed again after the next login.
            logger.warning("%s: holding envelope %s: %s", self.agent_id, item.message_id.hex(), exc)
            return False
        except (CryptoError, DecodeError) as exc:
            # Poison: it can never be processed. Ack it so the hub drops it.
            logger.warning(
                "%s: dropping envelope %s: %s", self.agent_id, item.message_id.hex(), exc
            )
            if isinstance(exc, CryptoError):
                with contextlib.suppress(DecodeError):
                    self._unreadable.append((decode_envelope(item.envelope).sender, exc))
        except Exception:
            logger.exception(
                "%s: receiving envelope %s failed", self.agent_id, item.message_id.hex()
            )
            return False  # left on the hub; redelivered after the next login
        return True

    def _report_unreadable(self) -> None:
        """Dispatcher thread, after the batch's acks were handed to the loop: tell the
        endpoint who sent what it refused (the hub vouched for each sender: it refuses
        envelopes that are not from the logged-in agent)."""
        reports, self._unreadable = self._unreadable, []
        if reports and supports(self.endpoint, NoticingEndpoint):
            for sender, error in reports:
                try:
                    self.endpoint.unreadable_envelope(sender, error)
                except Exception:
                    logger.exception("%s: reporting a refused envelope failed", self.agent_id)

    def _run_handlers(self) -> None:
        """Dispatcher thread: let the handler thread run the handlers (never waits)."""
        self._handlers_due.set()

    def _handle_forever(self) -> None:
        """Handler thread: run the endpoint's handlers whenever messages were committed."""
        endpoint = self.endpoint
        dispatch = endpoint.dispatch_pending if supports(endpoint, DispatchingEndpoint) else None
        while True:
            self._handlers_due.wait()
            self._handlers_due.clear()
            if self.closing:
                return
            if dispatch is None:
                continue
            try:
                dispatch()
            except Exception:
                logger.exception("%s: running message handlers failed", self.agent_id)

    def _processed_batch(self, results: list[tuple[bytes, bool]]) -> None:
        for message_id, ack in results:
            self._queued.discard(message_id)
            if ack:
                if not self._acks:
                    self.loop.call_soon(self.flush_acks)
                self._acks.append(message_id)

    def flush_acks(self) -> None:
        """Send the batched ACKs (dropped if disconnected: the hub redelivers)."""
        acks, self._acks = self._acks, []
        wire = self.wire
        if acks and wire is not None and wire.authenticated:
            wire.conn.ack(acks)
            wire.write()


# --- the public client -----------------------------------------------------


class NetworkHub:
    """A hub reached over the network (implements :class:`~agentmesh.protocol.hub_interface.Hub`).

    ``NetworkHub(host, port=7700, *, tls=False, ...)``: ``tls`` is False, True
    (verify the hub's certificate with the system trust store), the path of a
    PEM CA file to trust instead (``tls="hub.crt"`` for a hub with a
    self-signed certificate; a missing or unreadable file raises
    :class:`~agentmesh.errors.ConfigurationError` naming it), or an
    ``ssl.SSLContext``. Keyword-only settings: ``connect_timeout`` (TCP/TLS
    connect and HELLO), ``ack_timeout`` (how long :meth:`deliver` waits for
    the hub's SEND_ACK, including a reconnect), ``request_timeout`` (other
    requests), ``ping_interval``, ``reconnect_initial``/``reconnect_max``
    (seconds, see :func:`backoff`), ``server_hostname`` (the TLS server name,
    default ``host``), ``expected_hub_address`` and ``send_window`` (how many
    envelopes :meth:`submit` keeps unacknowledged per agent).

    Logins are bound to the hub: the client signs the name it dialled,
    :attr:`dialled_address` (``server_hostname`` over TLS if given, else
    ``host``, with ``port``), and over TLS the SHA-256 of the certificate it
    verified; it refuses a hub that does not announce that name
    (``AuthFailedError("wrong_hub")``). ``expected_hub_address="host:port"``
    replaces the dialled name as what is expected and signed, e.g. to reach a
    hub through a tunnel or by IP.

    The constructor does no network I/O (it reads a CA file given as ``tls``);
    the I/O thread starts with the first call that needs it. All methods are
    thread-safe and blocking, and must not be called from the hub's own I/O
    thread. Use :meth:`close` (or ``with``).
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        tls: bool | str | os.PathLike[str] | ssl.SSLContext = False,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        request_timeout: float = 30.0,
        ping_interval: float = 20.0,
        reconnect_initial: float = 0.1,
        reconnect_max: float = 10.0,
        expected_hub_address: str | None = None,
        max_frame_size: int = hp.CLIENT_MAX_FRAME_SIZE,
        send_window: int = 1024,
    ) -> None:
        if send_window < 1:
            raise ValueError("send_window must be at least 1")
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.request_timeout = request_timeout
        self.ping_interval = ping_interval
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.expected_hub_address = expected_hub_address
        dialled = server_hostname if tls is not False and server_hostname else host
        try:
            #: The hub name this client dialled, as its logins sign it.
            self.dialled_address = hp.format_hub_address(dialled, port)
            if expected_hub_address is not None:
                hp.parse_hub_address(expected_hub_address)
        except ValueError as exc:
            raise ValueError(f"cannot name the hub to log in to: {exc}") from exc
        self.max_frame_size = max_frame_size
        self.send_window = send_window
        self._server_hostname = server_hostname
        self._ssl_context: ssl.SSLContext | None = None
        if isinstance(tls, (str, os.PathLike)):
            self._ssl_context = _context_trusting(tls)
            tls = self._ssl_context
        self._tls: bool | ssl.SSLContext = tls
        self._io: _IOThread | None = None
        self._links: dict[str, _Link] = {}
        #: One-time prekeys the hub acknowledged, by agent (loop thread; see _upload_prekeys).
        self.stored_prekeys: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"NetworkHub({self.host!r}, {self.port}, tls={self._tls is not False})"

    # -- plumbing ---------------------------------------------------------

    def _thread(self) -> _IOThread:
        with self._lock:
            if self._closed:
                raise LocalProtocolError("this NetworkHub is closed")
            if self._io is None:
                self._io = _IOThread()
            return self._io

    def _ssl(self) -> ssl.SSLContext | None:
        """The client TLS context (the system trust store for ``tls=True``), made on first use."""
        if isinstance(self._tls, ssl.SSLContext):
            return self._tls
        if self._tls and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def make_backoff(self) -> Iterator[float]:
        return backoff(self.reconnect_initial, self.reconnect_max)

    async def open_wire(self, on_event: Callable[[hp.Event], None] | None = None) -> _Wire:
        """Connect and wait for HELLO (loop thread). Raises HubUnavailableError, or
        AuthFailedError (``wrong_hub``) / HubError (``unsupported_version``) for a
        hub this client must not log in to."""
        loop = asyncio.get_running_loop()
        conn = hp.ClientConnection(
            max_frame_size=self.max_frame_size,
            expected_hub_address=self.expected_hub_address,
            dialled_address=self.dialled_address,
        )
        wire = _Wire(conn, on_event)
        context = self._ssl()
        where = f"{self.host}:{self.port}"
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: wire,
                    self.host,
                    self.port,
                    ssl=context,
                    server_hostname=(self._server_hostname or self.host) if context else None,
                ),
                self.connect_timeout,
            )
        except ssl.SSLError as exc:
            wire.close()
            raise HubUnavailableError(
                f"TLS with {where} failed ({exc.reason or exc}): is it a hub started with "
                "--tls-cert, and does the CA given to tls= sign its certificate?"
            ) from exc
        except (OSError, asyncio.TimeoutError) as exc:
            wire.close()
            raise HubUnavailableError(
                f"cannot reach the hub at {where}: {exc or 'timeout'}"
            ) from exc
        except BaseException:
            wire.close()
            raise
        # Connected: now the hub must speak first. Anything else (a database, a web
        # server, a TLS hub reached in plaintext) fails here, within connect_timeout.
        hint = (
            "is it an AgentMesh hub, and does it use TLS?"
            if context is not None
            else "is it an AgentMesh hub? A hub started with --tls-cert needs tls= here"
        )
        try:
            await asyncio.wait_for(asyncio.shield(wire.hello), self.connect_timeout)
        except asyncio.TimeoutError as exc:
            wire.close()
            raise HubUnavailableError(
                f"{where} accepted the connection but sent no AgentMesh HELLO within "
                f"{self.connect_timeout} s: {hint}"
            ) from exc
        except HubUnavailableError as exc:
            wire.close()
            raise HubUnavailableError(
                f"{where} closed the connection before any AgentMesh HELLO ({exc}): {hint}"
            ) from exc
        except BaseException:
            wire.close()
            raise
        return wire

    def envelope_limit(self, agent_id: str) -> int | None:
        """The largest envelope the hub announced on this agent's connection (its last
        connection while disconnected); None before the first login."""
        link = self._links.get(agent_id)
        return None if link is None else link.envelope_limit

    def _link(self, agent_id: str) -> _Link:
        link = self._links.get(agent_id)
        if link is None:
            raise LocalProtocolError(f"agent {agent_id!r} is not registered with this NetworkHub")
        return link

    async def _any_request(self, build: Callable[[hp.ClientConnection], int]) -> hp.Event:
        """Ask on a logged-in connection; raise if there is none."""
        for link in list(self._links.values()):
            if link.wire is not None and link.wire.authenticated:
                return await link.request(build)
        if self._links:
            raise HubUnavailableError("not connected to the hub")
        raise HubError("login_required", "register an agent with this NetworkHub first")

    async def _anonymous_request(self, build: Callable[[hp.ClientConnection], int]) -> hp.Event:
        """Ask on a logged-in connection if any, else on a short anonymous one."""
        links = list(self._links.values())
        if any(link.wire is not None and link.wire.authenticated for link in links):
            return await self._any_request(build)
        wire = await self.open_wire()
        try:
            return await wire.request(build(wire.conn), self.request_timeout)
        finally:
            wire.close()

    # -- Hub --------------------------------------------------------------

    def register(self, agent: HubEndpoint | EndpointOwner) -> None:
        """Log ``agent`` in (binding its id to its key on first use), publish its bundle,
        upload its one-time prekeys and re-send its outbox; then receive its pushes.

        Raises AuthFailedError if the id is bound to another key,
        HubUnavailableError if the hub cannot be reached.
        """
        self._start_link(agent, background=False)

    def register_in_background(self, agent: HubEndpoint | EndpointOwner) -> None:
        """Like :meth:`register`, but return at once and keep trying to log in while the
        hub is unreachable (an agent that starts before its hub). Until the login,
        ``deliver`` raises HubUnavailableError (the envelope stays in the agent's
        outbox); the first login publishes the bundle and re-sends the outbox. A
        refusal for good (``AuthFailedError``) ends the attempts and is logged."""
        self._start_link(agent, background=True)

    def _start_link(self, agent: HubEndpoint | EndpointOwner, *, background: bool) -> None:
        """Replace ``agent``'s link with a new one and start it; a link whose start
        fails is removed and closed. ``agent``: an endpoint, or (version 1) an Agent."""
        agent = endpoint_of(agent)
        io = self._thread()
        agent_id = agent.agent_id
        self.unregister(agent_id)
        link = _Link(self, agent, io.loop)
        with self._lock:
            self._links[agent_id] = link
        try:
            io.run(
                link.start(background=background),
                self.connect_timeout + 2 * self.request_timeout,
            )
        except BaseException:
            with self._lock:
                if self._links.get(agent_id) is link:
                    del self._links[agent_id]
            with contextlib.suppress(Exception):
                io.run(link.close(), self.request_timeout)
            raise

    def unregister(self, agent_id: str) -> None:
        """Close ``agent_id``'s connection; the hub keeps its binding and mailbox."""
        with self._lock:
            link = self._links.pop(agent_id, None)
            io = self._io
        if link is not None and io is not None:
            with contextlib.suppress(HubUnavailableError):
                io.run(link.close(), self.request_timeout)
            link.join(self.request_timeout)

    def deliver(self, envelope: bytes) -> None:
        """Send ``envelope`` on its sender's connection; return after the hub committed it.

        Then calls ``endpoint.envelope_acked(message_id)``. Raises
        ``ValueError("Peer 'x' not found on hub")`` for an unknown recipient,
        MailboxFullError, HubError for other refusals, and HubUnavailableError
        when not connected or without an acknowledgement within ``ack_timeout``
        (the agent keeps the envelope in its outbox; it is re-sent after the
        next reconnect).
        """
        parsed = decode_envelope(envelope)
        link = self._link(parsed.sender)
        message_id = self._thread().run(link.send(envelope, parsed), self.ack_timeout + 1.0)
        link.endpoint.envelope_acked(message_id)

    def submit(self, envelope: bytes) -> None:
        """Pipelined :meth:`deliver`: queue ``envelope`` on its sender's connection, don't wait.

        Returns once the envelope is queued for the connection (the I/O thread
        writes it right away); the hub's SEND_ACK later calls
        ``endpoint.envelopes_acked`` (or ``envelope_acked``). Envelopes of one
        sender are sent in call order. While ``send_window`` of them await an
        ack this blocks (at most ``ack_timeout``, then HubUnavailableError).
        Raises HubUnavailableError if the agent's link failed or closed. While
        disconnected it returns at once: the envelope must already be in the
        agent's outbox, which the next login re-sends. A refusal by the hub is
        logged and the envelope left in the outbox; ``rate_limited`` is retried.
        """
        parsed = decode_envelope(envelope)
        link = self._link(parsed.sender)
        if self._io is not None and threading.current_thread() is self._io._thread:
            raise LocalProtocolError("NetworkHub methods must not be called from its I/O thread")
        link.submit(envelope, parsed)

    def wait_acked(self, agent_id: str, timeout: float | None = None) -> bool:
        """Wait until none of ``agent_id``'s submitted envelopes awaits an answer.

        True when every one was acknowledged, refused, or handed back to the
        outbox by a lost connection; False if ``timeout`` seconds passed first.
        """
        link = self._links.get(agent_id)
        return True if link is None else link.wait_idle(timeout)

    def fetch_prekey_bundle(self, agent_id: str) -> bytes:
        """The peer's bundle with one-time prekeys (each handed out once).

        Needs a registered agent (the request is rate-limited per login).
        Raises ``ValueError("Peer 'x' not found on hub")``.
        """
        event = self._thread().run(
            self._any_request(lambda conn: conn.fetch_bundle(agent_id)),
            self.request_timeout + 1.0,
        )
        if isinstance(event, hp.ErrorReceived) and event.code == "not_found":
            raise PeerNotFoundError(agent_id)
        bundle = _expect(event, hp.BundleReceived).bundle
        try:
            if PrekeyBundle.decode(bundle).agent_id != agent_id:
                raise HubError(
                    "bad_bundle", f"the hub returned another agent's bundle for {agent_id!r}"
                )
        except DecodeError as exc:
            raise HubError("bad_bundle", f"the hub returned an unreadable bundle: {exc}") from exc
        return bundle

    def get_bundle(self, agent_id: str) -> dict[str, Any]:
        """Version 1: the peer's public bundle as a JSON-safe dict."""
        return PrekeyBundle.decode(self.fetch_prekey_bundle(agent_id)).to_dict()

    def list_agents(self) -> list[str]:
        """Every agent id bound on the hub (works without a registered agent)."""
        event = self._thread().run(
            self._anonymous_request(lambda conn: conn.list_agents()), self.request_timeout + 1.0
        )
        return list(_expect(event, hp.AgentsReceived).agent_ids)

    def stats(self) -> dict[str, int]:
        """The hub's counters (``queued``, ``agents``, ``connections``, ...)."""
        event = self._thread().run(
            self._anonymous_request(lambda conn: conn.get_stats()), self.request_timeout + 1.0
        )
        return dict(_expect(event, hp.StatsReceived).stats)

    def queued_count(self) -> int:
        """Envelopes queued on the hub, not yet acknowledged by their recipients."""
        return self.stats().get("queued", 0)

    def message_count(self) -> int:
        """Version 1's name for :meth:`queued_count` on a network hub: the hub server
        keeps no count of messages routed across its restarts, so this is the
        envelopes it holds now. (``LocalHub.message_count`` counts messages routed.)"""
        return self.queued_count()

    def rotate_key(
        self,
        agent_id: str,
        new_signing_key: bytes,
        sign_old: Callable[[bytes], bytes],
        sign_new: Callable[[bytes], bytes],
    ) -> None:
        """Rebind ``agent_id`` on the hub to ``new_signing_key``.

        ``sign_old``/``sign_new`` sign the rotation challenge with the current
        and the new identity key. Afterwards the agent must log in with the
        new key (re-register) and publish a bundle made with it.
        """
        link = self._link(agent_id)
        old_key = link.endpoint.signing_public_key

        async def rotate() -> hp.Event:
            wire = link.wire
            if wire is None or not wire.authenticated:
                raise HubUnavailableError("not connected to the hub")
            challenge = wire.conn.rotation_challenge(old_key, new_signing_key)
            old_sig = await link._call(sign_old, challenge)
            new_sig = await link._call(sign_new, challenge)
            return await link.request(
                lambda conn: conn.rotate_key(new_signing_key, old_sig, new_sig)
            )

        event = self._thread().run(rotate(), self.request_timeout + 1.0)
        _expect(event, hp.RequestSucceeded)

    def refresh_prekeys(self, agent: HubEndpoint | EndpointOwner) -> None:
        """Publish ``agent``'s current bundle and upload its new one-time prekeys.

        Called by ``Agent`` (possibly while it holds its own lock) after it
        rotated or topped up its prekeys. Reads the agent synchronously, then
        uploads in the background without waiting, so it never blocks on the
        network nor on the agent. Failures are logged; everything is uploaded
        again after the next login anyway.
        """
        agent = endpoint_of(agent)
        link = self._links.get(agent.agent_id)
        if link is None or self._io is None:
            return
        bundle, prekeys = agent.prekey_bundle_bytes(), agent.one_time_prekeys()
        self._io.submit(link.upload(bundle, prekeys))

    def close(self) -> None:
        """Close every connection and stop the I/O thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            agent_ids = list(self._links)
        for agent_id in agent_ids:
            self.unregister(agent_id)
        with self._lock:
            self._closed = True
            io, self._io = self._io, None
        if io is not None:
            io.stop()

    def __enter__(self) -> NetworkHub:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
