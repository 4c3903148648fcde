"""The network hub client: :class:`NetworkHub`, a :class:`~agentmesh.protocol.hub_interface.Hub`
over TCP/TLS, a thin driver over the sans-I/O
:class:`~agentmesh.protocol.client_session.ClientSession`.

The split
    The session (``agentmesh.protocol.client_session``) decides everything: the
    login order, the send window, the outstanding requests, ACK batching,
    prekey-upload de-duplication, ``rate_limited`` retries, the keepalive and the
    verdict on each received envelope. This module only does what it is told:
    it dials (:meth:`NetworkHub._dial`), feeds the bytes it reads to the session
    and writes what the session returns, arms the one timer the session asks
    for, calls the endpoint (the agent, through
    :class:`~agentmesh.protocol.hub_interface.HubEndpoint`) for the session's
    effects and hands the results back, and maps failures to exceptions.

Threads and tasks
    Every connection of one hub runs on one asyncio event loop, which a *loop
    runner* (:mod:`agentmesh.hub.runner`) provides: for ``NetworkHub`` a
    background I/O thread of its own (``agentmesh-hub-client``, started lazily,
    never per call); for :class:`~agentmesh.hub.async_client.AsyncNetworkHub`
    the caller's loop. Each registered agent has its own authenticated
    connection (a ``_Link``) with two tasks on that loop, ``agentmesh-link-<id>``
    (connect, log in, reconnect with backoff) and ``agentmesh-effects-<id>``
    (answers the session's endpoint effects), and three threads: the *endpoint*
    thread (``agentmesh-endpoint-<id>``), which makes the endpoint calls the
    session asks for (signing the login, reading prekeys and the outbox,
    recording acknowledgements) one at a time, in order, so the loop never
    runs the endpoint nor waits for a shared executor; the *dispatcher* thread
    (``agentmesh-dispatch-<id>``), which hands pushed envelopes to the endpoint
    (decrypt, commit, fsync) in the order the hub pushed them and reports the
    outcomes to the session (which batches the ACKs); and the *handler* thread
    (``agentmesh-handlers-<id>``), which runs the endpoint's handlers, so a
    handler that waits for a reply does not stop the reply from being received.
    ``unregister``/``close`` end all of them and wait for the threads.

Locks
    ``NetworkHub._lock`` guards the links and the loop runner. Each link's
    ``_lock`` (a Condition) guards its session and is held only while calling
    the session (pure computation): never while writing to a socket, calling
    the endpoint or taking another lock. Callers of :meth:`NetworkHub.submit`
    wait on it for room in the send window. Order: ``NetworkHub._lock`` is never
    held while a link's lock is taken.

Reconnect
    After a lost connection the link retries with :func:`backoff` (exponential,
    full jitter, capped) while :func:`is_retryable` says so, always in this
    order: cancel the keepalive timer -> connect -> LOGIN (publishing the bundle)
    -> upload one-time prekeys -> re-send the agent's outbox
    (``endpoint.unacked_envelopes()``) -> send what was submitted meanwhile ->
    resume dispatching pushes.

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
import collections
import contextlib
import logging
import os
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
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
    LocalProtocolError,
    MailboxFullError,
    PeerNotFoundError,
)
from agentmesh.hub.runner import IOThread, LoopRunner
from agentmesh.protocol import client_session as cs
from agentmesh.protocol import hub_protocol as hp
from agentmesh.protocol.client_session import RETRYABLE_CODES, ClientSession, Verdict, backoff
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

__all__ = ["DEFAULT_PORT", "RETRYABLE_CODES", "NetworkHub", "backoff", "hub_error", "is_retryable"]

logger = logging.getLogger("agentmesh.hub.client")

_T = TypeVar("_T")
DEFAULT_PORT = 7700
_AUTH_CODES = frozenset(
    {
        "identity_mismatch",
        "bad_signature",
        "unknown_agent",
        "wrong_hub",
        "channel_binding_mismatch",
    }
)
#: Kept for callers of the old name (tests split prekeys with it).
_chunk_prekeys = cs.chunk_prekeys


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


def _dial_list(
    host: str | None, port: int, servers: Sequence[str] | None
) -> tuple[tuple[str, int], ...]:
    """The ``(host, port)`` pairs to dial: ``host, port``, or each ``"HOST:PORT"`` of
    ``servers`` (``[IPv6]:PORT`` for IPv6), in order. Raises ValueError, saying why."""
    if servers is None:
        if not isinstance(host, str) or not host:
            raise ValueError("NetworkHub needs a host (or servers=['host1:7700', ...])")
        return ((host, port),)
    if host is not None:
        raise ValueError("give NetworkHub either host, port or servers=[...], not both")
    if isinstance(servers, (str, bytes)) or not isinstance(servers, Sequence):
        raise ValueError(f"servers must be a list of 'HOST:PORT' strings, not {servers!r}")
    if not servers:
        raise ValueError("servers must name at least one hub ('HOST:PORT')")
    found: list[tuple[str, int]] = []
    for item in servers:
        if not isinstance(item, str):
            raise ValueError(f"servers: {item!r} is not a 'HOST:PORT' string")
        try:
            canonical = hp.parse_hub_address(item.strip())
        except ValueError as exc:
            raise ValueError(f"servers: {exc} (use 'HOST:PORT')") from None
        name, _, port_text = canonical.rpartition(":")
        pair = (name[1:-1] if name.startswith("[") else name, int(port_text))
        if pair in found:
            raise ValueError(f"servers: {item!r} is listed twice")
        found.append(pair)
    return tuple(found)


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


def _checked_bundle(agent_id: str, event: hp.Event) -> bytes:
    """The bundle a FETCH_BUNDLE for ``agent_id`` answered, checked to be that agent's."""
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


def _expect(event: hp.Event, kind: type[_T], recipient: str | None = None) -> _T:
    if isinstance(event, kind):
        return event
    if isinstance(event, hp.ErrorReceived):
        raise hub_error(event.code, event.text, recipient)
    raise HubError("protocol", f"unexpected answer {type(event).__name__}")


# --- one connection --------------------------------------------------------


class _Transport(asyncio.Protocol):
    """One TCP/TLS connection of a driver: forwards what happens to it (loop thread)."""

    def __init__(self, driver: _SessionDriver) -> None:
        self.driver = driver
        self.transport: asyncio.Transport | None = None
        #: Resolves with the close reason (the fatal ERROR's code, or None) when lost.
        self.lost: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        binding = b""
        # Called after the TLS handshake: the certificate is the one just verified.
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            certificate = ssl_object.getpeercert(binary_form=True)
            if certificate:
                binding = hp.tls_server_end_point(certificate)
        self.driver.made(self, binding)

    def data_received(self, data: bytes) -> None:
        self.driver.received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.driver.lost(self, exc)

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.lost.done()

    def write(self, data: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        if close:
            transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self) -> None:
        """Any thread, once the loop is closed (close() needs the loop): end the
        connection at the socket, so the hub sees it go."""
        sock = None if self.transport is None else self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _SessionDriver:
    """Drives one :class:`ClientSession` over its successive connections (loop thread,
    except where a method says otherwise). Anonymous sessions use it as is; a
    registered agent's :class:`_Link` adds the endpoint."""

    def __init__(self, hub: NetworkHub, session: ClientSession, loop: asyncio.AbstractEventLoop):
        self.hub = hub
        self.session = session
        self.loop = loop
        #: Guards ``session`` and ``_write_pending``; see the module docstring.
        self._lock = threading.Condition()
        self.transport: _Transport | None = None
        self.close_reason: str | None = None
        self._hello: asyncio.Future[None] | None = None
        self._waiters: dict[int, asyncio.Future[hp.Event]] = {}
        self._write_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    @property
    def authenticated(self) -> bool:
        """Logged in on a connection that is still open (requests may be made)."""
        transport = self.transport
        return transport is not None and transport.open and self.session.authenticated

    # -- transport callbacks ----------------------------------------------

    def made(self, transport: _Transport, channel_binding: bytes) -> None:
        if transport is not self.transport:
            return
        with self._lock:
            closed = self.session.phase is cs.Phase.CLOSED
            if not closed:
                self.session.connected(channel_binding)
        if closed:  # closed while dialling
            transport.close()

    def received(self, transport: _Transport, data: bytes) -> None:
        if transport is self.transport:
            self.call(self.session.receive_data, data)

    def lost(self, transport: _Transport, exc: Exception | None) -> None:
        if transport is not self.transport:
            if not transport.lost.done():
                transport.lost.set_result(None)
            return
        reason = self.close_reason
        with self._lock:
            self.session.connection_lost()
            self._lock.notify_all()  # submitters: the window has room again
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None
        error = HubUnavailableError(f"connection to the hub lost ({reason or exc or 'closed'})")
        self._fail(error)
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()
        if not transport.lost.done():
            transport.lost.set_result(reason)
        self.disconnected()

    def disconnected(self) -> None:
        """Hook: the current connection is gone (the session has forgotten it)."""

    def _fail(self, error: BaseException) -> None:
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(error)
            self._hello.exception()  # mark retrieved: open() may have stopped waiting

    # -- calling the session ----------------------------------------------

    def call(self, method: Callable[..., list[cs.Effect]], *args: Any) -> None:
        """Call a session method, write what it queued, then apply its effects."""
        transport = self.transport
        with self._lock:
            before = self.session.in_flight
            effects = method(*args)
            data = self.session.data_to_send()
            close = self.session.closed_by_protocol
            if self.session.in_flight < before:
                self._lock.notify_all()  # submitters: the window has room again
        if transport is not None:
            transport.write(data, close)
        for effect in effects:
            self.apply(effect)
        self._arm_timer()

    def flush_soon(self) -> None:
        """Any thread, lock held: write what the session queued, in the loop's next turn
        (one write for everything queued until then)."""
        if not self._write_pending:
            self._write_pending = True
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        transport = self.transport
        with self._lock:
            self._write_pending = False
            data = self.session.data_to_send()
            close = self.session.closed_by_protocol
        if transport is not None:
            transport.write(data, close)

    def _arm_timer(self) -> None:
        with self._lock:
            due = self.session.next_timer()
        if due == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = None if due is None else self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        self.call(self.session.handle_timer)

    def apply(self, effect: cs.Effect) -> None:
        """Act on one effect of the session (subclasses extend it)."""
        if isinstance(effect, cs.Answer):
            future = self._waiters.pop(effect.token, None)
            if future is not None and not future.done():
                future.set_result(effect.event)
        elif isinstance(effect, cs.Greeted):
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(None)
        elif isinstance(effect, cs.ConnectionClosed):
            self.close_reason = effect.code
            log = logger.info if effect.code == "shutting_down" else logger.warning
            log("hub connection closed: %r %r", effect.code, effect.detail)
            if effect.hello_refused:
                # Not a hub this client may log in to: open() raises why (not retried),
                # rather than "connection lost", which would be retried for ever.
                self._fail(hub_error(effect.code, effect.detail))
        elif isinstance(effect, cs.Refused):
            _log_refused(self.session.agent_id, effect)
        elif isinstance(effect, cs.Unresponsive):
            logger.warning(
                "%s: hub silent for %.0fs; reconnecting", self.session.agent_id, effect.silent
            )
            if self.transport is not None:
                self.transport.abort()

    # -- connecting and asking --------------------------------------------

    async def open(self) -> _Transport:
        """Connect and wait for HELLO. Raises HubUnavailableError, or AuthFailedError
        (``wrong_hub``) / HubError (``unsupported_version``) for a hub this client must
        not log in to."""
        hub = self.hub
        transport = self.transport = _Transport(self)
        self.close_reason = None
        hello = self._hello = self.loop.create_future()
        try:
            host, port = await hub._dial(lambda: transport, self.session)
        except BaseException:
            transport.close()
            raise
        # Connected: now the hub must speak first. Anything else (a database, a web
        # server, a TLS hub reached in plaintext) fails here, within connect_timeout.
        where = f"{host}:{port}"
        hint = (
            "is it an AgentMesh hub, and does it use TLS?"
            if hub._tls is not False
            else "is it an AgentMesh hub? A hub started with --tls-cert needs tls= here"
        )
        try:
            await asyncio.wait_for(asyncio.shield(hello), hub.connect_timeout)
        except asyncio.TimeoutError as exc:
            transport.close()
            raise HubUnavailableError(
                f"{where} accepted the connection but sent no AgentMesh HELLO within "
                f"{hub.connect_timeout} s: {hint}"
            ) from exc
        except HubUnavailableError as exc:
            transport.close()
            raise HubUnavailableError(
                f"{where} closed the connection before any AgentMesh HELLO ({exc}): {hint}"
            ) from exc
        except BaseException:
            transport.close()
            raise
        return transport

    async def request(self, make: Callable[[ClientSession], int], timeout: float) -> hp.Event:
        """Make one request (``make`` returns its token) and wait for its answer.

        Raises HubUnavailableError if not connected, if the connection drops or
        if no answer arrives within ``timeout`` seconds.
        """
        transport = self.transport
        if transport is None or not transport.open:
            raise HubUnavailableError("not connected to the hub")
        try:
            with self._lock:
                token = make(self.session)
        except LocalProtocolError:
            raise HubUnavailableError("not connected to the hub") from None
        future: asyncio.Future[hp.Event] = self.loop.create_future()
        self._waiters[token] = future
        self._flush()
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise HubUnavailableError(f"no answer from the hub within {timeout}s") from None
        finally:
            if self._waiters.pop(token, None) is not None:
                with self._lock:
                    self.session.abandon(token)

    def close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _log_refused(agent_id: str | None, effect: cs.Refused) -> None:
    if effect.what == "envelope":
        logger.warning(
            "%s: the hub refused envelope %s (%r)",
            agent_id,
            effect.message_id.hex(),
            effect.code,
        )
    elif effect.what == "outbox":
        logger.warning(
            "%s: outbox envelope %s refused by the hub: %r %r",
            agent_id,
            effect.message_id.hex(),
            effect.code,
            effect.text,
        )
    elif effect.what == "prekeys":
        logger.warning("%s: uploading prekeys failed: %r %r", agent_id, effect.code, effect.text)
    else:
        logger.warning("hub error: %r %r", effect.code, effect.text)


# --- one registered agent --------------------------------------------------

_STOP = object()
#: Queued to the dispatcher after each login: run handlers for already-committed messages.
_DISPATCH = object()
#: Run the endpoint's handlers at least this often while pushes keep arriving.
_DISPATCH_EVERY = 64
#: At most this many queued pushes go to ``endpoint.receive_envelopes`` (one commit).
_RECEIVE_BATCH = 128
#: Effects answered by calling the endpoint (in the link's effect task, in order).
_ENDPOINT_EFFECTS = (
    cs.NeedLoginSignature,
    cs.NeedPrekeys,
    cs.PrekeysStored,
    cs.NeedOutbox,
    cs.OutboxFlushed,
    cs.AckResolved,
    cs.PrekeysLow,
    cs.Refused,
)


class _BatchFailed(Exception):
    """A whole batch failed (logged once): every envelope of it is left on the hub."""


def _settle(future: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    """Loop thread: complete ``future`` unless its waiter gave up (cancelled it)."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _EndpointThread:
    """A link's thread (``agentmesh-endpoint-<id>``) for the endpoint calls its
    session asks for: signing the login, reading prekeys and the outbox, recording
    acknowledgements. The loop hands it one call at a time and awaits the outcome,
    so the loop never runs the endpoint (decrypting, fsync) and never waits for an
    executor that threads blocked on the loop could be filling up."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._jobs: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]] | None
        ] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def call(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Loop thread: run ``fn(*args)`` on this thread; the future has its outcome.
        Cancelling the future does not stop a call that has started."""
        future: asyncio.Future[_T] = self.loop.create_future()
        self._jobs.put((fn, args, future))
        return future

    def stop(self) -> None:
        """Any thread: end after the call in progress, if any (the rest are dropped)."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, future = job
            result: object = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting task, which raises it
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self.loop.call_soon_threadsafe(_settle, future, result, error)


class _Link(_SessionDriver):
    """One registered agent: its session and connection (re-made after losses), the
    task that answers the session's endpoint effects (``agentmesh-effects-<id>``,
    through the endpoint thread ``agentmesh-endpoint-<id>``), its supervisor task
    (``agentmesh-link-<id>``: connect, log in, reconnect with backoff), its
    dispatcher thread (hands pushes to the endpoint) and its handler thread (runs
    the endpoint's handlers)."""

    def __init__(self, hub: NetworkHub, endpoint: HubEndpoint, loop: asyncio.AbstractEventLoop):
        session = ClientSession(
            endpoint.agent_id,
            endpoint.signing_public_key,
            send_window=hub.send_window,
            ping_interval=hub.ping_interval,
            ack_timeout=hub.ack_timeout,
            max_frame_size=hub.max_frame_size,
            expected_hub_address=hub.expected_hub_address,
            dialled_address=hub.dialled_address,
            stored_prekeys=hub.stored_prekeys.setdefault(endpoint.agent_id, set()),
            ephemeral=is_ephemeral(endpoint),
            retry_delays=hub.make_backoff,
            clock=loop.time,
        )
        super().__init__(hub, session, loop)
        self.endpoint = endpoint
        self.agent_id = endpoint.agent_id
        #: Set while the session is ready (logged in and flushed).
        self.connected = asyncio.Event()
        self.failure: BaseException | None = None
        self.closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._effects: collections.deque[cs.Effect] = collections.deque()
        self._effects_due = asyncio.Event()
        self._effect_task: asyncio.Task[None] | None = None
        self._endpoint_thread = _EndpointThread(f"agentmesh-endpoint-{self.agent_id}", loop)
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

    @property
    def envelope_limit(self) -> int | None:
        return self.session.envelope_limit

    # -- lifecycle (loop thread) ------------------------------------------

    async def start(self, *, background: bool = False) -> None:
        """Connect and log in once; raise if that fails (no background retry then).

        ``background``: return at once and keep trying to log in (with the
        reconnect backoff) until it works or the hub refuses for good.
        """
        self._endpoint_thread.thread.start()
        self._dispatcher.start()
        self._handler_thread.start()
        self._effect_task = self.loop.create_task(
            self._run_effects(), name=f"agentmesh-effects-{self.agent_id}"
        )
        first: asyncio.Future[None] = self.loop.create_future()
        if background:
            first.set_result(None)  # nobody waits for the first login
        self._supervisor = self.loop.create_task(
            self._supervise(first), name=f"agentmesh-link-{self.agent_id}"
        )
        await first

    async def close(self) -> None:
        """Loop thread: :meth:`close_now` as a coroutine (for ``LoopRunner.run``)."""
        self.close_now()

    def close_now(self) -> None:
        """Loop thread, or any thread once the loop is closed: stop the tasks and the
        threads, write the pending ACKs and close the connection. Waits for nothing."""
        self.stop_threads()
        loop_closed = self.loop.is_closed()
        if not loop_closed:  # else no task will ever run again: nothing to wake or cancel
            self.connected.set()  # wake senders waiting for a reconnect
            for task in (self._supervisor, self._effect_task):
                if task is not None:
                    task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        transport = self.transport
        with self._lock:
            self.session.close()  # gives the window back; pending ACKs still go out
            data = self.session.data_to_send()
            self._lock.notify_all()  # wake pipelined senders waiting for room
        if transport is None:
            return
        if loop_closed:
            transport.shutdown()  # no loop to run the close: the hub sees EOF now
        else:
            transport.write(data, close=True)

    def stop_threads(self) -> None:
        """Any thread: tell the dispatcher, handler and endpoint threads to end."""
        if not self.closing:
            self.failure = HubUnavailableError("unregistered from this NetworkHub")
        self.closing = True
        self._endpoint_thread.stop()
        self._inbox.put(_STOP)
        self._dispatching.set()
        self._handlers_due.set()

    def _threads(self) -> list[threading.Thread]:
        return [self._dispatcher, self._handler_thread, self._endpoint_thread.thread]

    def join(self, timeout: float) -> None:
        """Wait for the dispatcher, handler and endpoint threads to finish what they
        are doing (never for the calling thread itself)."""
        for thread in self._threads():
            if thread.is_alive() and threading.current_thread() is not thread:
                thread.join(timeout)

    async def ajoin(self, timeout: float) -> None:
        """Loop thread: :meth:`join` without blocking the loop (it polls: the threads
        end as soon as the call they are in returns)."""
        deadline = self.loop.time() + timeout
        for thread in self._threads():
            while thread.is_alive() and self.loop.time() < deadline:
                await asyncio.sleep(0.005)

    async def _supervise(self, first: asyncio.Future[None]) -> None:
        delays = self.hub.make_backoff()
        while not self.closing:
            try:
                transport = await self._connect()
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
                    with self._lock:
                        self._lock.notify_all()
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
            reason = await transport.lost
            if self.closing:
                return
            if reason == "replaced":
                logger.error("%s: another connection logged in as this agent", self.agent_id)
                self.failure = HubError("replaced", "another connection logged in as this agent")
                self.connected.set()
                with self._lock:
                    self._lock.notify_all()
                return
            delay = next(delays)
            logger.warning("%s: connection lost; reconnecting in %.2fs", self.agent_id, delay)
            await asyncio.sleep(delay)

    def disconnected(self) -> None:
        # Order matters: the session forgot the connection (and its keepalive timer);
        # stop dispatching before anything reconnects. After close() the threads must
        # see their stop signal instead.
        if self.closing:
            return
        self.connected.clear()
        self._dispatching.clear()

    def _fail(self, error: BaseException) -> None:
        super()._fail(error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # mark retrieved: _connect may have stopped waiting

    async def _connect(self) -> _Transport:
        """Connect, then let the session log in, upload and flush; return once ready."""
        hub = self.hub
        ready = self._ready = self.loop.create_future()
        transport = await self.open()
        try:
            await asyncio.wait_for(asyncio.shield(ready), hub.ack_timeout + 2 * hub.request_timeout)
        except asyncio.TimeoutError:
            transport.close()
            raise HubUnavailableError("the hub did not complete the login in time") from None
        except BaseException:
            transport.close()
            raise
        return transport

    def apply(self, effect: cs.Effect) -> None:
        if isinstance(effect, cs.DeliverEnvelopes):
            for item in effect.items:
                self._inbox.put(item)
        elif isinstance(effect, _ENDPOINT_EFFECTS):
            if isinstance(effect, cs.Refused):
                _log_refused(self.agent_id, effect)
                if not effect.report or not supports(self.endpoint, RefusalAwareEndpoint):
                    return
            self._effects.append(effect)
            self._effects_due.set()
        elif isinstance(effect, cs.SessionReady):
            self.connected.set()
            self._inbox.put(_DISPATCH)
            self._dispatching.set()
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            logger.info("%s: logged in to the hub", self.agent_id)
        elif isinstance(effect, cs.LoginFailed):
            self._fail(hub_error(effect.code, effect.text))
            if self.transport is not None:
                self.transport.close()
        else:
            super().apply(effect)

    # -- calling the endpoint for the session (the effect task) ------------

    async def _run_effects(self) -> None:
        """Answer the session's endpoint effects one at a time, in order. Consecutive
        acknowledgements are recorded together (one call, one outbox write)."""
        while True:
            await self._effects_due.wait()
            self._effects_due.clear()
            while self._effects:
                effect = self._effects.popleft()
                if isinstance(effect, cs.AckResolved):
                    ids, slots = list(effect.message_ids), effect.window_slots
                    while self._effects and isinstance(self._effects[0], cs.AckResolved):
                        more = self._effects.popleft()
                        assert isinstance(more, cs.AckResolved)
                        ids += more.message_ids
                        slots += more.window_slots
                    await self._record_acks(ids, slots)
                    continue
                try:
                    await self._answer(effect)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if getattr(effect, "generation", None) == self.session.generation:
                        self._fail(exc)  # a login step: this connection cannot go on
                        self.close_transport()
                    else:
                        logger.warning("%s: %s failed: %s", self.agent_id, effect, exc)

    async def _answer(self, effect: cs.Effect) -> None:
        endpoint = self.endpoint
        if isinstance(effect, cs.NeedLoginSignature):
            signature = await self._in_executor(endpoint.sign_login, effect.challenge)
            bundle = await self._in_executor(endpoint.prekey_bundle_bytes)
            self.call(self.session.login, effect.generation, signature, bundle)
        elif isinstance(effect, cs.NeedPrekeys):
            prekeys = await self._in_executor(endpoint.one_time_prekeys)
            self.call(self.session.upload_prekeys, effect.generation, prekeys)
        elif isinstance(effect, cs.PrekeysStored):
            await self._in_executor(endpoint.one_time_prekeys_uploaded, list(effect.encoded))
        elif isinstance(effect, cs.NeedOutbox):
            outbox = await self._in_executor(endpoint.unacked_envelopes)
            self.call(self.session.outbox, effect.generation, outbox)
        elif isinstance(effect, cs.OutboxFlushed):
            if effect.acked:
                await self._in_executor(self._acked, list(effect.acked))
            if effect.sent:
                logger.info("%s: re-sent %d outbox envelopes", self.agent_id, effect.sent)
            self.call(self.session.outbox_recorded, effect.generation)
        elif isinstance(effect, cs.Refused):
            await self._refused(effect)
        elif isinstance(effect, cs.PrekeysLow):
            try:
                await self._in_executor(endpoint.prekeys_low, effect.remaining)
                bundle = await self._in_executor(endpoint.prekey_bundle_bytes)
                prekeys = await self._in_executor(endpoint.one_time_prekeys)
            except Exception as exc:
                logger.warning("%s: topping up prekeys failed: %s", self.agent_id, exc)
                return
            self.call(self.session.publish, bundle, prekeys)

    async def _refused(self, effect: cs.Refused) -> None:
        """Tell the endpoint the hub refused an outbox envelope (it may dead-letter it)."""
        endpoint = self.endpoint
        if not supports(endpoint, RefusalAwareEndpoint):
            return
        error = hub_error(effect.code, effect.text, effect.recipient or None)
        try:
            await self._in_executor(endpoint.envelope_refused, effect.message_id, error)
        except Exception:
            logger.exception("%s: recording a refusal failed", self.agent_id)

    async def _record_acks(self, message_ids: list[bytes], window_slots: int) -> None:
        try:
            await self._in_executor(self._acked, message_ids)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "%s: recording %d acknowledgements failed", self.agent_id, len(message_ids)
            )
        finally:
            with self._lock:
                self.session.acks_recorded(window_slots)
                self._lock.notify_all()

    def _acked(self, message_ids: list[bytes]) -> None:
        """Executor thread: drop acknowledged envelopes from the endpoint's outbox."""
        if supports(self.endpoint, BatchEndpoint):
            self.endpoint.envelopes_acked(message_ids)
        else:
            for message_id in message_ids:
                self.endpoint.envelope_acked(message_id)

    async def _in_executor(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the link's endpoint thread (never the loop's executor)."""
        return await self._endpoint_thread.call(fn, *args)

    def upload(self, bundle: bytes, prekeys: list[bytes]) -> None:
        """Publish ``bundle`` and upload ``prekeys`` on the current connection, if any
        (refusals are logged)."""
        if not self.closing:
            self.call(self.session.publish, bundle, prekeys)

    # -- sending ----------------------------------------------------------

    async def send(self, data: bytes, envelope: Envelope) -> bytes:
        """SEND and wait for the ack (``ack_timeout`` in all); return the message id.

        Raises HubUnavailableError at once while disconnected: the envelope is
        in the agent's outbox, and the next login re-sends it. Only while a
        login is re-sending the outbox (which it read before this envelope was
        added) does it wait for the connection instead. ``rate_limited`` is
        retried by the session until the deadline.
        """
        deadline = self.loop.time() + self.hub.ack_timeout
        with self._lock:
            flushing = self.session.flushing
        if not self.connected.is_set() and not flushing:
            raise HubUnavailableError("not connected to the hub; the envelope stays in the outbox")
        try:
            await asyncio.wait_for(self.connected.wait(), self.hub.ack_timeout)
        except asyncio.TimeoutError:
            raise HubUnavailableError("not connected to the hub") from None
        if self.failure is not None:
            raise HubUnavailableError(f"disconnected from the hub: {self.failure}")
        message_id = envelope.message_id
        event = await self.request(
            lambda session: session.send(data, message_id, deadline),
            max(0.0, deadline - self.loop.time()),
        )
        _expect(event, hp.SendAcknowledged, envelope.recipient)
        return message_id

    def submit(self, data: bytes, envelope: Envelope) -> None:
        """Caller thread: queue a SEND without waiting for its ack (see NetworkHub.submit)."""
        window, timeout = self.hub.send_window, self.hub.ack_timeout
        session = self.session
        with self._lock:
            room = self._lock.wait_for(
                lambda: session.has_room or self.closing or self.failure is not None, timeout
            )
            if self.failure is not None:
                raise HubUnavailableError(f"disconnected from the hub: {self.failure}")
            if not room:
                raise HubUnavailableError(f"{window} envelopes unacknowledged for {timeout}s")
            effects = session.submit(data, envelope.message_id)
            try:
                self.flush_soon()
            except RuntimeError:  # the loop is gone
                raise HubUnavailableError("this NetworkHub is closed") from None
        for effect in effects:
            if isinstance(effect, cs.Refused):
                _log_refused(self.agent_id, effect)

    def wait_idle(self, timeout: float | None) -> bool:
        """Caller thread: wait until no pipelined send is unresolved; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self.session.in_flight == 0, timeout)

    # -- receiving (dispatcher and handler threads) -----------------------

    def _dispatch_forever(self) -> None:
        """Dispatcher thread: hand pushes to the endpoint in order, report the outcomes
        to the session (which batches the ACKs), let the handlers run.

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
                with self._lock:
                    verdicts = self.session.envelopes_handled(results)
                    with contextlib.suppress(RuntimeError):  # the loop is gone: no ack needed
                        self.flush_soon()
                self._log_verdicts(results, verdicts)
                self._report_unreadable(batch, results, verdicts)
                since_dispatch += len(batch)
            if follow is None and (since_dispatch >= _DISPATCH_EVERY or self._inbox.empty()):
                since_dispatch = 0
                self._handlers_due.set()  # the handler thread runs them (never waits)

    def _receive_batch(self, batch: list[hp.EnvelopePushed]) -> list[tuple[bytes, object]]:
        """Hand envelopes to the endpoint; return (message id, report or exception) each."""
        endpoint = self.endpoint
        if not supports(endpoint, BatchEndpoint) or len(batch) == 1:
            results: list[tuple[bytes, object]] = []
            for item in batch:
                try:
                    results.append((item.message_id, endpoint.receive_envelope(item.envelope)))
                except Exception as exc:
                    results.append((item.message_id, exc))
            return results
        try:
            outcomes = endpoint.receive_envelopes([item.envelope for item in batch])
        except Exception as exc:
            logger.exception("%s: receiving %d envelopes failed", self.agent_id, len(batch))
            # Left on the hub, whatever the error: redelivered after the next login.
            failed = _BatchFailed(type(exc).__name__)
            return [(item.message_id, failed) for item in batch]
        return [(item.message_id, outcome) for item, outcome in zip(batch, outcomes, strict=True)]

    def _log_verdicts(self, results: list[tuple[bytes, object]], verdicts: list[Verdict]) -> None:
        for (message_id, outcome), decided in zip(results, verdicts, strict=True):
            if decided is Verdict.HOLD:
                logger.warning(
                    "%s: holding envelope %s: %s", self.agent_id, message_id.hex(), outcome
                )
            elif decided is Verdict.DROP:
                logger.warning(
                    "%s: dropping envelope %s: %s", self.agent_id, message_id.hex(), outcome
                )
            elif isinstance(outcome, BaseException) and not isinstance(outcome, _BatchFailed):
                logger.error(
                    "%s: receiving envelope %s failed",
                    self.agent_id,
                    message_id.hex(),
                    exc_info=outcome,
                )

    def _report_unreadable(
        self,
        batch: list[hp.EnvelopePushed],
        results: list[tuple[bytes, object]],
        verdicts: list[Verdict],
    ) -> None:
        """Dispatcher thread, after the batch's acks were handed to the loop: tell the
        endpoint who sent what it refused as unreadable (the hub vouched for each
        sender: it refuses envelopes that are not from the logged-in agent)."""
        endpoint = self.endpoint
        if not supports(endpoint, NoticingEndpoint):
            return
        for item, (_, outcome), decided in zip(batch, results, verdicts, strict=True):
            if decided is not Verdict.DROP or not isinstance(outcome, CryptoError):
                continue
            try:
                sender = decode_envelope(item.envelope).sender
            except DecodeError:
                continue
            try:
                endpoint.unreadable_envelope(sender, outcome)
            except Exception:
                logger.exception("%s: reporting a refused envelope failed", self.agent_id)

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


# --- the public client -----------------------------------------------------


class NetworkHub:
    """A hub reached over the network (implements :class:`~agentmesh.protocol.hub_interface.Hub`).

    ``NetworkHub(host, port=7700, *, tls=False, ...)``, or
    ``NetworkHub(servers=["host1:7700", "host2:7700"], ...)`` for several hubs
    sharing one PostgreSQL database: connections try them in order and move to
    the next when one does not answer (docs/SCALING.md). ``tls`` is False, True
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
    thread (they raise LocalProtocolError there). Use :meth:`close` (or
    ``with``). For asyncio code, :class:`~agentmesh.hub.async_client.AsyncNetworkHub`
    runs the same connections on the caller's event loop instead.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int = DEFAULT_PORT,
        *,
        servers: Sequence[str] | None = None,
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
        #: The hubs to dial, in order (several hubs on one database; see _dial).
        self.servers = _dial_list(host, port, servers)
        self._server_index = 0
        host, port = self.servers[0]
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.request_timeout = request_timeout
        self.ping_interval = ping_interval
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.expected_hub_address = expected_hub_address
        try:
            #: The hub name this client dialled, as its logins sign it (for each server).
            self._dialled = [
                hp.format_hub_address(
                    server_hostname if tls is not False and server_hostname else server_host,
                    server_port,
                )
                for server_host, server_port in self.servers
            ]
            self.dialled_address = self._dialled[0]
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
        #: Where the connections run: made on first use (see _runner).
        self._io: LoopRunner | None = None
        self._links: dict[str, _Link] = {}
        #: One-time prekeys the hub acknowledged, by agent (each link's session updates its
        #: set under the link's lock; kept across re-registrations, see ClientSession).
        self.stored_prekeys: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        if len(self.servers) > 1:
            names = [f"{host}:{port}" for host, port in self.servers]
            return f"NetworkHub(servers={names!r}, tls={self._tls is not False})"
        return f"NetworkHub({self.host!r}, {self.port}, tls={self._tls is not False})"

    # -- plumbing ---------------------------------------------------------

    def _runner(self, call: str) -> LoopRunner:
        """The loop the connections run on, made for the first call that needs it
        (``call`` names that method, for the errors)."""
        with self._lock:
            if self._closed:
                raise LocalProtocolError(f"{type(self).__name__}.{call}(): this hub is closed")
            if self._io is None:
                self._io = self._new_runner(call)
            return self._io

    def _new_runner(self, call: str) -> LoopRunner:
        """Under ``_lock``: a runner for the first ``call``. NetworkHub: its own thread."""
        return IOThread()

    def _ssl(self) -> ssl.SSLContext | None:
        """The client TLS context (the system trust store for ``tls=True``), made on first use."""
        if isinstance(self._tls, ssl.SSLContext):
            return self._tls
        if self._tls and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def make_backoff(self) -> Iterator[float]:
        return backoff(self.reconnect_initial, self.reconnect_max)

    async def _dial(
        self, protocol: Callable[[], asyncio.Protocol], session: ClientSession
    ) -> tuple[str, int]:
        """Open the TCP (and TLS) connection to a hub for ``protocol`` (loop thread),
        within ``connect_timeout`` per hub; the only place that decides where to
        connect. Returns the ``(host, port)`` reached, having set the session's
        dialled name to that hub's (its login signs it). Raises HubUnavailableError.

        With several :attr:`servers`, tries each once, in list order starting from
        the one that answered last (so after its hub dies, the next one); raises the
        last HubUnavailableError if none answers."""
        count = len(self.servers)
        first = self._server_index
        for attempt in range(count):
            index = (first + attempt) % count
            session.dialled_address = self._dialled[index]
            try:
                await self._dial_one(protocol, *self.servers[index])
            except HubUnavailableError as exc:
                if attempt == count - 1:
                    raise
                logger.info("hub %s unavailable (%s); trying the next", self._dialled[index], exc)
                continue
            self._server_index = index
            return self.servers[index]
        raise AssertionError("unreachable")  # pragma: no cover - servers is never empty

    async def _dial_one(
        self, protocol: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> None:
        """:meth:`_dial` for one hub."""
        loop = asyncio.get_running_loop()
        context = self._ssl()
        where = f"{host}:{port}"
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    protocol,
                    host,
                    port,
                    ssl=context,
                    server_hostname=(self._server_hostname or host) if context else None,
                ),
                self.connect_timeout,
            )
        except ssl.SSLError as exc:
            raise HubUnavailableError(
                f"TLS with {where} failed ({exc.reason or exc}): is it a hub started with "
                "--tls-cert, and does the CA given to tls= sign its certificate?"
            ) from exc
        except (OSError, asyncio.TimeoutError) as exc:
            raise HubUnavailableError(
                f"cannot reach the hub at {where}: {exc or 'timeout'}"
            ) from exc

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

    async def _any_request(self, make: Callable[[ClientSession], int]) -> hp.Event:
        """Ask on a logged-in connection; raise if there is none."""
        for link in list(self._links.values()):
            if link.authenticated:
                return await link.request(make, self.request_timeout)
        if self._links:
            raise HubUnavailableError("not connected to the hub")
        raise HubError("login_required", "register an agent with this NetworkHub first")

    async def _anonymous_request(self, make: Callable[[ClientSession], int]) -> hp.Event:
        """Ask on a logged-in connection if any, else on a short anonymous one."""
        if any(link.authenticated for link in list(self._links.values())):
            return await self._any_request(make)
        session = ClientSession(
            max_frame_size=self.max_frame_size,
            expected_hub_address=self.expected_hub_address,
            dialled_address=self.dialled_address,
            clock=asyncio.get_running_loop().time,
        )
        driver = _SessionDriver(self, session, asyncio.get_running_loop())
        await driver.open()
        try:
            return await driver.request(make, self.request_timeout)
        finally:
            driver.close_transport()

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
        call = "register_in_background" if background else "register"
        io = self._runner(call)
        if io.current:
            raise io.blocked(call)
        agent_id = agent.agent_id
        self.unregister(agent_id)
        link = self._add_link(agent, io)
        try:
            io.run(link.start(background=background), self._start_timeout, call=call)
        except BaseException:
            self._drop_link(link)
            with contextlib.suppress(Exception):
                io.run(link.close(), self.request_timeout, call=call)
            link.stop_threads()
            link.join(self.request_timeout)
            raise

    @property
    def _start_timeout(self) -> float:
        return self.connect_timeout + 2 * self.request_timeout

    def _add_link(self, agent: HubEndpoint, io: LoopRunner) -> _Link:
        link = _Link(self, agent, io.loop)
        with self._lock:
            self._links[agent.agent_id] = link
        return link

    def _drop_link(self, link: _Link) -> None:
        with self._lock:
            if self._links.get(link.agent_id) is link:
                del self._links[link.agent_id]

    def unregister(self, agent_id: str) -> None:
        """Close ``agent_id``'s connection; the hub keeps its binding and mailbox."""
        with self._lock:
            link = self._links.get(agent_id)
            io = self._io
        if link is None or io is None:
            return
        if io.current:
            raise io.blocked("unregister")
        self._drop_link(link)
        try:
            io.run(link.close(), self.request_timeout, call="unregister")
        except HubUnavailableError:
            if io.loop.is_closed():
                link.close_now()  # no loop runs any more: close from here
            link.stop_threads()  # whatever happened to the loop, the threads end
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
        message_id = self._runner("deliver").run(
            link.send(envelope, parsed), self.ack_timeout + 1.0, call="deliver"
        )
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
        io = self._io
        if io is not None and io.current:
            raise io.blocked("submit")
        link.submit(envelope, parsed)

    def wait_acked(self, agent_id: str, timeout: float | None = None) -> bool:
        """Wait until none of ``agent_id``'s submitted envelopes awaits an answer.

        True when every one was acknowledged, refused, or handed back to the
        outbox by a lost connection; False if ``timeout`` seconds passed first.
        """
        link = self._links.get(agent_id)
        io = self._io
        if io is not None and io.current:
            raise io.blocked("wait_acked")
        return True if link is None else link.wait_idle(timeout)

    def fetch_prekey_bundle(self, agent_id: str) -> bytes:
        """The peer's bundle with one-time prekeys (each handed out once).

        Needs a registered agent (the request is rate-limited per login).
        Raises ``ValueError("Peer 'x' not found on hub")``.
        """
        event = self._runner("fetch_prekey_bundle").run(
            self._any_request(lambda session: session.fetch_bundle(agent_id)),
            self.request_timeout + 1.0,
            call="fetch_prekey_bundle",
        )
        return _checked_bundle(agent_id, event)

    def get_bundle(self, agent_id: str) -> dict[str, Any]:
        """Version 1: the peer's public bundle as a JSON-safe dict."""
        return PrekeyBundle.decode(self.fetch_prekey_bundle(agent_id)).to_dict()

    def list_agents(self) -> list[str]:
        """Every agent id bound on the hub (works without a registered agent)."""
        event = self._runner("list_agents").run(
            self._anonymous_request(lambda session: session.list_agents()),
            self.request_timeout + 1.0,
            call="list_agents",
        )
        return list(_expect(event, hp.AgentsReceived).agent_ids)

    def stats(self) -> dict[str, int]:
        """The hub's counters (``queued``, ``agents``, ``connections``, ...)."""
        event = self._runner("stats").run(
            self._anonymous_request(lambda session: session.get_stats()),
            self.request_timeout + 1.0,
            call="stats",
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
            try:
                with link._lock:
                    challenge = link.session.rotation_challenge(old_key, new_signing_key)
            except LocalProtocolError:
                raise HubUnavailableError("not connected to the hub") from None
            old_sig = await link._in_executor(sign_old, challenge)
            new_sig = await link._in_executor(sign_new, challenge)
            return await link.request(
                lambda session: session.rotate_key(new_signing_key, old_sig, new_sig),
                self.request_timeout,
            )

        event = self._runner("rotate_key").run(
            rotate(), self.request_timeout + 1.0, call="rotate_key"
        )
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
        io = self._io
        if link is None or io is None:
            return
        bundle, prekeys = agent.prekey_bundle_bytes(), agent.one_time_prekeys()
        with contextlib.suppress(RuntimeError):  # the loop is gone
            io.call_soon(link.upload, bundle, prekeys)

    def close(self) -> None:
        """Close every connection and stop the I/O thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            agent_ids = list(self._links)
            io = self._io
        if io is not None and io.current:
            raise io.blocked("close")
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
