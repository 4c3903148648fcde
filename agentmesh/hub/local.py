"""``LocalHub``: an in-process hub for demos, tests and notebooks.

Delivery is synchronous: when ``send`` returns, the recipient's handlers
have run (the examples rely on this). Agents that are closed, or not yet
created, keep their mail: it is handed over when they register again.

``LocalHub()`` keeps mailboxes in memory (:class:`MemoryMailboxes`).
``LocalHub(db="hub.sqlite")`` uses the network hub's persistent
:class:`~agentmesh.hub.store.HubStore` (same schema, same migrations), so an
in-process fleet survives a restart.

The hub binds each agent id to its identity key on first registration and
refuses a different key for it (``AuthFailedError``): no mailbox takeover. An
agent without a key file binds its id *ephemerally*: once it is closed, another
key (the next run of the same script) may take the id over, and the mail queued
for the old key is dropped (docs/PROTOCOL.md, "Ephemeral ids").

Locks: the hub's ``_lock`` guards who is online, who is being drained and the
outcomes awaited by ``deliver``; the mailboxes have their own lock, taken only
inside their methods, so the order is the hub's ``_lock``, then the
mailboxes' lock. The hub never calls into an agent while holding its ``_lock``,
and an agent never calls the hub while holding its own: neither order between
the two can arise. Handlers never run under any lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from agentmesh.crypto import primitives as p
from agentmesh.crypto.prekeys import PrekeyBundle, SignedPrekey
from agentmesh.errors import (
    AuthFailedError,
    CryptoError,
    DecodeError,
    HubError,
    IdentityChangedError,
    MailboxFullError,
    PeerNotFoundError,
    ReplayError,
)
from agentmesh.hub.store import (
    EnqueueResult,
    EnqueueStatus,
    FetchedBundle,
    NewEnvelope,
    StoredEnvelope,
)
from agentmesh.protocol.hub_interface import (
    DispatchingEndpoint,
    EndpointOwner,
    HandlingEndpoint,
    HubEndpoint,
    NoticingEndpoint,
    RefusalAwareEndpoint,
    endpoint_of,
    is_ephemeral,
    supports,
)
from agentmesh.wire.envelope import Envelope, decode_envelope

log = logging.getLogger("agentmesh.hub.local")

DEFAULT_TTL_MS = 7 * 24 * 3600 * 1000
DEFAULT_MAILBOX_MAX_MESSAGES = 100_000
DEFAULT_MAILBOX_MAX_BYTES = 1 << 30


class Mailboxes(Protocol):
    """The subset of :class:`~agentmesh.hub.store.HubStore` a LocalHub uses."""

    def bind_agent(
        self,
        agent_id: str,
        signing_key: bytes,
        now_ms: int,
        *,
        ephemeral: bool = False,
        holder_live: bool = True,
    ) -> bool: ...
    def unbind_agent(self, agent_id: str) -> int | None: ...
    def publish_bundle(self, agent_id: str, bundle: bytes, now_ms: int) -> None: ...
    def add_one_time_prekeys(self, agent_id: str, items: list[tuple[int, int, bytes]]) -> int: ...
    def fetch_bundle(self, agent_id: str, now_ms: int) -> FetchedBundle | None: ...
    def enqueue(
        self,
        batch: list[NewEnvelope],
        *,
        now_ms: int,
        max_count_per_recipient: int,
        max_bytes_per_recipient: int,
        durable: bool = True,
    ) -> list[EnqueueResult]: ...
    def sync(self) -> None: ...
    def pending(
        self, recipient: str, *, after_seq: int = 0, limit: int = 500, now_ms: int
    ) -> list[StoredEnvelope]: ...
    def ack(self, recipient: str, message_ids: list[bytes], *, durable: bool = True) -> int: ...
    def list_agents(self) -> list[str]: ...
    def queued_count(self, recipient: str | None = None) -> int: ...
    def close(self) -> None: ...


@dataclass
class _Agent:
    signing_key: bytes
    ephemeral: bool = False
    bundle: bytes | None = None
    prekeys: dict[int, OrderedDict[int, bytes]] = field(
        default_factory=lambda: {1: OrderedDict(), 2: OrderedDict()}
    )
    mailbox: OrderedDict[bytes, StoredEnvelope] = field(default_factory=OrderedDict)
    expiry: dict[bytes, int] = field(default_factory=dict)
    queued_bytes: int = 0


class MemoryMailboxes:
    """An in-memory stand-in for HubStore with the same semantics (no durability)."""

    def __init__(self) -> None:
        self._agents: dict[str, _Agent] = {}
        self._seq = 0
        self._lock = threading.Lock()

    def bind_agent(
        self,
        agent_id: str,
        signing_key: bytes,
        now_ms: int,
        *,
        ephemeral: bool = False,
        holder_live: bool = True,
    ) -> bool:
        """As :meth:`HubStore.bind_agent <agentmesh.hub.store.HubStore.bind_agent>`."""
        with self._lock:
            known = self._agents.get(agent_id)
            if known is None or (
                known.ephemeral
                and not holder_live
                and not p.constant_time_equal(known.signing_key, signing_key)
            ):
                # New, or an ephemeral id taken over: the old key's mail goes with it.
                self._agents[agent_id] = _Agent(signing_key, ephemeral)
                return True
            if not p.constant_time_equal(known.signing_key, signing_key):
                raise AuthFailedError(
                    "identity_mismatch", f"agent id {agent_id!r} is bound to another identity key"
                )
            known.ephemeral = known.ephemeral and ephemeral
            return False

    def unbind_agent(self, agent_id: str) -> int | None:
        with self._lock:
            known = self._agents.pop(agent_id, None)
            return None if known is None else len(known.mailbox)

    def publish_bundle(self, agent_id: str, bundle: bytes, now_ms: int) -> None:
        with self._lock:
            self._agents[agent_id].bundle = bundle

    def add_one_time_prekeys(self, agent_id: str, items: list[tuple[int, int, bytes]]) -> int:
        with self._lock:
            pools = self._agents[agent_id].prekeys
            for kind, prekey_id, blob in items:
                pools[kind].setdefault(prekey_id, blob)
            return sum(len(pool) for pool in pools.values())

    def fetch_bundle(self, agent_id: str, now_ms: int) -> FetchedBundle | None:
        with self._lock:
            agent = self._agents.get(agent_id)
            if agent is None or agent.bundle is None:
                return None
            x25519, kem = agent.prekeys[1], agent.prekeys[2]
            return FetchedBundle(
                agent.bundle,
                x25519.popitem(last=False)[1] if x25519 else None,
                kem.popitem(last=False)[1] if kem else None,
                len(x25519),
                len(kem),
            )

    def enqueue(
        self,
        batch: list[NewEnvelope],
        *,
        now_ms: int,
        max_count_per_recipient: int,
        max_bytes_per_recipient: int,
        durable: bool = True,
    ) -> list[EnqueueResult]:
        results = []
        with self._lock:
            for item in batch:
                agent = self._agents.get(item.recipient)
                if agent is None:
                    results.append(EnqueueResult(EnqueueStatus.UNKNOWN_RECIPIENT))
                elif item.message_id in agent.mailbox:
                    results.append(EnqueueResult(EnqueueStatus.DUPLICATE))
                elif (
                    len(agent.mailbox) >= max_count_per_recipient
                    or agent.queued_bytes + len(item.body) > max_bytes_per_recipient
                ):
                    results.append(EnqueueResult(EnqueueStatus.MAILBOX_FULL))
                else:
                    self._seq += 1
                    agent.mailbox[item.message_id] = StoredEnvelope(
                        self._seq, item.message_id, item.sender, item.recipient, item.body
                    )
                    agent.expiry[item.message_id] = item.expires_at_ms
                    agent.queued_bytes += len(item.body)
                    results.append(EnqueueResult(EnqueueStatus.STORED, self._seq))
        return results

    def pending(
        self, recipient: str, *, after_seq: int = 0, limit: int = 500, now_ms: int
    ) -> list[StoredEnvelope]:
        with self._lock:
            agent = self._agents.get(recipient)
            if agent is None:
                return []
            out = []
            for env in agent.mailbox.values():
                if env.seq > after_seq and agent.expiry[env.message_id] > now_ms:
                    out.append(env)
                    if len(out) >= limit:
                        break
            return out

    def ack(self, recipient: str, message_ids: list[bytes], *, durable: bool = True) -> int:
        deleted = 0
        with self._lock:
            agent = self._agents.get(recipient)
            if agent is None:
                return 0
            for message_id in message_ids:
                env = agent.mailbox.pop(message_id, None)
                if env is not None:
                    agent.expiry.pop(message_id, None)
                    agent.queued_bytes -= len(env.body)
                    deleted += 1
        return deleted

    def list_agents(self) -> list[str]:
        with self._lock:
            return sorted(self._agents)

    def queued_count(self, recipient: str | None = None) -> int:
        with self._lock:
            if recipient is not None:
                agent = self._agents.get(recipient)
                return 0 if agent is None else len(agent.mailbox)
            return sum(len(a.mailbox) for a in self._agents.values())

    def sync(self) -> None:
        """Nothing is durable here."""

    def close(self) -> None:
        """Nothing to release."""


class LocalHub:
    """An in-process hub. ``db``: a file path or SQLAlchemy URL for a persistent store."""

    def __init__(
        self,
        db: str | None = None,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        mailbox_max_messages: int = DEFAULT_MAILBOX_MAX_MESSAGES,
        mailbox_max_bytes: int = DEFAULT_MAILBOX_MAX_BYTES,
    ) -> None:
        self._store: Mailboxes
        if db is None:
            self._store = MemoryMailboxes()
        else:
            from agentmesh.hub.store import HubStore

            store = HubStore(db)
            store.ensure_schema()
            self._store = store
        self._ttl_ms = ttl_ms
        self._max_messages = mailbox_max_messages
        self._max_bytes = mailbox_max_bytes
        self._online: dict[str, HubEndpoint] = {}
        #: Agents being drained, and by which thread (see _drain).
        self._draining: dict[str, int] = {}
        self._outcomes: dict[bytes, BaseException | None] = {}
        #: Envelopes this hub accepted for a recipient (version 1's message_count).
        self._routed = 0
        #: Per recipient: how many envelopes this hub stored for it (a generation), and
        #: the generation at which its queue was last seen empty. While the two differ
        #: by one, the queue holds exactly the envelope just stored, which is handed
        #: over without reading it back (see _drain). Only this object adds rows to its
        #: store: a store shared with another process is not supported.
        self._stored_gen: dict[str, int] = {}
        self._empty_gen: dict[str, int] = {}
        #: Envelopes stored without an fsync, for a recipient that was online, and not
        #: taken by it yet: route() syncs the store before returning if its envelope
        #: is still among them.
        self._unsynced: set[bytes] = set()
        self._lock = threading.RLock()

    @staticmethod
    def _now() -> int:
        return int(time.time() * 1000)

    # -- registration -----------------------------------------------------

    def register(self, agent: HubEndpoint | EndpointOwner) -> None:
        """Bind the agent's id to its key, publish its prekeys, then hand over its mail.

        ``agent``: an agent's endpoint (``Agent.endpoint``) or, as in version 1, the
        Agent. Raises AuthFailedError if the id is already bound to another identity
        key. Every call into the agent is made with no hub lock held (the agent may
        hold its own lock and call this hub: see the module docstring's lock order).
        """
        endpoint = endpoint_of(agent)
        with self._lock:
            holder = self._online.get(endpoint.agent_id)
        self._store.bind_agent(
            endpoint.agent_id,
            endpoint.signing_public_key,
            self._now(),
            ephemeral=is_ephemeral(endpoint),
            holder_live=holder is not None and holder is not endpoint,
        )
        self.refresh_prekeys(endpoint)
        outbox = endpoint.unacked_envelopes()
        with self._lock:
            self._online[endpoint.agent_id] = endpoint
        resent: list[str] = []
        for data in outbox:
            try:
                envelope = decode_envelope(data)
                # Durable: the sender drops its copy once this returns.
                self._submit(data, envelope, durable=True)
            except (HubError, PeerNotFoundError) as exc:
                log.warning("outbox envelope of %s not accepted: %s", endpoint.agent_id, exc)
                if supports(endpoint, RefusalAwareEndpoint):
                    endpoint.envelope_refused(decode_envelope(data).message_id, exc)
                continue
            except (CryptoError, DecodeError, ValueError) as exc:
                log.warning("outbox envelope of %s not accepted: %s", endpoint.agent_id, exc)
                continue
            endpoint.envelope_acked(envelope.message_id)  # stored: drop it from the outbox
            if envelope.recipient not in resent:
                resent.append(envelope.recipient)
        self._drain(endpoint.agent_id)
        for recipient in resent:  # hand resent mail to recipients that are online
            self._drain(recipient)

    def refresh_prekeys(self, agent: HubEndpoint | EndpointOwner) -> None:
        """(Re)publish the agent's bundle and upload its new one-time prekeys."""
        agent = endpoint_of(agent)
        bundle = PrekeyBundle.decode(agent.prekey_bundle_bytes()).verify()
        if bundle.agent_id != agent.agent_id or not p.constant_time_equal(
            bundle.identity.signing, agent.signing_public_key
        ):
            raise AuthFailedError("bad_bundle", "bundle does not belong to this agent")
        encoded = agent.one_time_prekeys()
        items = []
        for blob in encoded:
            prekey = SignedPrekey.decode(blob).verify(bundle.identity.signing)
            items.append((prekey.kind, prekey.prekey_id, blob))
        with self._lock:
            self._store.publish_bundle(agent.agent_id, bundle.encode(), self._now())
            if items:
                self._store.add_one_time_prekeys(agent.agent_id, items)
        agent.one_time_prekeys_uploaded(encoded)

    def unregister(self, agent_id: str) -> None:
        """The agent went away; its mail is kept until it registers again."""
        with self._lock:
            self._online.pop(agent_id, None)

    def unbind(self, agent_id: str) -> int:
        """Release ``agent_id`` after its key was lost (as ``agentmesh-hub admin unbind``
        does for a hub database): any key may then register the id. Its queued mail,
        sealed for the lost key, is dropped; returns how many messages that was.
        Raises PeerNotFoundError if the id is not bound, and HubError if its agent is
        registered here right now (close it first)."""
        with self._lock:
            if agent_id in self._online:
                raise HubError("agent_online", f"agent {agent_id!r} is registered; close it first")
            dropped = self._store.unbind_agent(agent_id)
        if dropped is None:
            raise PeerNotFoundError(agent_id)
        log.warning("unbound agent id %r; %d queued messages dropped", agent_id, dropped)
        return dropped

    # -- delivery -----------------------------------------------------------

    def _submit(
        self, data: bytes, envelope: Envelope, *, durable: bool = False
    ) -> StoredEnvelope | None:
        """Store one envelope; returns it as stored (None: a duplicate).

        For a recipient that is online the commit does not wait for the disk (unless
        ``durable``): the envelope is handed over at once, and the caller syncs if it
        was not taken (see :meth:`_settle`). Mail for an offline recipient is durable
        at once.
        """
        with self._lock:
            online = envelope.recipient in self._online and not durable
        [result] = self._store.enqueue(
            [
                NewEnvelope(
                    envelope.message_id,
                    envelope.sender,
                    envelope.recipient,
                    data,
                    self._now() + self._ttl_ms,
                )
            ],
            now_ms=self._now(),
            max_count_per_recipient=self._max_messages,
            max_bytes_per_recipient=self._max_bytes,
            durable=not online,
        )
        if result.status is EnqueueStatus.UNKNOWN_RECIPIENT:
            raise PeerNotFoundError(envelope.recipient)
        if result.status is EnqueueStatus.MAILBOX_FULL:
            raise MailboxFullError("mailbox_full", f"mailbox of {envelope.recipient!r} is full")
        if result.status is not EnqueueStatus.STORED:
            return None
        assert result.seq is not None
        with self._lock:
            self._routed += 1
            self._stored_gen[envelope.recipient] = self._stored_gen.get(envelope.recipient, 0) + 1
            if online:
                self._unsynced.add(envelope.message_id)
        return StoredEnvelope(
            result.seq, envelope.message_id, envelope.sender, envelope.recipient, data
        )

    def deliver(self, envelope: bytes | Envelope) -> None:
        """Queue an envelope and, if its recipient is registered, deliver it now.

        Returns after the recipient's handlers have run (or, if it is offline,
        once queued). Raises DecodeError for bytes that are not an envelope,
        ValueError("Peer 'x' not found on hub"), MailboxFullError, and, as
        version 1 did, the recipient's verdict on this envelope: ReplayError for
        a replay, AuthenticationError for a tampered one. A rejected envelope is
        dropped and the recipient's state is untouched.

        The verdict is for code that plays the network (tests, demos of an
        attack). An :class:`~agentmesh.Agent` sends through :meth:`route`, so a
        recipient's trouble with a message is never raised to its sender.
        """
        data = envelope.to_bytes() if isinstance(envelope, Envelope) else bytes(envelope)
        parsed = decode_envelope(data)
        with self._lock:
            self._outcomes[parsed.message_id] = None
        try:
            if not self._hand_over_directly(parsed, data):
                stored = self._submit(data, parsed)
                self._drain(parsed.recipient, stored)
                self._settle(parsed.message_id)
        finally:
            with self._lock:
                outcome = self._outcomes.pop(parsed.message_id, None)
        if outcome is not None:
            raise outcome

    def route(self, envelope: bytes) -> None:
        """Queue an envelope for its recipient and hand it over if it is registered.

        Returns once the recipient took it (its handlers have run) or, if it is
        offline, once queued. Raises only what is the sender's business:
        DecodeError, ValueError("Peer 'x' not found on hub") and MailboxFullError.
        What the recipient made of the envelope (it could not decrypt it, it was
        a replay) is the recipient's and is logged on its side, as with a network
        hub.
        """
        data = bytes(envelope)
        parsed = decode_envelope(data)
        if self._hand_over_directly(parsed, data):
            return
        stored = self._submit(data, parsed)
        self._drain(parsed.recipient, stored)
        self._settle(parsed.message_id)

    def _hand_over_directly(self, envelope: Envelope, data: bytes) -> bool:
        """Hand an envelope to its recipient without storing it, if nothing can come
        between: the recipient is online, nobody drains it and its queue is empty.
        Returns False if so it could not be (the caller stores and drains it).

        Nothing the hub stores could make this message safer: before this returns
        the recipient has committed it durably, or handled it (a HandlingEndpoint),
        and until then the sender keeps it in its outbox (resent at its next
        registration, should the process die first). Storing it only to delete it
        again cost more than the rest of a delivery. If the recipient holds its mail
        back (an identity change) or fails for a reason of its own, the envelope is
        stored durably, as mail for an offline recipient, before this returns or
        raises (the recipient's error, even if storing fails too).
        """
        recipient = envelope.recipient
        with self._lock:
            agent = self._online.get(recipient)
            if (
                agent is None
                or recipient in self._draining
                or self._empty_gen.get(recipient) != self._stored_gen.get(recipient, 0)
            ):
                return False
            self._draining[recipient] = threading.get_ident()
        # An endpoint that runs its handlers in the same call may skip its own fsync.
        handles = supports(agent, HandlingEndpoint)
        dispatcher = agent if supports(agent, DispatchingEndpoint) and not handles else None
        try:
            try:
                outcome, taken = self._take(
                    agent, envelope.message_id, envelope.sender, data, handle=handles
                )
            except BaseException:
                try:  # its own trouble: keep the mail for a later drain
                    self._submit(data, envelope, durable=True)
                except Exception:
                    log.exception("could not keep an envelope %s failed to take", recipient)
                raise
            if not taken:
                self._submit(data, envelope, durable=True)  # held back: kept for later
                return True
            with self._lock:
                if not isinstance(outcome, ReplayError):
                    self._routed += 1
            if dispatcher is not None:
                dispatcher.dispatch_pending()
        finally:
            with self._lock:
                self._draining.pop(recipient, None)
                # Another thread may have stored mail for it meanwhile and left it to
                # us, the drainer: drain it (its sender has synced it; see _settle).
                more = self._stored_gen.get(recipient, 0) != self._empty_gen.get(recipient)
        if more:
            self._drain(recipient)
        return True

    def _settle(self, message_id: bytes) -> None:
        """Before route() or deliver() returns: if the envelope was stored without an
        fsync and its recipient has not taken it (it went offline, another thread is
        draining it, its mail is held), make the store durable now."""
        with self._lock:
            if message_id not in self._unsynced:
                return
            self._unsynced.clear()  # the sync covers every commit so far
        self._store.sync()

    def _drain(self, agent_id: str, stored: StoredEnvelope | None = None) -> None:
        """Hand the recipient its queued envelopes in order, then run its handlers.

        One thread drains an agent at a time; another thread's call returns at once
        (the draining thread takes its envelopes too). A call nested in the draining
        thread (a handler of the agent sent something that came back to it, for
        example a reply to a request() it waits for) hands the envelopes over but
        leaves running the handlers to the outer call, which is between two pages
        then, so order is kept.

        ``stored``: the envelope just stored for the agent. If the queue was empty
        before it and nothing else was stored since, it is the whole queue and is
        handed over as it is, without reading the store; likewise a page is the last
        one if nothing was stored while it was handed over. (Each read of the store
        costs more than the rest of a LocalHub delivery.)
        """
        me = threading.get_ident()
        with self._lock:
            agent = self._online.get(agent_id)
            owner = self._draining.get(agent_id)
            if agent is None or (owner is not None and owner != me):
                return  # offline, or another thread is draining it
            nested = owner == me
            self._draining[agent_id] = me
            generation = self._stored_gen.get(agent_id, 0)
            only_this = (
                stored is not None
                and not nested
                and self._empty_gen.get(agent_id) == generation - 1
            )
        dispatcher = agent if supports(agent, DispatchingEndpoint) and not nested else None
        try:
            after = 0
            page = 256
            while True:
                if only_this:
                    assert stored is not None
                    batch, only_this = [stored], False
                else:
                    with self._lock:
                        generation = self._stored_gen.get(agent_id, 0)
                    batch = self._store.pending(
                        agent_id, after_seq=after, limit=page, now_ms=self._now()
                    )
                for envelope in batch:
                    after = envelope.seq
                    if not self._hand_over(agent, envelope):
                        return
                if dispatcher is not None and batch:
                    dispatcher.dispatch_pending()
                with self._lock:
                    if len(batch) < page and self._stored_gen.get(agent_id, 0) == generation:
                        if not nested:  # a nested call saw part of the queue only
                            self._empty_gen[agent_id] = generation
                        break
        finally:
            if not nested:
                with self._lock:
                    self._draining.pop(agent_id, None)

    def _hand_over(self, agent: HubEndpoint, stored: StoredEnvelope) -> bool:
        """Deliver one stored envelope; False means stop draining (held back for this
        agent)."""
        _, taken = self._take(agent, stored.message_id, stored.sender, stored.body)
        if not taken:
            return False
        # No fsync: an undone deletion only redelivers what the agent drops as a duplicate.
        self._store.ack(agent.agent_id, [stored.message_id], durable=False)
        with self._lock:
            self._unsynced.discard(stored.message_id)
        return True

    def _take(
        self,
        agent: HubEndpoint,
        message_id: bytes,
        sender: str,
        data: bytes,
        *,
        handle: bool = False,
    ) -> tuple[BaseException | None, bool]:
        """Give one envelope to ``agent`` (``handle``: a HandlingEndpoint, which runs its
        handlers too): its verdict (None, or why it refused it, for ``deliver``), and
        whether it took it (False: it holds its mail back)."""
        outcome: BaseException | None = None
        try:
            if handle:
                report = cast(HandlingEndpoint, agent).receive_and_handle(data)
            else:
                report = agent.receive_envelope(data)
            if report.duplicate:
                outcome = ReplayError("message id already delivered")
        except IdentityChangedError as exc:
            log.warning("holding mail for %s: %s", agent.agent_id, exc)
            return None, False
        except (CryptoError, DecodeError) as exc:
            log.warning("dropping an envelope %s could not accept: %s", agent.agent_id, exc)
            outcome = exc
        with self._lock:
            if message_id in self._outcomes:
                self._outcomes[message_id] = outcome
        if isinstance(outcome, CryptoError) and supports(agent, NoticingEndpoint):
            agent.unreadable_envelope(sender, outcome)
        return outcome, True

    # -- queries ------------------------------------------------------------

    def fetch_prekey_bundle(self, agent_id: str) -> bytes:
        """The peer's bundle with one one-time prekey of each kind (each handed out once)."""
        fetched = self._store.fetch_bundle(agent_id, self._now())
        if fetched is None:
            raise PeerNotFoundError(agent_id)
        bundle = PrekeyBundle.decode(fetched.bundle).with_one_time(
            SignedPrekey.decode(fetched.one_time_x25519) if fetched.one_time_x25519 else None,
            SignedPrekey.decode(fetched.one_time_kem) if fetched.one_time_kem else None,
        )
        owner = self._online.get(agent_id)
        if owner is not None and min(fetched.remaining_x25519, fetched.remaining_kem) < 20:
            owner.prekeys_low(min(fetched.remaining_x25519, fetched.remaining_kem))
        return bundle.encode()

    def get_bundle(self, agent_id: str) -> dict[str, Any]:
        """Version 1: a peer's public bundle as a JSON-safe dict."""
        return PrekeyBundle.decode(self.fetch_prekey_bundle(agent_id)).to_dict()

    def list_agents(self) -> list[str]:
        """Every agent id ever registered on this hub."""
        return self._store.list_agents()

    def message_count(self) -> int:
        """The number of messages routed: envelopes this hub accepted for a recipient
        since it was created (version 1's meaning). Duplicates are not counted."""
        with self._lock:
            return self._routed

    def queued_count(self) -> int:
        """Envelopes queued for agents that have not taken them yet (the queue depth)."""
        return self._store.queued_count()

    def close(self) -> None:
        self._store.close()
