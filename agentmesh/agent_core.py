"""The agent core: one identity's sessions, prekeys and pins, with no threads, locks or sockets.

:class:`AgentCore` is what both drivers share (:class:`~agentmesh.agent.Agent`, sync,
and :class:`~agentmesh.async_agent.AsyncAgent`, asyncio, which drives an ``Agent``):

* **identity**: the key pair, the login signature (:meth:`AgentCore.sign_login`);
* **the session cache**: parsed session records by peer, as last committed;
* **the prekey schedule**: rotation, one-time pool top-up, the "publish due" flag
  that a driver turns into a hub call once it holds no lock;
* **"seal this payload for that peer"** (:meth:`AgentCore.seal`): start a session
  from a bundle the driver fetched (trust on first use, identity changes), encrypt,
  and commit the new session state with the outbox row;
* **"open this batch"** (:meth:`AgentCore.open_batch`, :meth:`AgentCore.commit_batch`,
  :meth:`AgentCore.after_commit`): decrypt on copies, then commit sessions, pins,
  prekeys, replay records and inbox rows in one transaction.

Bytes and decisions in, bytes and committed state out: the core never calls a hub,
never waits and never runs user code. The durable state sits behind
:class:`AgentStore`, the few calls the core makes (``agentmesh.state.AgentState``
implements it, on SQLite or in memory). Signature checks of a large batch may be
spread over threads, but only by the driver, through the ``verify_batch`` hook.

Not thread-safe by design: a driver serialises every call (``Agent`` holds its
``_lock`` around each), and holds no lock of its own across a hub call or a handler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair, PublicIdentity, fingerprint_of, safety_number
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.crypto.prekeys import ONE_TIME_LOW_WATER, PrekeyBundle, PrekeySecrets, SignedPrekey
from agentmesh.crypto.ratchet import RatchetLimits
from agentmesh.crypto.session import Session, SessionRecord, SignatureCheck
from agentmesh.errors import (
    AuthenticationError,
    ConfigurationError,
    CryptoError,
    DecodeError,
    IdentityChangedError,
    LocalProtocolError,
    MessageTooLargeError,
    ReplayError,
)
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.protocol.hub_protocol import LOGIN_CONTEXT, ROTATE_CONTEXT
from agentmesh.wire.envelope import decode_envelope
from agentmesh.wire.payload import decode_payload

#: How often the prekey schedule runs at most (rotation, pool top-up), when no
#: receipt forces it.
MAINTENANCE_INTERVAL_MS = 60_000
#: The replay records are pruned every this many received messages.
_FORGET_EVERY = 1024
#: Reserved counters: one durable commit says "this sending chain may reach n + this",
#: and the sends below it commit without waiting for the disk. After an unclean
#: restart each chain jumps past its reservation, so a counter is never used twice
#: (PostgreSQL logs its sequences 32 values ahead for the same reason). Well below
#: the receivers' max_skip (1,000), which absorbs the gap.
RESERVE_AHEAD = 64

#: ``(public key, signature, message)`` triples to verify together.
SignatureChecks = list[tuple[bytes, bytes, bytes]]


@dataclass(frozen=True, slots=True)
class InboxRow:
    """A decrypted message as the inbox keeps it (``seq`` is 0 until committed)."""

    seq: int
    message_id: bytes
    sender: str
    payload: bytes
    timestamp_ms: int
    signature: bytes | None
    #: The envelope as received (``Message.raw_envelope``; its header is the signed one).
    envelope: bytes = b""
    #: The id of the message this one answers (a reply), from inside the ciphertext.
    in_reply_to: bytes | None = None
    #: A control message for the agent itself: it gets a replay record, no inbox row.
    control: bool = False


class AgentStore(Protocol):
    """The durable state the core reads and commits (``agentmesh.state.AgentState``).

    Each ``commit_*`` is one transaction: after a crash the state is before or after it.
    """

    @property
    def path(self) -> Path | None: ...
    #: Whether the state was last closed cleanly (else the core jumps its counters).
    @property
    def opened_clean(self) -> bool: ...
    def session_peers(self) -> list[str]: ...
    def get_meta(self, key: str) -> bytes | None: ...
    def set_meta(self, key: str, value: bytes) -> None: ...
    def session_record(self, peer_id: str) -> bytes | None: ...
    def save_session(self, peer_id: str, record: bytes) -> None: ...
    def pinned_identity(self, peer_id: str) -> tuple[bytes, bytes | None] | None: ...
    def pin(self, peer_id: str, identity: bytes, now_ms: int) -> None: ...
    def set_pending_identity(self, peer_id: str, identity: bytes) -> None: ...
    def repin(self, peer_id: str, identity: bytes, now_ms: int) -> None: ...
    def outbox_to(self, peer_id: str) -> list[bytes]: ...
    def commit_sent(
        self,
        peer_id: str,
        record: bytes,
        message_id: bytes,
        envelope: bytes,
        now_ms: int,
        *,
        pin_identity: bytes | None = None,
        durable: bool = True,
    ) -> None: ...
    def seen_among(self, message_ids: list[bytes]) -> set[bytes]: ...
    def commit_received_batch(
        self,
        records: dict[str, bytes],
        pins: dict[str, bytes],
        prekeys: bytes | None,
        messages: list[InboxRow],
        now_ms: int,
        *,
        durable: bool = True,
    ) -> None: ...
    def forget_seen_before(self, cutoff_ms: int) -> int: ...


def verify_each(checks: SignatureChecks) -> bool:
    """Whether every ``(key, signature, message)`` verifies (the core's default
    ``verify_batch``: in the calling thread)."""
    try:
        for key, signature, message in checks:
            p.ed25519_verify(key, signature, message)
    except CryptoError:
        return False
    return True


@dataclass
class OpenedBatch:
    """What :meth:`AgentCore.open_batch` decrypted, for :meth:`AgentCore.commit_batch`.

    ``outcomes`` has one entry per envelope, in order: a DeliveryReport, or the
    exception that envelope raised (it changed nothing). ``messages`` are the rows to
    commit (controls included); nothing of it is durable until ``commit_batch``.
    """

    prekeys: PrekeySecrets
    outcomes: list[DeliveryReport | Exception] = field(default_factory=list)
    records: dict[str, SessionRecord] = field(default_factory=dict)
    pins: dict[str, bytes] = field(default_factory=dict)
    ids: set[bytes] = field(default_factory=set)
    messages: list[InboxRow] = field(default_factory=list)
    committed: bool = False

    def failed(self, error: Exception) -> list[DeliveryReport | Exception]:
        """The outcomes if the commit failed with ``error``: each envelope that was to be
        committed gets it (duplicates and refusals keep theirs)."""
        return [
            error if isinstance(o, DeliveryReport) and not o.duplicate else o for o in self.outcomes
        ]


class AgentCore:
    """One agent's identity, sessions and prekeys over an :class:`AgentStore`.

    ``sign_messages``/``require_signatures`` fix the signing mode of the sessions it
    starts and what it accepts (see :class:`~agentmesh.agent.Agent`); ``clock`` gives
    milliseconds since the epoch and ``rng`` random bytes (test hooks). Raises
    ConfigurationError if ``store`` belongs to another identity.
    """

    def __init__(
        self,
        agent_id: str,
        keypair: AgentKeyPair,
        store: AgentStore,
        *,
        sign_messages: bool,
        require_signatures: bool,
        limits: RatchetLimits,
        replay_window_ms: int,
        pool_size: int,
        clock: Callable[[], int],
        rng: p.RandomBytes,
        verify_batch: Callable[[SignatureChecks], bool] = verify_each,
    ) -> None:
        self.agent_id = agent_id
        self.keypair = keypair
        self.identity: IdentityKeyPair = keypair.identity
        self.store = store
        self.require_signatures = require_signatures
        #: The signing mode of the sessions this agent starts.
        self.sign_messages = sign_messages or require_signatures
        self._limits = limits
        self._replay_window_ms = replay_window_ms
        self._pool_size = pool_size
        self._clock = clock
        self._rng = rng
        self._verify_batch = verify_batch
        #: Parsed session records by peer, as last committed (saves a parse per message).
        self._records: dict[str, SessionRecord] = {}
        #: The prekeys changed and the hub has not been told yet (see take_publish_due).
        self._publish_due = False
        self._received = 0
        self._last_maintenance_ms = clock()
        self._check_store_owner()
        self._prekeys = self._load_prekeys()
        #: How many sending chains the last unclean restart moved past their reservation.
        self.chains_jumped = 0 if store.opened_clean else self._jump_reserved_counters()

    # -- identity -----------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def signing_public_key(self) -> bytes:
        return self.identity.public.signing

    @property
    def ephemeral(self) -> bool:
        """No key file: the identity dies with the process, so hubs bind it ephemerally."""
        return self.store.path is None

    @property
    def prekeys(self) -> PrekeySecrets:
        """The prekey secrets as last committed (read-only use)."""
        return self._prekeys

    def sign_login(self, challenge: bytes) -> bytes:
        """Sign a hub login or key-rotation challenge, and nothing else.

        Raises LocalProtocolError for bytes without a hub-protocol context, so a hub
        (or anyone holding the endpoint) cannot get arbitrary data signed.
        """
        if not challenge.startswith((LOGIN_CONTEXT, ROTATE_CONTEXT)):
            raise LocalProtocolError("refusing to sign bytes that are not a hub login challenge")
        return self.identity.sign(challenge)

    def public_bundle(self) -> dict[str, Any]:
        return self._prekeys.bundle(self.agent_id, self.identity.public).to_dict()

    def safety_number(self, peer_id: str) -> str:
        pinned = self.store.pinned_identity(peer_id)
        if pinned is None:
            raise ValueError(f"No pinned identity for peer {peer_id!r}: exchange a message first")
        peer = PublicIdentity.decode(pinned[0])
        return safety_number(self.agent_id, self.identity.public.signing, peer_id, peer.signing)

    def _check_store_owner(self) -> None:
        """Refuse a state file that belongs to another identity (e.g. a replaced key file)."""
        mine = self.identity.public.encode()
        owner = self.store.get_meta("identity")
        if owner is None:
            self.store.set_meta("identity", mine)
        elif not p.constant_time_equal(owner, mine):
            raise ConfigurationError(
                f"state file {self.store.path} belongs to identity "
                f"{fingerprint_of(PublicIdentity.decode(owner).signing)}, not to this key file's "
                f"{self.fingerprint}; move the old state file away to start afresh"
            )

    # -- pins ---------------------------------------------------------------

    @staticmethod
    def matching_identity(wanted: bytes, *candidates: bytes | None) -> bytes | None:
        """The first encoded identity among ``candidates`` whose fingerprint is ``wanted``."""
        for candidate in candidates:
            if candidate is not None and p.constant_time_equal(
                PublicIdentity.decode(candidate).fingerprint.encode(), wanted
            ):
                return candidate
        return None

    def repin(self, peer_id: str, identity: bytes) -> list[bytes]:
        """Pin ``identity`` for ``peer_id`` in place of the old one and drop the old
        sessions. Returns the ids of outbox envelopes sealed for the old key (no one
        holding the new one can read them: the driver dead-letters them)."""
        self.store.repin(peer_id, identity, self._clock())
        self._records.pop(peer_id, None)
        return self.store.outbox_to(peer_id)

    def check_pin(self, peer_id: str, identity: PublicIdentity) -> bytes | None:
        """TOFU: return the identity to pin if new; raise IdentityChangedError if it differs.

        ``identity`` must come from a verified bundle: a different one is recorded
        as the peer's pending identity, which ``trust()`` may then pin.
        """
        encoded = identity.encode()
        pinned = self.store.pinned_identity(peer_id)
        if pinned is None:
            return encoded
        if not p.constant_time_equal(PublicIdentity.decode(pinned[0]).signing, identity.signing):
            self.store.set_pending_identity(peer_id, encoded)
            _raise_identity_changed(peer_id, pinned[0], encoded)
        return None

    # -- sessions -----------------------------------------------------------

    def record(self, peer_id: str) -> SessionRecord | None:
        """The peer's committed session record (parsed once, then cached)."""
        record = self._records.get(peer_id)
        if record is None:
            raw = self.store.session_record(peer_id)
            if raw is None:
                return None
            record = self._records[peer_id] = SessionRecord.from_bytes(raw)
        return record

    def can_send_to(self, peer_id: str) -> bool:
        """Whether a session with ``peer_id`` can send now (no bundle needed)."""
        record = self.record(peer_id)
        active = None if record is None else record.active
        return active is not None and active.ratchet.can_send

    def _sending_record(
        self, peer_id: str, bundle: PrekeyBundle | None, *, fresh: bool = False
    ) -> tuple[SessionRecord, bytes | None]:
        """The peer's session record with an active session that can send.

        Starts a new session from ``bundle`` if there is none (or, if ``fresh``, in any
        case). Returns the record and the identity to pin (None if already pinned).
        """
        record = self.record(peer_id) or SessionRecord()
        pinned = self.store.pinned_identity(peer_id)
        if pinned is not None and pinned[1] is not None:
            _raise_identity_changed(peer_id, pinned[0], pinned[1])
        if not fresh and record.active is not None and record.active.ratchet.can_send:
            return record, None
        if bundle is None:
            raise LocalProtocolError(f"no session with {peer_id!r} can send: a bundle is needed")
        pin = self.check_pin(peer_id, bundle.identity)
        return record.promote(self._initiate(bundle)), pin

    def _initiate(self, bundle: PrekeyBundle) -> Session:
        """A new session from a verified bundle (PQXDH), in this agent's signing mode."""
        return Session.initiate(
            self.identity,
            self.agent_id,
            bundle,
            sign_messages=self.sign_messages,
            limits=self._limits,
            rng=self._rng,
        )

    def connect(self, peer_id: str, bundle: PrekeyBundle | None) -> None:
        """Make sure a session with ``peer_id`` can send, from ``bundle`` if needed
        (verified by the caller), and commit it."""
        record, pin = self._sending_record(peer_id, bundle)
        if pin is not None:
            self.store.pin(peer_id, pin, self._clock())
        self.store.save_session(peer_id, record.to_bytes())
        self._records[peer_id] = record

    def connect_with_bundle(self, bundle: PrekeyBundle) -> None:
        """Start a new session from a verified bundle handed over directly, and commit it."""
        peer_id = bundle.agent_id
        pin = self.check_pin(peer_id, bundle.identity)
        record = (self.record(peer_id) or SessionRecord()).promote(self._initiate(bundle))
        if pin is not None:
            self.store.pin(peer_id, pin, self._clock())
        self.store.save_session(peer_id, record.to_bytes())
        self._records[peer_id] = record

    def _jump_reserved_counters(self) -> int:
        """After an unclean restart: move every sending chain past its reservation.

        The sends below a reservation committed without waiting for the disk, so a
        power cut may have rolled a chain back below counters that already left this
        machine. Skipping to the reservation (each one was durable before any counter
        under it was used) means no message key is used twice; the receiver sees a
        gap of at most RESERVE_AHEAD. Returns how many chains moved.
        """
        jumped = 0
        for peer_id in self.store.session_peers():
            record = self.record(peer_id)
            if record is None:
                continue
            sessions = []
            moved = False
            for session in record.sessions:
                ratchet = session.ratchet
                if ratchet.can_send and ratchet.ns < ratchet.reserved:
                    session = session.copy()
                    session.ratchet.skip_sending(ratchet.reserved - ratchet.ns)
                    jumped += 1
                    moved = True
                sessions.append(session)
            if moved:
                new_record = SessionRecord(sessions)
                self.store.save_session(peer_id, new_record.to_bytes())
                self._records[peer_id] = new_record
        return jumped

    def seal(
        self,
        recipient_id: str,
        plaintext: bytes,
        bundle: PrekeyBundle | None,
        *,
        message_id: bytes,
        in_reply_to: bytes | None = None,
        control: bool = False,
        limit: int | None = None,
        durable: bool = True,
    ) -> bytes:
        """Encrypt ``plaintext`` (an encoded payload) for ``recipient_id`` and commit the
        new session state with the envelope's outbox row, in one transaction. Returns the
        envelope's bytes, for the driver to transmit.

        Uses the session that can send, or starts one from ``bundle`` (always, if
        ``control``: a control message opens a fresh session that any holder of the
        peer's current identity can read). ``limit``: the hub's largest envelope;
        a bigger one raises MessageTooLargeError before anything is encrypted or
        committed.

        Durability: the sending counter lies below the chain's reservation, or the
        reservation moves RESERVE_AHEAD ahead in this same commit, which is then
        durable (fsynced) whatever ``durable`` says; a commit below the reservation
        waits for the disk only if ``durable``. Either way it survives a crash of the
        process at once, and no counter is reused after a power cut (see
        RESERVE_AHEAD). ``durable=True`` additionally keeps the outbox row through a
        power cut. Raises IdentityChangedError (nothing committed but the pending
        identity), LocalProtocolError if a bundle is needed and none was given.
        """
        record, pin = self._sending_record(recipient_id, bundle, fresh=control)
        session = record.active
        assert session is not None  # _sending_record: an active session that can send
        session = session.copy()
        reserve = session.ratchet.ns >= session.ratchet.reserved
        if reserve:
            session.ratchet.reserved = session.ratchet.ns + RESERVE_AHEAD
        if limit:
            size = session.envelope_size(len(plaintext), reply=in_reply_to is not None)
            if size > limit:
                raise MessageTooLargeError(size, limit)
        envelope = session.encrypt(
            self.identity,
            plaintext,
            message_id=message_id,
            timestamp_ms=self._clock(),
            in_reply_to=in_reply_to,
            control=control,
        )
        data = envelope.to_bytes()
        new_record = record.promote(session, replaces=record.active)
        self.store.commit_sent(
            recipient_id,
            new_record.to_bytes(),
            message_id,
            data,
            self._clock(),
            pin_identity=pin,
            durable=durable or reserve,
        )
        self._records[recipient_id] = new_record
        return data

    # -- receiving ----------------------------------------------------------

    def open_batch(self, items: list[bytes], *, parallel: bool = False) -> OpenedBatch:
        """Decrypt ``items`` in order, each on top of what the previous ones left.
        Nothing is committed: :meth:`commit_batch` does that.

        ``parallel``: collect the signatures of normal envelopes and check them all
        with ``verify_batch`` (the driver may spread that over threads); if any fails,
        the batch is decrypted again checking one by one, so that a bad signature ends
        exactly as it would have otherwise.
        """
        now = self._clock()
        seen = self.store.seen_among([bytes(data[2:18]) for data in items])
        if parallel:
            opened = self._decrypt_all(items, now, seen, deferred=True)
            if opened is not None:
                return opened
        opened = self._decrypt_all(items, now, seen, deferred=False)
        assert opened is not None  # only a deferred pass gives up
        return opened

    def commit_batch(self, batch: OpenedBatch, *, durable: bool = True) -> bool:
        """Commit what :meth:`open_batch` decrypted, in ONE transaction: sessions, pins,
        prekeys, replay records and inbox rows. Raises what the store raised (then
        nothing is committed; see :meth:`OpenedBatch.failed`). Then call
        :meth:`after_commit`. Returns whether the commit was durable.

        ``durable=False`` (for a driver whose handlers run before the delivery
        returns; see ``Agent._receive_and_handle``) commits without waiting for the
        disk, unless the batch changes the prekey secrets (every new session does:
        PQXDH consumes its prekeys) or pins a peer: losing one of those to a power
        cut would break the session or let a prekey serve twice, so they are durable
        whatever ``durable`` says. Losing a relaxed commit only rolls a receiving
        chain back, and the sender's next message skips it forward (a DH ratchet step
        taken here is re-derived alike: the first send on its new sending chain
        reserves counters durably, which syncs it).
        """
        prekeys = batch.prekeys.to_bytes() if batch.prekeys is not self._prekeys else None
        durable = durable or bool(batch.pins) or prekeys is not None
        self.store.commit_received_batch(
            {peer: record.to_bytes() for peer, record in batch.records.items()},
            batch.pins,
            prekeys,
            batch.messages,
            self._clock(),
            durable=durable,
        )
        self._records.update(batch.records)
        batch.committed = True
        return durable

    def after_commit(self, batch: OpenedBatch) -> None:
        """Housekeeping once ``batch`` is committed: run the prekey schedule if a
        one-time key was consumed (or it is due), prune old replay records now and
        then. Its errors are the store's, and the messages stay committed."""
        if not batch.committed:
            raise LocalProtocolError("after_commit() of a batch that was not committed")
        if batch.prekeys is not self._prekeys:
            self._prekeys = batch.prekeys
            self.maintain_prekeys()
        before, self._received = self._received, self._received + len(batch.messages)
        self.maintain_prekeys_if_due()
        if before // _FORGET_EVERY != self._received // _FORGET_EVERY:
            self.store.forget_seen_before(self._clock() - self._replay_window_ms)

    def _decrypt_all(
        self, items: list[bytes], now: int, seen: set[bytes], *, deferred: bool
    ) -> OpenedBatch | None:
        batch = OpenedBatch(self._prekeys, ids=set(seen))
        checks: SignatureChecks = []
        check: SignatureCheck = (
            (lambda *args: checks.append(args)) if deferred else p.ed25519_verify
        )
        for data in items:
            try:
                batch.outcomes.append(self._decrypt_into(batch, data, now, check))
            except Exception as exc:
                batch.outcomes.append(exc)
        if checks and not self._verify_batch(checks):
            return None
        return batch

    def _decrypt_into(
        self,
        batch: OpenedBatch,
        data: bytes,
        now: int,
        check_signature: SignatureCheck = p.ed25519_verify,
    ) -> DeliveryReport:
        """Decrypt one envelope on top of ``batch`` and add it there."""
        envelope = decode_envelope(bytes(data))
        if envelope.recipient != self.agent_id:
            raise AuthenticationError(f"envelope is addressed to {envelope.recipient!r}")
        if envelope.message_id in batch.ids:  # committed before, or earlier in this batch
            return DeliveryReport(accepted=True, duplicate=True)
        if envelope.timestamp < now - self._replay_window_ms:
            raise ReplayError("message is older than the replay window")
        sender = envelope.sender
        pin = None
        changed: bytes | None = None
        new_pin = batch.pins.get(sender)
        pinned = (new_pin, None) if new_pin is not None else self.store.pinned_identity(sender)
        if envelope.prekey is not None:
            presented = PublicIdentity(
                envelope.prekey.identity_signing,
                envelope.prekey.identity_exchange,
                envelope.prekey.identity_binding,
            ).encode()
            if pinned is None:
                pin = presented
            elif not p.constant_time_equal(
                PublicIdentity.decode(pinned[0]).signing, envelope.prekey.identity_signing
            ):
                changed = presented  # recorded below, only if the envelope decrypts
        elif pinned is not None and pinned[1] is not None:
            _raise_identity_changed(sender, pinned[0], pinned[1])
        record = batch.records.get(sender) or self.record(sender) or SessionRecord()
        new_record, new_prekeys, message = record.decrypt(
            envelope,
            identity=self.identity,
            prekeys=batch.prekeys,
            require_signatures=self.require_signatures,
            limits=self._limits,
            rng=self._rng,
            check_signature=check_signature,
        )
        try:
            decode_payload(message.payload)
        except DecodeError as exc:
            raise CryptoError("message payload is not a JSON object") from exc
        if changed is not None and pinned is not None:
            # A forged or tampered envelope must not mark the peer as changed
            # (and block the conversation): only one that decrypts does.
            self.store.set_pending_identity(sender, changed)
            _raise_identity_changed(sender, pinned[0], changed)
        batch.records[sender] = new_record
        if pin is not None:
            batch.pins[sender] = pin
        if new_prekeys is not None:
            batch.prekeys = new_prekeys
        batch.ids.add(envelope.message_id)
        batch.messages.append(
            InboxRow(
                0,
                envelope.message_id,
                sender,
                message.payload,
                envelope.timestamp,
                message.signature,
                bytes(data),
                message.in_reply_to,
                message.control,
            )
        )
        return DeliveryReport(accepted=True)

    # -- the prekey schedule ------------------------------------------------

    def _load_prekeys(self) -> PrekeySecrets:
        raw = self.store.get_meta("prekeys")
        if raw is not None:
            prekeys = PrekeySecrets.from_bytes(raw)
            changed = prekeys.rotate(self.identity, self._clock(), self._rng)
        else:
            prekeys = PrekeySecrets.create(self.identity, self._clock(), self._rng)
            changed = True
        if prekeys.top_up(self.identity, self._clock(), self._rng, pool_size=self._pool_size):
            changed = True
        if changed:
            self.store.set_meta("prekeys", prekeys.to_bytes())
        return prekeys

    def _save_prekeys(self) -> None:
        self.store.set_meta("prekeys", self._prekeys.to_bytes())

    def prekey_bundle_bytes(self) -> bytes:
        """The signed bundle to publish (rotating the signed prekey first if it is due)."""
        if self._prekeys.rotate(self.identity, self._clock(), self._rng):
            self._save_prekeys()
        return self._prekeys.bundle(self.agent_id, self.identity.public).encode()

    def one_time_prekeys(self) -> list[bytes]:
        """The one-time prekeys the hub does not have yet, encoded."""
        return [k.encode() for k in self._prekeys.unpublished_prekeys()]

    def one_time_prekeys_uploaded(self, encoded: list[bytes]) -> None:
        """The hub stored these one-time prekeys."""
        self._prekeys.mark_published([SignedPrekey.decode(e).prekey_id for e in encoded])
        self._save_prekeys()

    def prekeys_low(self, remaining: int) -> None:
        """The hub has ``remaining`` one-time prekeys left: make fresh ones (rate-limited)."""
        # The keys the hub handed out are gone from it even if never used (a drain
        # by bundle fetches): publish fresh ones, or the pool stays empty for good.
        made = self._prekeys.replenish(
            self.identity,
            self._clock(),
            self._rng,
            remaining=remaining,
            pool_size=self._pool_size,
        )
        if made:  # 0: rate-limited (a report flood); rotate() carries it out later
            self.maintain_prekeys(force=True)

    def maintain_prekeys_if_due(self) -> None:
        """Run the prekey schedule at most once a minute, so a long-running agent
        rotates its signed prekeys on time even if it never logs in again."""
        now = self._clock()
        if now - self._last_maintenance_ms < MAINTENANCE_INTERVAL_MS:
            return
        self._last_maintenance_ms = now
        self.maintain_prekeys()

    def maintain_prekeys(self, *, force: bool = False) -> None:
        """Top the one-time pool up (and rotate) when it runs low; the hub hears of it
        once the driver sees :meth:`take_publish_due`."""
        low = min(len(self._prekeys.one_time), len(self._prekeys.one_time_kem)) < min(
            ONE_TIME_LOW_WATER, self._pool_size
        )
        rotated = self._prekeys.rotate(self.identity, self._clock(), self._rng)
        if low or force:
            self._prekeys.top_up(self.identity, self._clock(), self._rng, pool_size=self._pool_size)
        if low or force or rotated:
            self._save_prekeys()
            self._publish_due = True

    def take_publish_due(self) -> bool:
        """Whether the prekeys changed since the hub was last told; clears the flag
        (give it back with :meth:`publish_failed` if telling the hub failed)."""
        due, self._publish_due = self._publish_due, False
        return due

    def publish_failed(self) -> None:
        """The hub could not be told: the next :meth:`take_publish_due` says so again."""
        self._publish_due = True

    def __repr__(self) -> str:
        return f"AgentCore({self.agent_id!r}, fingerprint={self.fingerprint!r})"


def _raise_identity_changed(peer_id: str, pinned: bytes, new: bytes) -> None:
    raise IdentityChangedError(
        peer_id,
        fingerprint_of(PublicIdentity.decode(pinned).signing),
        fingerprint_of(PublicIdentity.decode(new).signing),
    )
