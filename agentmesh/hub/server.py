"""The network hub: an asyncio server driving :class:`ServerConnection` objects.

Owns the sockets, timers and the writer thread; the protocol rules live in
:mod:`agentmesh.protocol.hub_protocol` and every SQL statement in
:class:`agentmesh.hub.store.HubStore`.

Threads
    One event-loop thread runs every connection (``asyncio.Protocol``, no
    streams). One *writer thread* owns all database work: it takes jobs from a
    queue, and every run of SEND jobs it finds waiting (up to ``batch_max``)
    becomes ONE :meth:`HubStore.enqueue` call, i.e. one transaction (group
    commit). Senders get SEND_ACK only after that commit. Recipients' ACKs
    are held (at most ``_ACK_HOLD_S``) and deleted in the transaction of the
    next SEND batch, or on their own when none comes: a delete needs no commit
    of its own. Results come back to the loop with ``call_soon_threadsafe`` in
    commit order.

Delivery
    An online recipient gets a PUSH right after the commit. On login it gets
    everything queued for it, paged from the store in ``seq`` (FIFO) order,
    with at most ``push_window`` unacknowledged pushes in flight. Whatever is
    not acknowledged stays stored and is pushed again at the next login. The
    rules are :class:`agentmesh.protocol.delivery.Delivery`, one per session.

Several hubs on one PostgreSQL (see docs/SCALING.md)
    Each hub has a ``hub_id`` (default ``HOSTNAME:PORT``). A commit notifies
    the other hubs (``m HUB AGENT``); the hub where AGENT is online pages its
    mailbox. Every ``catchup_interval_s`` each hub also checks, in one query,
    whether any of its online agents has mail past its cursor (the safety net
    for a lost notification). An agent's session is pushed to only while it
    holds the agent's lease (``agent_leases``), renewed every
    ``min(catchup_interval_s, lease_ttl_s / 3)`` and trusted locally for
    three quarters of ``lease_ttl_s`` after the renewal began. A login on
    another hub asks the holder to let go (``r HUB AGENT``); the holder closes
    its session (``replaced``) and frees the lease (``f AGENT``), and the new
    session starts receiving. If the holder is dead, the new session receives
    once the lease expires (at most ``lease_ttl_s``); it can send meanwhile. A
    hub frees the leases of its previous run when it starts.

Names
    A hub answers logins only for its own names (``hub_address``, announced
    in HELLO) and, with TLS, only for its own certificate (see
    :mod:`agentmesh.protocol.hub_protocol`). :func:`resolve_hub_names` decides
    the names: the ``hub_address`` option if given; on a loopback host the
    loopback names for the port; otherwise names derived from the machine,
    with a warning (version 1's ``NetworkHubServer("0.0.0.0")`` keeps working;
    the ``agentmesh-hub`` command refuses to start that way instead).

Limits (each answered with an ERROR frame and a log line, never a crash):
``max_envelope_bytes``, mailbox quotas (count and bytes), ``max_connections``,
``handshake_timeout_s``, ``idle_timeout_s`` (with PING after
``ping_interval_s`` of silence), a per-connection token bucket
(``rate_per_s``/``rate_burst``), and malformed frames (ERROR, then close).

Never logs keys, signatures or envelope contents; what a peer sent (an ERROR
code) is logged with ``%r``, so it cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib
import ipaddress
import logging
import os
import queue
import re
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.exc import SQLAlchemyError

from agentmesh.crypto.prekeys import compose_bundle
from agentmesh.errors import AuthFailedError, ConfigurationError, HubError
from agentmesh.hub.metrics import HubMetrics, OpsEndpoint, PrometheusHubMetrics
from agentmesh.hub.models import HUB_ID_LENGTH
from agentmesh.hub.store import (
    DB_ENV_VAR,
    DEFAULT_DB,
    EnqueueResult,
    EnqueueStatus,
    HubListener,
    HubStore,
    LeaseClaim,
    NewEnvelope,
    StoredEnvelope,
)
from agentmesh.protocol import hub_protocol as hp
from agentmesh.protocol.delivery import Delivery, PageRequest
from agentmesh.wire.frames import Error, encode_frame

logger = logging.getLogger("agentmesh.hub.server")

_T = TypeVar("_T")
#: Milliseconds since the epoch.
Clock = Callable[[], int]
DEFAULT_PORT = 7700


_HUB_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{HUB_ID_LENGTH}}}")


def default_hub_id(port: int) -> str:
    """``HOSTNAME:PORT``, with characters a hub id cannot hold replaced by ``-``."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "hub"
    return f"{host[: HUB_ID_LENGTH - 6]}:{port}"


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, kw_only=True)
class HubOptions:
    """Every tunable of the hub (keyword-only; see ``agentmesh-hub --help``).

    ``hub_address``: the names agents dial to reach this hub, ``HOST:PORT`` or
    ``HOST`` (the listening port), one string (comma-separated for several) or
    a sequence; see :func:`resolve_hub_names` for the default. TLS:
    ``tls_cert`` and ``tls_key`` (PEM files), or an ``ssl_context`` together
    with ``tls_cert``, the certificate that context serves: logins are bound to
    its SHA-256, so the hub must know it.
    """

    max_envelope_bytes: int = hp.DEFAULT_MAX_ENVELOPE_BYTES
    ttl_s: float = 7 * 24 * 3600.0
    mailbox_max_messages: int = 10_000
    mailbox_max_bytes: int = 256 * 1024 * 1024
    max_connections: int = 1024
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 120.0
    ping_interval_s: float = 30.0
    rate_per_s: float = 2000.0
    rate_burst: int = 4000
    push_window: int = 256
    batch_max: int = 1024
    purge_interval_s: float = 60.0
    prekeys_low_water: int = 20
    #: Pause reading a connection while this many bytes of its SENDs await commit.
    max_pending_send_bytes: int = 8 * 1024 * 1024
    hub_address: str | Sequence[str] | None = None
    #: Several hubs on one PostgreSQL: this hub's id (default ``HOSTNAME:PORT``),
    #: unique among them and stable across restarts.
    hub_id: str | None = None
    #: How long an agent's lease lasts unless renewed (a dead hub's, at most).
    lease_ttl_s: float = 10.0
    #: How often a hub checks its online agents' mailboxes anyway.
    catchup_interval_s: float = 2.0
    tls_cert: str | None = None
    tls_key: str | None = None
    ssl_context: ssl.SSLContext | None = None
    synchronous: str = "FULL"
    use_uvloop: bool = True
    #: Serve /metrics and /healthz on this port (0: any free port; None: not at all).
    metrics_port: int | None = None
    #: The address of the metrics port (None: the hub's own host).
    metrics_host: str | None = None
    #: Bring the database to head at start-up; if False, refuse one not at head.
    migrate: bool = True
    clock: Clock = field(default=_wall_clock_ms)

    def __post_init__(self) -> None:
        positive = {
            "max_envelope_bytes": self.max_envelope_bytes,
            "ttl_s": self.ttl_s,
            "mailbox_max_messages": self.mailbox_max_messages,
            "mailbox_max_bytes": self.mailbox_max_bytes,
            "max_connections": self.max_connections,
            "handshake_timeout_s": self.handshake_timeout_s,
            "idle_timeout_s": self.idle_timeout_s,
            "ping_interval_s": self.ping_interval_s,
            "rate_per_s": self.rate_per_s,
            "rate_burst": self.rate_burst,
            "push_window": self.push_window,
            "batch_max": self.batch_max,
            "purge_interval_s": self.purge_interval_s,
            "max_pending_send_bytes": self.max_pending_send_bytes,
            "lease_ttl_s": self.lease_ttl_s,
            "catchup_interval_s": self.catchup_interval_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigurationError(f"{name} must be positive, not {value!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 0xFFFF:
            raise ConfigurationError(f"metrics_port must be 0..65535, not {self.metrics_port!r}")
        if self.max_envelope_bytes > 0xFFFFFFFF - hp.FRAME_OVERHEAD:
            raise ConfigurationError("max_envelope_bytes is too large")
        if self.ssl_context is not None:
            if self.tls_cert is None:
                raise ConfigurationError(
                    "ssl_context needs tls_cert too (the PEM certificate it serves): "
                    "logins are bound to that certificate"
                )
        elif (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigurationError("tls_cert and tls_key must be given together")
        if self.hub_id is not None and not _HUB_ID.fullmatch(self.hub_id):
            raise ConfigurationError(
                f"hub_id {self.hub_id!r}: use 1-{HUB_ID_LENGTH} characters from A-Z a-z 0-9 . _ : -"
            )
        if self.hub_address is not None:
            try:
                hp.parse_hub_names(self.hub_address, default_port=DEFAULT_PORT)
            except ValueError as exc:
                raise ConfigurationError(f"hub_address: {exc}") from exc

    def make_ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context (from ``ssl_context`` or the cert/key files), or None."""
        if self.ssl_context is not None:
            return self.ssl_context
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load TLS certificate/key: {exc}") from exc
        return context

    def channel_binding(self) -> bytes:
        """The login channel binding of this hub: the SHA-256 of its certificate (the
        first of ``tls_cert``, as TLS sends it), or empty without TLS."""
        if self.tls_cert is None:
            return b""
        try:
            with open(self.tls_cert, "rb") as file:
                certificates = x509.load_pem_x509_certificates(file.read())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot read the TLS certificate {self.tls_cert}: {exc}"
            ) from exc
        return hp.tls_server_end_point(certificates[0].public_bytes(Encoding.DER))


class TokenBucket:
    """A token bucket; the caller passes a monotonic ``now`` (seconds)."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate, self._burst = rate, burst
        self._tokens, self._stamp = burst, now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


# --- the writer thread -----------------------------------------------------


@dataclass(slots=True)
class _SendJob:
    item: NewEnvelope
    done: Callable[[EnqueueResult | BaseException], None]
    #: Wake the other hubs (shared databases): the recipient's session is not here.
    notify: bool = True
    #: The connection the SEND came on (its ``session_id``); None: not from one.
    source: int | None = None


@dataclass(slots=True)
class _ForgetJob:
    """The connection ``source`` is gone: its later SENDs need no refusing any more."""

    source: int


class EarlierSendFailed(Exception):
    """A SEND refused, unstored, because an earlier one of its connection could not be
    stored: storing it would put it ahead of that one (the agent re-sends both, in order)."""


@dataclass(slots=True)
class _AckJob:
    recipient: str
    message_ids: tuple[bytes, ...]


@dataclass(slots=True)
class _CallJob:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


_STOP = object()
#: ACKs wait at most this long for a SEND batch to share its commit ...
_ACK_HOLD_S = 0.05
#: ... and are deleted on their own once this many are held.
_ACK_HOLD_MAX = 8192


class StoreWorker:
    """The one thread that talks to the database, with group commit.

    ``submit_send``/``submit_ack`` may be called from the loop thread only;
    completion callbacks run on the loop, in commit order.
    """

    def __init__(
        self,
        store: HubStore,
        loop: asyncio.AbstractEventLoop,
        options: HubOptions,
        metrics: HubMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or HubMetrics()
        self._loop = loop
        self._options = options
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="agentmesh-hub-writer", daemon=True)
        # Writer thread only: acknowledged envelopes waiting to be deleted.
        self._held: dict[str, list[bytes]] = {}
        self._held_count = 0
        self._held_since = 0.0
        #: The hub id commits notify the other hubs with (shared databases only).
        self.notify_from: str | None = None
        self.stopped = False
        # Writer thread only: connections whose SEND failed to commit. Their later
        # SENDs are refused unstored until the connection is gone (see _commit_sends).
        self._failed_sources: set[int] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every queued job, then end the thread (blocks until it has)."""
        self.stopped = True
        self._queue.put(_STOP)
        self._thread.join()

    def submit_send(
        self,
        item: NewEnvelope,
        done: Callable[[EnqueueResult | BaseException], None],
        notify: bool = True,
        source: int | None = None,
    ) -> None:
        """Queue a SEND for the next group commit. ``source`` names the connection it
        came on: once one of its SENDs fails to commit, every later one is refused with
        :class:`EarlierSendFailed` until :meth:`forget_source` (order, see _commit_sends)."""
        self._queue.put(_SendJob(item, done, notify, source))

    def forget_source(self, source: int) -> None:
        """The connection ``source`` closed after a failed SEND; queued after its SENDs."""
        self._queue.put(_ForgetJob(source))

    def submit_ack(self, recipient: str, message_ids: tuple[bytes, ...]) -> None:
        self.metrics.delivered(len(message_ids))
        self._queue.put(_AckJob(recipient, message_ids))

    def call(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Run ``fn`` on the writer thread, in queue order; await the returned future."""
        future: asyncio.Future[_T] = self._loop.create_future()
        self._queue.put(_CallJob(fn, future))
        return future

    # -- thread side ------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                jobs = [self._queue.get(timeout=self._ack_wait())]
            except queue.Empty:  # acks held long enough: delete them on their own
                self._flush_acks()
                continue
            while len(jobs) < self._options.batch_max:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(job is _STOP for job in jobs):
                stopping = True
                jobs = [job for job in jobs if job is not _STOP]
            self._run_batch(jobs)
        self._flush_acks()

    def _run_batch(self, jobs: list[object]) -> None:
        # SENDs are group-committed; ACKs are held and deleted in the commit of the
        # next SENDs (they need no commit of their own: a delete lost in a crash only
        # means a redelivery, which the agent drops as a duplicate). Everything
        # queued before a call is committed before it runs, in queue order.
        sends: list[_SendJob] = []
        for job in jobs:
            if isinstance(job, _SendJob):
                sends.append(job)
            elif isinstance(job, _AckJob):
                if not self._held:
                    self._held_since = time.monotonic()
                self._held.setdefault(job.recipient, []).extend(job.message_ids)
                self._held_count += len(job.message_ids)
            elif isinstance(job, _ForgetJob):
                if job.source in self._failed_sources:
                    self._commit_sends(sends)  # its SENDs queued before this one
                    sends = []
                    self._failed_sources.discard(job.source)
            else:
                assert isinstance(job, _CallJob)
                self._commit_sends(sends)
                sends = []
                self._flush_acks()
                self._call(job)
        self._commit_sends(sends)
        if self._held_count >= _ACK_HOLD_MAX:
            self._flush_acks()

    def _ack_wait(self) -> float | None:
        """How long the queue may stay idle before held ACKs are deleted on their own."""
        if not self._held:
            return None
        return max(0.0, self._held_since + _ACK_HOLD_S - time.monotonic())

    def _take_acks(self) -> dict[str, list[bytes]]:
        held, self._held, self._held_count = self._held, {}, 0
        return held

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(callback, *args)

    def _commit_sends(self, jobs: list[_SendJob]) -> None:
        # A SEND that failed to commit stays in its agent's outbox, and the agent
        # re-sends its outbox, oldest first, only when it logs in again. A later SEND
        # of the same connection stored meanwhile would reach the recipient before
        # it (issue 13). So once a connection's SEND fails, its later ones are
        # refused unstored too, and the hub closes that connection (see
        # _send_committed): the agent logs in again and re-sends them all in order.
        refused = [job for job in jobs if job.source in self._failed_sources]
        if refused:
            jobs = [job for job in jobs if job.source not in self._failed_sources]
            failure = EarlierSendFailed("an earlier envelope of this connection was not stored")
            self._post(_finish_sends, refused, [failure] * len(refused))
        if not jobs:
            return
        acks = self._take_acks()
        results: list[EnqueueResult | BaseException] = []
        started = time.perf_counter()
        for attempt in (acks, {}):
            try:
                results = list(
                    self.store.enqueue(
                        [job.item for job in jobs],
                        now_ms=self._options.clock(),
                        max_count_per_recipient=self._options.mailbox_max_messages,
                        max_bytes_per_recipient=self._options.mailbox_max_bytes,
                        acks=attempt,
                        notify_from=self.notify_from,
                        notify_for={job.item.recipient for job in jobs if job.notify},
                    )
                )
                break
            except Exception as exc:
                logger.exception("group commit of %d envelopes failed", len(jobs))
                results = [exc] * len(jobs)
                if not attempt:
                    break
                # Not the acks' fault, probably; either way they are redelivered later.
        ok = not (results and isinstance(results[0], BaseException))
        self.metrics.commit(time.perf_counter() - started, len(jobs), ok=ok)
        if not ok:
            self._failed_sources.update(job.source for job in jobs if job.source is not None)
        self._post(_finish_sends, jobs, results)

    def _flush_acks(self) -> None:
        acks = self._take_acks()
        if not acks:
            return
        try:
            # One transaction for every recipient, without an fsync: should a power cut
            # undo it, the envelopes are pushed again and the agents drop the duplicates.
            self.store.ack_many(acks, durable=False)
        except Exception:
            # Not deleted: the envelopes are pushed again and deduplicated by the agent.
            count = sum(len(ids) for ids in acks.values())
            logger.exception("deleting %d acknowledged envelopes failed", count)
            self.metrics.store_error("ack")

    def _call(self, job: _CallJob) -> None:
        try:
            result = job.fn()
        except BaseException as exc:
            self._post(_settle, job.future, None, exc)
        else:
            self._post(_settle, job.future, result, None)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _log_failure(what: str, *args: object) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback logging a future's exception (fire-and-forget database calls)."""

    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error(what, *args, exc_info=future.exception())

    return done


def _finish_sends(jobs: list[_SendJob], results: list[EnqueueResult | BaseException]) -> None:
    for job, result in zip(jobs, results, strict=True):
        job.done(result)


# --- one connection --------------------------------------------------------

#: Requests answered after a database call (SEND has its own, batched path).
_Request = (
    hp.BundleRequested
    | hp.BundlePublished
    | hp.PrekeysUploaded
    | hp.AgentsRequested
    | hp.StatsRequested
    | hp.KeyRotationRequested
)
_REQUESTS = (
    hp.BundleRequested,
    hp.BundlePublished,
    hp.PrekeysUploaded,
    hp.AgentsRequested,
    hp.StatsRequested,
    hp.KeyRotationRequested,
)


class _Session(asyncio.Protocol):
    """One client connection: a :class:`ServerConnection` plus its timers and mailbox cursor."""

    def __init__(self, hub: _Hub) -> None:
        self.hub = hub
        self.options = hub.options
        self.conn: hp.ServerConnection | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.agent_id: str | None = None
        #: At most one pending timer per purpose ("handshake", "keepalive", "retry").
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._last_rx = 0.0
        self._bucket: TokenBucket | None = None
        self._rate_logged_at = -1e9
        self._pending_send_bytes = 0
        self._paused = False
        #: A SEND of this connection failed to commit (the connection is closing).
        self._send_failed = False
        self._alive = False  # between connection_made (accepted) and connection_lost
        #: What is pushed when (cursor, paging, window, acks, lease); set at login.
        self.delivery: Delivery[StoredEnvelope] | None = None
        #: Names this connection in the agent's lease (shared databases).
        self.session_id = secrets.randbits(62)
        self.holds_lease = False
        self._claiming = False
        self._lease_refused = False
        self.low_notified = False

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        hub = self.hub
        if len(hub.sessions) >= self.options.max_connections or hub.stopping:
            code = "shutting_down" if hub.stopping else "too_many_connections"
            logger.warning("refusing connection from %s: %s", self.peer, code)
            hub.metrics.connection_refused(code)
            transport.write(encode_frame(Error(0, code, "try again later", fatal=True)))
            transport.close()
            return
        hub.sessions.add(self)
        hub.metrics.connection_accepted()
        self._alive = True
        loop = hub.loop
        now = loop.time()
        self._last_rx = now
        self._bucket = TokenBucket(self.options.rate_per_s, self.options.rate_burst, now)
        self.conn = hp.ServerConnection(
            nonce=os.urandom(32),
            hub_address=hub.hub_names,
            channel_binding=hub.channel_binding,
            max_envelope_bytes=self.options.max_envelope_bytes,
        )
        self._schedule("handshake", self.options.handshake_timeout_s, self._handshake_expired)
        self._schedule("keepalive", self._keepalive_delay(), self._keepalive)
        self.flush()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        self._last_rx = self.hub.loop.time()
        for event in conn.receive_data(data):
            self._dispatch(event)
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._alive = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.hub.sessions.discard(self)
        if self._send_failed and not self.hub.worker.stopped:
            self.hub.worker.forget_source(self.session_id)
        if self.agent_id is not None and self.hub.online.get(self.agent_id) is self:
            del self.hub.online[self.agent_id]
            unacked = len(self.delivery.inflight) if self.delivery is not None else 0
            logger.info("%s went offline (%d unacknowledged)", self.agent_id, unacked)
            if self.holds_lease:
                self.hub.release_lease(self.agent_id, self.session_id)
        self.holds_lease = False

    @property
    def usable(self) -> bool:
        """The transport is up and the protocol not closed."""
        return self._alive and self.conn is not None and not self.conn.closed

    # -- output -----------------------------------------------------------

    def flush(self) -> None:
        """Write what the connection has to send; close the transport once CLOSED."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or transport.is_closing():
            return
        data = conn.data_to_send()
        if data:
            transport.write(data)
        if conn.closed:
            transport.close()

    def fail(self, code: str, text: str) -> None:
        """Send a fatal ERROR and close (logged by the caller)."""
        if self.conn is not None:
            if not self.conn.closed:
                self.hub.metrics.connection_error(
                    code, by_peer=False, logged_in=self.agent_id is not None
                )
            self.conn.fail(code, text)
            self.flush()

    # -- timers -----------------------------------------------------------

    def _schedule(self, purpose: str, delay: float, callback: Callable[[], None]) -> None:
        previous = self._timers.pop(purpose, None)
        if previous is not None:
            previous.cancel()
        if self._alive:
            self._timers[purpose] = self.hub.loop.call_later(delay, callback)

    def _handshake_expired(self) -> None:
        conn = self.conn
        if conn is not None and not conn.closed and conn.state is not hp.State.AUTHENTICATED:
            logger.warning(
                "closing %s: no login within %ss", self.peer, self.options.handshake_timeout_s
            )
            self.fail("handshake_timeout", "no login in time")

    def _keepalive_delay(self) -> float:
        return min(self.options.ping_interval_s, self.options.idle_timeout_s)

    def _keepalive(self) -> None:
        conn = self.conn
        if conn is None or not self.usable:
            return
        silent = self.hub.loop.time() - self._last_rx
        if silent >= self.options.idle_timeout_s:
            logger.warning("closing %s (%s): idle for %.0fs", self.peer, self.agent_id, silent)
            self.fail("idle_timeout", "no data received in time")
            return
        if silent >= self.options.ping_interval_s:
            conn.ping()
            self.flush()
        self._schedule("keepalive", self._keepalive_delay(), self._keepalive)

    # -- events -----------------------------------------------------------

    def _allowed(self, request_id: int) -> bool:
        """Apply the token bucket to one request; refuse it with ``rate_limited`` if empty."""
        assert self._bucket is not None and self.conn is not None
        now = self.hub.loop.time()
        if self._bucket.take(now):
            return True
        if now - self._rate_logged_at > 5.0:
            self._rate_logged_at = now
            logger.warning("rate limit: refusing requests from %s (%s)", self.peer, self.agent_id)
        self.hub.metrics.request_rejected("rate_limited")
        self.conn.reply_error(request_id, "rate_limited", "too many requests; slow down")
        return False

    def _dispatch(self, event: hp.Event) -> None:
        conn = self.conn
        assert conn is not None
        if isinstance(event, hp.SendRequested):
            if self._allowed(event.request_id):
                self._on_send(event)
        elif isinstance(event, hp.AckReceived):
            self._on_ack(event)
        elif isinstance(event, hp.PongReceived):
            pass
        elif isinstance(event, hp.LoginRequested):
            self._spawn(self._on_login(event))
        elif isinstance(event, hp.ConnectionFailed):
            self.hub.metrics.connection_error(
                event.code, by_peer=event.sent_by_peer, logged_in=self.agent_id is not None
            )
            logger.warning(
                "closing %s (%s): %r%s",
                self.peer,
                self.agent_id,
                event.code,
                " (sent by peer)" if event.sent_by_peer else "",
            )
        elif isinstance(event, hp.RequestRejected):
            self.hub.metrics.request_rejected(event.code)
            logger.warning("refused request from %s (%s): %s", self.peer, self.agent_id, event.code)
        elif isinstance(event, _REQUESTS):
            if self._allowed(event.request_id):
                self._spawn(self._on_request(event))
        else:  # pragma: no cover - every event type is handled above
            raise AssertionError(f"unhandled event {event!r}")

    def _spawn(self, coro: Any) -> None:
        task = self.hub.loop.create_task(coro)
        self.hub.tasks.add(task)
        task.add_done_callback(self.hub.tasks.discard)

    async def _db(self, fn: Callable[[], _T]) -> _T:
        return await self.hub.worker.call(fn)

    async def _on_login(self, event: hp.LoginRequested) -> None:
        conn = self.conn
        assert conn is not None
        store, now = self.hub.store, self.options.clock()
        # An ephemeral id may change hands only while no session of it is live here.
        holder = self.hub.online.get(event.agent_id)
        holder_live = holder is not None and holder is not self

        hub = self.hub

        def bind() -> tuple[bool, LeaseClaim | None]:
            created = store.bind_agent(
                event.agent_id,
                event.signing_key,
                now,
                ephemeral=event.ephemeral,
                holder_live=holder_live,
            )
            if event.bundle:
                store.publish_bundle(event.agent_id, event.bundle, now)
            return created, hub.claim_lease(event.agent_id, self.session_id, now)

        try:
            created, claim = await self._db(bind)
        except AuthFailedError as exc:
            logger.warning("login refused for %r from %s: %s", event.agent_id, self.peer, exc.code)
            self.hub.metrics.login_failed(exc.code)
            conn.refuse_login(exc.code, f"agent id {event.agent_id!r} is bound to another key")
            self.flush()
            return
        except Exception as exc:
            logger.exception("login of %r failed", event.agent_id)
            self.hub.metrics.login_failed("internal")
            self.hub.metrics.store_error("login")
            text = f"the hub could not complete the login{_storage_problem(exc)}"
            conn.refuse_login("internal", text)
            self.flush()
            return
        if not self.usable:
            if claim is not None and claim.granted:
                hub.release_lease(event.agent_id, self.session_id)
            return  # gone while the database worked; the binding stays
        conn.accept_login(created)
        self.agent_id = event.agent_id
        previous = self.hub.online.get(event.agent_id)
        if previous is not None and previous is not self:
            logger.info("%s logged in again; closing its older connection", event.agent_id)
            previous.holds_lease = False  # this session holds it now (same hub)
            previous.fail("replaced", "another connection logged in as this agent")
        self.hub.online[event.agent_id] = self
        self.hub.metrics.login_succeeded(new=created)
        self.delivery = Delivery(window=self.options.push_window, lease_until_ms=0)
        self._leased(claim, now)
        logger.info(
            "%s logged in from %s%s", event.agent_id, self.peer, " (new)" if created else ""
        )
        self.flush()
        self.pump_mailbox()

    async def _on_request(self, event: _Request) -> None:
        conn = self.conn
        assert conn is not None
        store, clock = self.hub.store, self.options.clock
        try:
            if isinstance(event, hp.BundleRequested):
                await self._on_fetch(event)
            elif isinstance(event, hp.BundlePublished):
                bundle, owner = event.bundle, event.agent_id
                await self._db(lambda: store.publish_bundle(owner, bundle, clock()))
                conn.reply_ok(event.request_id)
            elif isinstance(event, hp.PrekeysUploaded):
                items = [
                    (p.kind, p.prekey_id, blob)
                    for p, blob in zip(event.prekeys, event.encoded, strict=True)
                ]
                owner = event.agent_id
                await self._db(lambda: store.add_one_time_prekeys(owner, items))
                self.low_notified = False
                conn.reply_ok(event.request_id)
            elif isinstance(event, hp.AgentsRequested):
                conn.reply_agents(event.request_id, await self._db(store.list_agents))
            elif isinstance(event, hp.StatsRequested):
                stats = dict(await self._db(store.stats))
                stats.update(
                    queued=stats.get("envelopes", 0),
                    connections=len(self.hub.sessions),
                    online=len(self.hub.online),
                )
                conn.reply_stats(event.request_id, stats)
            elif isinstance(event, hp.KeyRotationRequested):
                await self._on_rotate(event)
        except HubError as exc:
            logger.warning("request from %s (%s) refused: %s", self.peer, self.agent_id, exc.code)
            self.hub.metrics.request_rejected(exc.code)
            conn.reply_error(event.request_id, exc.code, str(exc))
        except Exception:
            logger.exception("request from %s (%s) failed", self.peer, self.agent_id)
            self.hub.metrics.store_error("request")
            conn.reply_error(event.request_id, "internal", "the hub failed; retry")
        self.flush()

    async def _on_fetch(self, event: hp.BundleRequested) -> None:
        conn = self.conn
        assert conn is not None
        store, now, peer = self.hub.store, self.options.clock(), event.agent_id

        def fetch() -> tuple[bytes, int] | None:
            found = store.fetch_bundle(peer, now)
            if found is None:
                return None
            bundle = compose_bundle(found.bundle, found.one_time_x25519, found.one_time_kem)
            return bundle, min(found.remaining_x25519, found.remaining_kem)

        result = await self._db(fetch)
        if result is None:
            self.hub.metrics.request_rejected("not_found")
            conn.reply_error(event.request_id, "not_found", f"Peer '{peer}' not found on hub")
            return
        bundle, remaining = result
        conn.reply_bundle(event.request_id, bundle)
        owner = self.hub.online.get(peer)
        if (
            remaining < self.options.prekeys_low_water
            and owner is not None
            and owner.conn is not None
            and not owner.low_notified
        ):
            owner.low_notified = True
            owner.conn.notify_prekeys_low(remaining)
            owner.flush()

    async def _on_rotate(self, event: hp.KeyRotationRequested) -> None:
        conn = self.conn
        assert conn is not None
        store, now = self.hub.store, self.options.clock()
        await self._db(
            lambda: store.rotate_agent_key(event.agent_id, event.old_key, event.new_key, now)
        )
        conn.confirm_rotation(event.request_id, event.new_key)
        logger.info("%s rotated its identity key", event.agent_id)

    # -- the lease (shared databases) ------------------------------------

    def _leased(self, claim: LeaseClaim | None, started_ms: int) -> None:
        """Apply a claim or renewal begun at ``started_ms`` (None: no leases here)."""
        delivery = self.delivery
        if delivery is None:
            return
        if claim is None:
            delivery.lease(None)
            self.holds_lease = False
        elif claim.granted:
            self.holds_lease = True
            timer = self._timers.pop("lease", None)
            if timer is not None:
                timer.cancel()
            delivery.lease(started_ms + self.hub.lease_trust_ms)
        else:
            self.holds_lease = False
            delivery.lease(0)
            if not self._lease_refused:  # once per session: retries are routine
                self._lease_refused = True
                logger.info(
                    "%s is online on hub %r; asked it to let go (waiting at most %.1fs)",
                    self.agent_id,
                    claim.hub_id,
                    max(0, claim.expires_at_ms - started_ms) / 1000,
                )
            wait_s = max(0.0, (claim.expires_at_ms - started_ms) / 1000) + 0.02
            self._schedule("lease", min(wait_s, self.hub.maintain_interval_s), self.claim_lease)
        self.pump_mailbox()

    def claim_lease(self) -> None:
        """Try again to take the agent's lease (it was held by another hub)."""
        if not self.usable or self.agent_id is None or self.holds_lease or self._claiming:
            return
        timer = self._timers.pop("lease", None)
        if timer is not None:
            timer.cancel()
        self._claiming = True
        self._spawn(self._claim(self.agent_id))

    async def _claim(self, agent_id: str) -> None:
        now = self.options.clock()
        try:
            claim = await self._db(lambda: self.hub.claim_lease(agent_id, self.session_id, now))
        except Exception:
            self._claiming = False
            logger.exception("claiming the lease of %s failed; retrying", agent_id)
            self._schedule("lease", 1.0, self.claim_lease)
            return
        self._claiming = False
        if not self.usable or self.hub.online.get(agent_id) is not self:
            if claim is not None and claim.granted:
                self.hub.release_lease(agent_id, self.session_id)
            return
        self._leased(claim, now)

    def renewed(self, started_ms: int) -> None:
        """The lease was renewed by a renewal begun at ``started_ms``."""
        if self.delivery is not None and self.holds_lease:
            self.delivery.lease(started_ms + self.hub.lease_trust_ms)
            self.pump_mailbox()

    def wake(self) -> None:
        """There may be mail for this agent this session has not seen (another hub
        committed it, or the periodic catch-up found it)."""
        if self.delivery is not None:
            self.delivery.woken()
            self.pump_mailbox()

    # -- sending ----------------------------------------------------------

    def _on_send(self, event: hp.SendRequested) -> None:
        expires = self.options.clock() + int(self.options.ttl_s * 1000)
        item = NewEnvelope(event.message_id, event.sender, event.recipient, event.envelope, expires)
        size = len(event.envelope)
        self._pending_send_bytes += size

        def done(result: EnqueueResult | BaseException) -> None:
            self._pending_send_bytes -= size
            self._send_committed(event, result)
            if self._paused and self._pending_send_bytes * 2 < self.options.max_pending_send_bytes:
                self._set_paused(False)

        # The recipient's live session is here: the other hubs need no wake-up. If it
        # moves meanwhile, this hub frees its lease through the same writer queue,
        # after this commit, and the new hub pages the mailbox once it holds the lease.
        here = self.hub.online.get(event.recipient)
        notify = here is None or not here.holds_lease
        self.hub.worker.submit_send(item, done, notify, self.session_id)
        if self._pending_send_bytes > self.options.max_pending_send_bytes:
            self._set_paused(True)

    def _set_paused(self, paused: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or paused == self._paused:
            return
        if not paused and self.hub.stopping:
            return
        self._paused = paused
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _send_committed(
        self, event: hp.SendRequested, result: EnqueueResult | BaseException
    ) -> None:
        conn = self.conn
        assert conn is not None
        mid = event.message_id
        self.hub.metrics.send_committed(result)
        if isinstance(result, BaseException):
            text = f"the hub could not store it{_storage_problem(result)}; retry"
            conn.reply_error(event.request_id, "internal", text, mid)
            # The agent re-sends its outbox, in order, when it logs in again; the
            # writer refuses this connection's later SENDs until it is gone.
            if not self._send_failed:
                self._send_failed = True
                logger.warning(
                    "closing %s (%s): an envelope could not be stored", self.peer, self.agent_id
                )
                self.fail("internal", f"{text}: log in again and re-send the outbox")
                if not self._alive and not self.hub.worker.stopped:
                    self.hub.worker.forget_source(self.session_id)  # gone already
        elif result.status is EnqueueStatus.STORED:
            conn.reply_send_ack(event.request_id, mid, duplicate=False)
            assert result.seq is not None
            recipient = self.hub.online.get(event.recipient)
            if recipient is not None:
                recipient.offer(
                    StoredEnvelope(result.seq, mid, event.sender, event.recipient, event.envelope),
                    result.prev_seq,
                )
        elif result.status is EnqueueStatus.DUPLICATE:
            conn.reply_send_ack(event.request_id, mid, duplicate=True)
        elif result.status is EnqueueStatus.MAILBOX_FULL:
            logger.warning(
                "mailbox of %s is full; refused envelope from %s", event.recipient, event.sender
            )
            conn.reply_error(
                event.request_id, "mailbox_full", f"mailbox of '{event.recipient}' is full", mid
            )
        else:
            logger.info("envelope from %s to unknown recipient %r", event.sender, event.recipient)
            conn.reply_error(
                event.request_id,
                "unknown_recipient",
                f"Peer '{event.recipient}' not found on hub",
                mid,
            )
        self.hub.mark_dirty(self)

    # -- delivery ---------------------------------------------------------

    def _push_all(self, items: list[StoredEnvelope]) -> None:
        conn = self.conn
        assert conn is not None
        for item in items:
            conn.push(item.seq, item.message_id, item.body)

    def offer(self, item: StoredEnvelope, prev_seq: int | None) -> None:
        """A new envelope for this (online) agent was committed: push it now if in order."""
        delivery = self.delivery
        if delivery is None:
            return
        pushes = delivery.committed(item, prev_seq, self.options.clock())
        if pushes:
            self._push_all(pushes)
            self.hub.mark_dirty(self)
        else:
            self.pump_mailbox()

    def pump_mailbox(self) -> None:
        """Page stored envelopes after the cursor while the in-flight window has room."""
        delivery = self.delivery
        if not self.usable or delivery is None or self.agent_id is None:
            return
        request = delivery.next_page(self.options.clock())
        if request is not None:
            self._spawn(self._page(self.agent_id, delivery, request))

    async def _page(
        self, agent_id: str, delivery: Delivery[StoredEnvelope], request: PageRequest
    ) -> None:
        store, now = self.hub.store, self.options.clock()
        after, limit = request.after_seq, request.limit
        try:
            rows = await self._db(
                lambda: store.pending(agent_id, after_seq=after, limit=limit, now_ms=now)
            )
        except Exception:
            logger.exception("reading the mailbox of %s failed; retrying", agent_id)
            self.hub.metrics.store_error("read")
            delivery.page_failed()
            self._schedule("retry", 1.0, self.pump_mailbox)
            return
        pushes = delivery.page_read(request, rows, self.options.clock())
        if not self.usable:
            return
        self._push_all(pushes)
        self.flush()
        self.pump_mailbox()

    def _on_ack(self, event: hp.AckReceived) -> None:
        # Only ids pushed on this connection reach the database (no delete spam);
        # an ack for an earlier connection's push is repeated after the re-push.
        if self.delivery is None:
            return
        acked = self.delivery.acked(event.message_ids)
        if acked:
            self.hub.worker.submit_ack(event.agent_id, acked)
        self.pump_mailbox()


# --- the hub ---------------------------------------------------------------


class _Hub:
    """State shared by the sessions of one running server (loop thread only)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        store: HubStore,
        options: HubOptions,
        hub_names: tuple[str, ...],
        channel_binding: bytes,
    ) -> None:
        self.loop = loop
        self.store = store
        self.options = options
        self.hub_names = hub_names
        self.channel_binding = channel_binding
        self.metrics: HubMetrics = (
            HubMetrics() if options.metrics_port is None else PrometheusHubMetrics()
        )
        self.worker = StoreWorker(store, loop, options, self.metrics)
        self.sessions: set[_Session] = set()
        self.online: dict[str, _Session] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._dirty: set[_Session] = set()
        self.stopping = False
        #: Several hubs may share the database (PostgreSQL): leases and NOTIFY.
        self.shared = store.shared
        self.hub_id = options.hub_id or ""  # set by the server once the port is bound
        self.lease_ttl_ms = int(options.lease_ttl_s * 1000)
        #: A lease is trusted for 3/4 of its TTL after its renewal began: the
        #: quarter left absorbs clock skew between hubs and a slow renewal.
        self.lease_trust_ms = self.lease_ttl_ms * 3 // 4
        self.maintain_interval_s = min(options.catchup_interval_s, options.lease_ttl_s / 3)
        self.listener: HubListener | None = None
        self._next_catch_up = 0.0

    # -- leases and cross-hub wake-ups (shared databases) -----------------

    def claim_lease(self, agent_id: str, session_id: int, now_ms: int) -> LeaseClaim | None:
        """Claim ``agent_id``'s lease for a session (writer thread); None if not shared."""
        if not self.shared:
            return None
        return self.store.claim_lease(
            agent_id, self.hub_id, session_id, now_ms=now_ms, ttl_ms=self.lease_ttl_ms
        )

    def release_lease(self, agent_id: str, session_id: int | None) -> None:
        """Free ``agent_id``'s lease if this hub (session) holds it; loop thread."""
        if not self.shared or self.worker.stopped:
            return
        future = self.worker.call(
            functools.partial(self.store.release_lease, agent_id, self.hub_id, session_id)
        )
        future.add_done_callback(_log_failure("freeing the lease of %s failed", agent_id))

    def notified(self, payload: str) -> None:
        """A NOTIFY from the database (loop thread): see ``NOTIFY_CHANNEL``."""
        parts = payload.split(" ")
        if len(parts) == 3 and parts[0] == "m":
            session = self.online.get(parts[2])
            if session is not None and parts[1] != self.hub_id:
                session.wake()
        elif len(parts) == 3 and parts[0] == "r":
            if parts[1] != self.hub_id:
                return
            agent_id = parts[2]
            session = self.online.get(agent_id)
            if session is not None:
                logger.info("%s logged in on another hub; closing its session here", agent_id)
                session.holds_lease = False
                session.fail("replaced", "this agent logged in on another hub")
            self.release_lease(agent_id, None)
        elif len(parts) == 2 and parts[0] == "f":
            session = self.online.get(parts[1])
            if session is not None:
                session.claim_lease()

    def catch_up_all(self) -> None:
        """Wake every online session (the listener was away: notifications were lost)."""
        for session in list(self.online.values()):
            session.wake()

    async def maintain(self) -> None:
        """Renew this hub's leases and catch up from the table, every
        ``maintain_interval_s``, until cancelled (shared databases only)."""
        while True:
            await asyncio.sleep(self.maintain_interval_s)
            try:
                await self._maintain_once()
            except Exception:
                logger.exception("renewing leases / catching up failed; retrying")

    async def _maintain_once(self) -> None:
        store, now = self.store, self.options.clock()
        holders = {a: s for a, s in self.online.items() if s.holds_lease}
        sessions = {agent_id: session.session_id for agent_id, session in holders.items()}
        if sessions:
            lost = await self.worker.call(
                functools.partial(
                    store.renew_leases, self.hub_id, sessions, now_ms=now, ttl_ms=self.lease_ttl_ms
                )
            )
            for agent_id, session in holders.items():
                if self.online.get(agent_id) is not session:
                    continue
                if agent_id in lost:
                    logger.warning("%s: its lease went to another hub; closing", agent_id)
                    session.holds_lease = False
                    session.fail("replaced", "this agent logged in on another hub")
                else:
                    session.renewed(now)
        for session in list(self.online.values()):
            if not session.holds_lease:
                session.claim_lease()
        if self.loop.time() < self._next_catch_up:
            return
        self._next_catch_up = self.loop.time() + self.options.catchup_interval_s
        cursors = {
            agent_id: session.delivery.cursor
            for agent_id, session in self.online.items()
            if session.holds_lease and session.delivery is not None and not session.delivery.backlog
        }
        if cursors:
            now = self.options.clock()
            due = await self.worker.call(
                functools.partial(store.recipients_with_mail, cursors, now_ms=now)
            )
            for agent_id in due:
                found = self.online.get(agent_id)
                if found is not None:
                    found.wake()

    def mark_dirty(self, session: _Session) -> None:
        """Flush ``session`` once, after the current callback (coalesces many replies)."""
        if not self._dirty:
            self.loop.call_soon(self.flush_dirty)
        self._dirty.add(session)

    def flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for session in dirty:
            session.flush()


def _storage_problem(exc: BaseException) -> str:
    """`` (why)`` the database refused a write, for a client to read (no SQL, no paths)."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    if "full" in text:
        return " (its disk is full)"
    if "locked" in text or "busy" in text:
        return " (its database is locked by another process)"
    if "readonly" in text or "read-only" in text or "i/o" in text:
        return " (its database is read-only or its disk is failing)"
    return ""


def _refuse_read_only(store: HubStore) -> None:
    """Refuse a SQLite database this process cannot write (file, WAL files, or folder).

    Such a hub could neither log an agent in nor store a message; better not to start.
    """
    url = store.engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database)
    wal = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    targets = [path, *wal] + ([] if all(w.exists() for w in wal) else [path.parent])
    for target in targets:
        if target.exists() and not os.access(target, os.W_OK):
            raise ConfigurationError(
                f"the hub database {path} is read-only ({target} is not writable); "
                "make it writable, then start the hub again"
            )


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a listening address) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _usable_address(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (address.is_unspecified or address.is_multicast or address.is_link_local)


def _local_addresses() -> list[str]:
    """This machine's addresses that a standard library can tell: those its names
    resolve to, and the source address of its default routes."""
    found: list[str] = []
    for name in {socket.gethostname(), socket.getfqdn()}:
        with contextlib.suppress(OSError, UnicodeError):
            for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP):
                found.append(str(info[4][0]))
    # A connected UDP socket sends nothing; it only picks the route's source address.
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            found.append(str(sock.getsockname()[0]))
    return [address for address in found if _usable_address(address)]


def machine_hub_names(host: str, port: int) -> tuple[str, ...]:
    """Names a hub listening on ``host`` (a wildcard or this machine's address) may
    be dialled by: ``host`` itself, the machine's host names and addresses, and the
    loopback names; as many as fit in a HELLO. May block on DNS."""
    candidates = [] if _is_wildcard(host) else [host]
    candidates += [socket.getfqdn(), socket.gethostname(), *_local_addresses()]
    names: list[str] = []
    for candidate in candidates:
        with contextlib.suppress(ValueError):
            name = hp.format_hub_address(candidate, port)
            if name not in names:
                names.append(name)
    loopback = list(hp.loopback_names(port)) if _is_wildcard(host) else []
    # Loopback names are kept whatever else must go: local clients use them most.
    while names and len(",".join(names + loopback)) > hp.MAX_HUB_NAMES_BYTES:
        names.pop()
    return tuple(names + [n for n in loopback if n not in names])


def resolve_hub_names(
    host: str, port: int, hub_address: str | Sequence[str] | None
) -> tuple[tuple[str, ...], bool]:
    """The names a hub on ``host``:``port`` answers logins for, and whether they
    were derived from the machine (no ``hub_address`` on a non-loopback host).

    ``hub_address`` names without a port get ``port``. Without ``hub_address``:
    on a loopback host, ``host`` and the loopback names (``127.0.0.1``,
    ``localhost``, ``::1``) for ``port``; elsewhere :func:`machine_hub_names`.
    Raises ConfigurationError for invalid names.
    """
    try:
        if hub_address is not None:
            return hp.parse_hub_names(hub_address, default_port=port), False
        if is_loopback_host(host):
            own = hp.format_hub_address(host, port)
            return (own, *(n for n in hp.loopback_names(port) if n != own)), False
    except ValueError as exc:
        raise ConfigurationError(f"hub_address: {exc}") from exc
    return machine_hub_names(host, port), True


class NetworkHubServer:
    """The AgentMesh hub server.

    ``NetworkHubServer(host="0.0.0.0", port=7700, db=None, **options)``; ``db``
    is a SQLite path or SQLAlchemy URL, defaulting to ``$AGENTMESH_DB`` and then
    ``hub.sqlite``. ``options`` are :class:`HubOptions` fields. The constructor
    does no I/O.

    :meth:`start` with ``block=True`` serves in the calling thread until
    :meth:`stop`, SIGTERM or SIGINT; with ``block=False`` it serves on a
    background thread and returns once the socket is listening (raising any
    start-up error, e.g. :class:`ConfigurationError` for a database written by
    a newer AgentMesh). :attr:`port` is the bound port (useful with ``port=0``).

    ``hub_address`` (an option) names the hub as its agents dial it; logins
    signed for any other name are refused (see :func:`resolve_hub_names`).
    Without it, a hub on a loopback host answers to the loopback names, and a
    hub on any other host (version 1's default ``0.0.0.0``) to names derived
    from the machine, with a warning to pass ``hub_address``.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",  # noqa: S104 - version 1's default; a warning is logged without TLS
        port: int = DEFAULT_PORT,
        db: str | None = None,
        **options: Any,
    ) -> None:
        unknown = set(options) - {f.name for f in dataclasses.fields(HubOptions)}
        if unknown:
            raise ConfigurationError(f"unknown hub option(s): {', '.join(sorted(unknown))}")
        self.host = host
        self._requested_port = port
        self.db = db or os.environ.get(DB_ENV_VAR) or DEFAULT_DB
        self.options = HubOptions(**options)
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def port(self) -> int:
        """The listening port (the requested one until :meth:`start` has bound it)."""
        return self._port if self._port is not None else self._requested_port

    def start(self, block: bool = True) -> None:
        """Serve; see the class docstring. Raises the start-up error, if any."""
        if self._thread is not None or self._loop is not None:
            raise RuntimeError("server already started")
        if block:
            self._run(install_signals=threading.current_thread() is threading.main_thread())
            return
        self._thread = threading.Thread(
            target=self._run, kwargs={"install_signals": False}, name="agentmesh-hub", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop accepting, finish in-flight commits, close every connection; wait for it."""
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if not thread.is_alive():  # stopped: start() may be called again
                self._thread, self._port = None, None
                self._ready.clear()

    def __enter__(self) -> NetworkHubServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- internals --------------------------------------------------------

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.options.use_uvloop:
            try:
                uvloop = importlib.import_module("uvloop")
            except ImportError:
                pass
            else:
                loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
                return loop
        return asyncio.new_event_loop()

    def _run(self, install_signals: bool) -> None:
        loop = self._new_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(install_signals))
        except BaseException as exc:
            if self._ready.is_set() or self._thread is None:
                raise
            self._startup_error = exc  # start() raises it in the caller's thread
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _serve(self, install_signals: bool) -> None:
        loop = asyncio.get_running_loop()
        options = self.options
        self._stop_event = stop_event = asyncio.Event()
        ssl_context = options.make_ssl_context()
        store = HubStore(self.db, synchronous=options.synchronous)
        try:
            _refuse_read_only(store)
            try:
                if options.migrate:
                    store.ensure_schema()
                else:
                    store.check_revision()
            except SQLAlchemyError as exc:
                raise ConfigurationError(f"cannot open the hub database {store!r}: {exc}") from exc
            hub = _Hub(loop, store, options, (), options.channel_binding())
            server = await loop.create_server(
                lambda: _Session(hub),
                self.host,
                self._requested_port,
                ssl=ssl_context,
                ssl_handshake_timeout=options.handshake_timeout_s if ssl_context else None,
                backlog=1024,
                start_serving=False,  # the names depend on the bound port
            )
        except BaseException:
            store.close()
            raise
        port = int(server.sockets[0].getsockname()[1])
        ops: OpsEndpoint | None = None
        try:
            names, derived = await loop.run_in_executor(
                None, resolve_hub_names, self.host, port, options.hub_address
            )
            if isinstance(hub.metrics, PrometheusHubMetrics):
                hub.metrics.watch(store, lambda: len(hub.online), lambda: len(hub.sessions))
                ops_host = options.metrics_host or self.host
                ops = OpsEndpoint(hub.metrics, store, ops_host, options.metrics_port or 0)
                logger.info(
                    "metrics listening on %s:%d (/metrics, /healthz)", ops_host or "*", ops.port
                )
        except BaseException:
            server.close()
            store.close()
            raise
        self._port, hub.hub_names = port, names
        hub.worker.start()
        if hub.shared:
            try:
                await self._join_shared_database(hub, port)
            except BaseException:
                server.close()
                await loop.run_in_executor(None, hub.worker.stop)
                store.close()
                raise
        await server.start_serving()
        if derived:
            logger.warning(
                "no hub_address given for %s: answering logins for names guessed from this "
                "machine (%s); pass hub_address=... (agentmesh-hub --hub-address HOST:PORT) "
                "with the name agents dial",
                self.host or "*",
                ", ".join(names),
            )
        tls_bound = " (logins bound to its TLS certificate)" if hub.channel_binding else ""
        logger.info("hub names: %s%s", ", ".join(names), tls_bound)
        if ssl_context is None and not is_loopback_host(self.host):
            logger.warning(
                "listening on %s:%d without TLS: envelopes stay end-to-end encrypted, but "
                "metadata and logins are visible on the network; use --tls-cert/--tls-key",
                self.host,
                self._port,
            )
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signum, stop_event.set)
        logger.info("hub listening on %s:%d (db %s)", self.host, self._port, store)
        purger = loop.create_task(self._purge_forever(hub))
        maintainer = (
            loop.create_task(hub.maintain(), name="agentmesh-hub-maintain") if hub.shared else None
        )
        self._ready.set()
        try:
            await stop_event.wait()
        finally:
            purger.cancel()
            if maintainer is not None:
                maintainer.cancel()
            await self._shutdown(server, hub)
            if ops is not None:
                await loop.run_in_executor(None, ops.close)
            if install_signals:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(signum)

    async def _join_shared_database(self, hub: _Hub, port: int) -> None:
        """Several hubs on one PostgreSQL: name this hub, free what its previous run
        held, and listen for the others' notifications (before serving)."""
        loop = asyncio.get_running_loop()
        hub.hub_id = self.options.hub_id or default_hub_id(port)
        hub.worker.notify_from = hub.hub_id
        freed = await hub.worker.call(functools.partial(hub.store.release_hub_leases, hub.hub_id))
        if freed:
            logger.info("freed %d agent leases held by this hub's previous run", freed)

        def notified(payload: str) -> None:  # listener thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
                loop.call_soon_threadsafe(hub.notified, payload)

        def connected() -> None:  # listener thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(hub.catch_up_all)

        try:
            hub.listener = hub.store.listen(notified, connected)
        except ConfigurationError as exc:
            logger.warning(
                "%s: mail committed by other hubs arrives with the periodic catch-up "
                "(every %ss) only",
                exc,
                self.options.catchup_interval_s,
            )
            return
        hub.listener.start()
        if not await loop.run_in_executor(None, hub.listener.connected.wait, 10.0):
            logger.warning(
                "the hub listener could not LISTEN yet (retrying): until it does, mail "
                "committed by other hubs arrives with the periodic catch-up"
            )
        logger.info("hub id %s: sharing the database with other hubs (LISTEN/NOTIFY)", hub.hub_id)

    async def _purge_forever(self, hub: _Hub) -> None:
        limit = 10_000
        while True:
            await asyncio.sleep(self.options.purge_interval_s)
            try:
                while True:
                    now = self.options.clock()
                    purged = await hub.worker.call(
                        functools.partial(hub.store.purge_expired, now, limit)
                    )
                    if purged:
                        logger.info("purged %d expired envelopes", purged)
                        hub.metrics.purged(purged)
                    if purged < limit:
                        break
            except Exception:
                logger.exception("purging expired envelopes failed")
                hub.metrics.store_error("purge")

    async def _shutdown(self, server: asyncio.Server, hub: _Hub) -> None:
        logger.info("hub shutting down")
        hub.stopping = True
        server.close()
        for session in list(hub.sessions):
            if session.transport is not None and not session.transport.is_closing():
                with contextlib.suppress(Exception):
                    session.transport.pause_reading()
        # Everything queued before this point is committed and its callbacks have run.
        with contextlib.suppress(Exception):
            await hub.worker.call(lambda: None)
        if hub.tasks:
            await asyncio.wait(list(hub.tasks), timeout=5.0)
        hub.flush_dirty()
        for session in list(hub.sessions):
            session.fail("shutting_down", "the hub is shutting down; reconnect later")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5.0)
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        if hub.listener is not None:
            await loop.run_in_executor(None, hub.listener.close)
        if hub.shared:  # the sessions are gone: let their agents log in elsewhere now
            with contextlib.suppress(Exception):
                await hub.worker.call(functools.partial(hub.store.release_hub_leases, hub.hub_id))
        await loop.run_in_executor(None, hub.worker.stop)
        hub.store.close()
        logger.info("hub stopped")
