"""Prekeys and prekey bundles (PQXDH rev 3, section 3.2 "Publishing keys").

Public side:

* :class:`SignedPrekey` -- one X25519 or ML-KEM-768 public prekey with its id
  and an Ed25519 signature by the owner's identity key. Every prekey is signed,
  including one-time X25519 prekeys (the spec leaves those unsigned; signing
  them costs nothing and lets the hub be checked too).
* :class:`PrekeyBundle` -- what a sender fetches: identity, signed X25519
  prekey ``SPK``, one ML-KEM-768 prekey (a one-time ``PQOPK`` if the hub had
  one, else the last-resort ``PQSPK``) and optionally a one-time X25519 ``OPK``.

Private side: :class:`PrekeySecrets` holds every prekey private key, rotates
the signed ones on a schedule, keeps retired ones for a grace period (so
initial messages already in flight still decrypt) and then erases them.
One-time private keys are erased as soon as a session built on them commits.

Prekey ids (u32 on the wire, section 3.2 leaves their form to us) are
``epoch << 16 | counter``. :meth:`PrekeySecrets.create` draws the 16-bit epoch
(1..65535) and the counter's start (0..65535) from the injected ``rng``; later
ids count up within that epoch, wrap inside it and skip ids still held. Why: an
agent that lost its state file used to restart at id 1, the hub kept its stale
one-time prekeys under those ids and ignored the re-upload of new keys with the
same ids, so first messages on them could not be decrypted (finding F-9). Now
a new state's ids differ from the lost one's unless both drew the same epoch
(probability 1/65535 per loss) and overlapping counter ranges. The epoch
also marks stale keys: a one-time prekey whose epoch differs from the published
signed prekey's belongs to a lost state, and :meth:`PrekeyBundle.with_one_time`
(how hubs compose bundles) leaves it out: the hub still deletes it, so stale
keys drain, while that sender gets a last-resort bundle that works. Serialized
states from before (epoch 0, ids from 1) keep loading and counting in epoch 0.

Replay of a last-resort initial message (no one-time prekey ``OPK``; PQXDH
section 4.2 "Protocol replay" suggests blacklisting observed messages, libsignal
refuses them with ``ReusedBaseKeyException``): :meth:`PrekeySecrets.check_base_key`
refuses an initial message whose base key ``EK_A`` was already accepted with the
same signed prekey; :meth:`PrekeySecrets.record_base_key` remembers it, at most
:data:`MAX_BASE_KEYS_PER_SIGNED_PREKEY` per signed prekey (the oldest is forgotten
first, so a flood of new last-resort sessions is never refused), until that
signed prekey is erased. Beyond the bound, the agent's message-id window remains.

Replenishment after ``PREKEYS_LOW`` is rate-limited (:meth:`PrekeySecrets.replenish`):
the first runs at once, then at most one per :data:`REPLENISH_MIN_INTERVAL_MS`
(20 min), so a flood of reports makes at most one pool of each kind per
interval, and no one-time key is erased less than
``(ONE_TIME_KEEP_FACTOR - 1) * REPLENISH_MIN_INTERVAL_MS`` (1 h) after it was made.

No I/O; the clock (``now_ms``) and randomness (``rng``) are passed in.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, replace
from typing import Any

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair, PublicIdentity
from agentmesh.errors import DecodeError, InvalidKeyError, LocalProtocolError, ReplayError
from agentmesh.ids import InvalidAgentIdError, validate_agent_id
from agentmesh.wire.codec import Reader, Writer

KIND_X25519 = 1
KIND_KEM = 2
_PUBLIC_LEN = {KIND_X25519: p.X25519_KEY_LEN, KIND_KEM: p.MLKEM768_PUBLIC_LEN}
_PREKEY_CONTEXT = b"AgentMesh-prekey-v1"
BUNDLE_VERSION = 1

#: Defaults (see docs/PROTOCOL.md, "Prekeys").
SIGNED_PREKEY_ROTATION_MS = 7 * 24 * 3600 * 1000
SIGNED_PREKEY_GRACE_MS = 14 * 24 * 3600 * 1000
ONE_TIME_POOL_SIZE = 100
ONE_TIME_LOW_WATER = 20
#: One-time private keys kept per kind, in pools: handed-out keys wait for their
#: initial message until this many newer ones exist (see ``PrekeySecrets.replenish``).
ONE_TIME_KEEP_FACTOR = 4
#: After a replenishment, the next one runs no sooner than this (a report inside the
#: interval waits for it). Erasing a one-time key takes ONE_TIME_KEEP_FACTOR newer
#: pools, so this also keeps every one-time key for at least 3 * 20 min = 1 h.
REPLENISH_MIN_INTERVAL_MS = 20 * 60 * 1000
#: Base keys of last-resort initial messages remembered per signed prekey (32 bytes
#: each: 64 KiB per signed prekey, at most three of which are alive at a time).
MAX_BASE_KEYS_PER_SIGNED_PREKEY = 2048

_STATE_VERSION = 2
_EPOCH_SHIFT = 16
_COUNTER_MASK = (1 << _EPOCH_SHIFT) - 1
#: Never handed out: 0 means "none" in ``current_*_id``; 0xFFFFFFFF was never used.
_RESERVED_IDS = (0, 0xFFFFFFFF)


def prekey_epoch(prekey_id: int) -> int:
    """The epoch of a prekey id: the same for every prekey of one PrekeySecrets."""
    return prekey_id >> _EPOCH_SHIFT


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise DecodeError(f"bundle: {what} must be a base64 string")
    try:
        return base64.urlsafe_b64decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise DecodeError(f"bundle: {what} is not valid base64") from exc


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    """A public prekey, its id, and the identity key's signature over both."""

    kind: int
    prekey_id: int
    public: bytes
    signature: bytes

    @staticmethod
    def signed_message(kind: int, prekey_id: int, public: bytes) -> bytes:
        return Writer().raw(_PREKEY_CONTEXT).u8(kind).u32(prekey_id).raw(public).getvalue()

    @classmethod
    def create(
        cls, identity: IdentityKeyPair, kind: int, prekey_id: int, public: bytes
    ) -> SignedPrekey:
        return cls(
            kind, prekey_id, public, identity.sign(cls.signed_message(kind, prekey_id, public))
        )

    def verify(self, signing_key: bytes) -> SignedPrekey:
        """Check length, point validity and signature; raise CryptoError subclasses."""
        if self.kind not in _PUBLIC_LEN or len(self.public) != _PUBLIC_LEN[self.kind]:
            raise InvalidKeyError("prekey has the wrong kind or length")
        if self.kind == KIND_X25519:
            p.validate_x25519_public(self.public)
        p.ed25519_verify(
            signing_key, self.signature, self.signed_message(self.kind, self.prekey_id, self.public)
        )
        return self

    def encode(self) -> bytes:
        return self.write(Writer()).getvalue()

    def write(self, w: Writer) -> Writer:
        return w.u8(self.kind).u32(self.prekey_id).bytes16(self.public).raw(self.signature)

    @classmethod
    def read(cls, r: Reader) -> SignedPrekey:
        kind = r.u8()
        if kind not in _PUBLIC_LEN:
            raise DecodeError(f"prekey: unknown kind {kind}")
        prekey_id = r.u32()
        public = r.bytes16(p.MLKEM768_PUBLIC_LEN)
        if len(public) != _PUBLIC_LEN[kind]:
            raise DecodeError("prekey: wrong public key length")
        return cls(kind, prekey_id, public, r.raw(64))

    @classmethod
    def decode(cls, data: bytes) -> SignedPrekey:
        r = Reader(data, "prekey")
        prekey = cls.read(r)
        r.finish()
        return prekey

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.prekey_id,
            "public": _b64(self.public),
            "signature": _b64(self.signature),
        }


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """An agent's public bundle as a sender receives it (PQXDH rev 3, section 3.2)."""

    agent_id: str
    identity: PublicIdentity
    signed_prekey: SignedPrekey
    kem_prekey: SignedPrekey
    one_time_prekey: SignedPrekey | None = None

    def verify(self) -> PrekeyBundle:
        """Verify every signature and key; a single failure aborts (raises CryptoError)."""
        self.identity.verify()
        if self.signed_prekey.kind != KIND_X25519 or self.kem_prekey.kind != KIND_KEM:
            raise InvalidKeyError("bundle prekeys have the wrong kinds")
        self.signed_prekey.verify(self.identity.signing)
        self.kem_prekey.verify(self.identity.signing)
        if self.one_time_prekey is not None:
            if self.one_time_prekey.kind != KIND_X25519:
                raise InvalidKeyError("one-time prekey must be X25519")
            self.one_time_prekey.verify(self.identity.signing)
        return self

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def encode(self) -> bytes:
        w = Writer().u8(BUNDLE_VERSION).str8(self.agent_id).raw(self.identity.encode())
        self.signed_prekey.write(w)
        self.kem_prekey.write(w)
        if self.one_time_prekey is None:
            w.u8(0)
        else:
            self.one_time_prekey.write(w.u8(1))
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> PrekeyBundle:
        """Parse strictly (no verification: call :meth:`verify`). Raises DecodeError."""
        r = Reader(data, "bundle")
        if r.u8() != BUNDLE_VERSION:
            raise DecodeError("bundle: unsupported version")
        try:
            agent_id = validate_agent_id(r.str8(64))
        except InvalidAgentIdError as exc:
            raise DecodeError(f"bundle: {exc}") from exc
        identity = PublicIdentity.read(r)
        spk = SignedPrekey.read(r)
        kem = SignedPrekey.read(r)
        flag = r.u8()
        if flag not in (0, 1):
            raise DecodeError("bundle: bad one-time prekey flag")
        opk = SignedPrekey.read(r) if flag else None
        r.finish()
        return cls(agent_id, identity, spk, kem, opk)

    def with_one_time(
        self, one_time_x25519: SignedPrekey | None, one_time_kem: SignedPrekey | None
    ) -> PrekeyBundle:
        """The bundle a hub hands out: the published one plus one-time keys it popped.

        A one-time key from another id epoch than the signed prekey belongs to a
        state its owner has lost (see the module docstring): it is left out, so the
        sender falls back to the last-resort keys instead of a key nobody can use.
        """
        epoch = prekey_epoch(self.signed_prekey.prekey_id)
        if one_time_x25519 is not None and prekey_epoch(one_time_x25519.prekey_id) != epoch:
            one_time_x25519 = None
        if one_time_kem is not None and prekey_epoch(one_time_kem.prekey_id) != epoch:
            one_time_kem = None
        return replace(
            self,
            one_time_prekey=one_time_x25519,
            kem_prekey=one_time_kem if one_time_kem is not None else self.kem_prekey,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (version 1's ``public_bundle`` shape, extended)."""
        out: dict[str, Any] = {
            "agent_id": self.agent_id,
            "identity_public": _b64(self.identity.signing),
            "exchange_public": _b64(self.identity.exchange),
            "identity_binding": _b64(self.identity.binding),
            "fingerprint": self.fingerprint,
            "signed_prekey": self.signed_prekey.to_dict(),
            "kem_prekey": self.kem_prekey.to_dict(),
            "bundle": _b64(self.encode()),
        }
        if self.one_time_prekey is not None:
            out["one_time_prekey"] = self.one_time_prekey.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrekeyBundle:
        """Parse the dict made by :meth:`to_dict` (the ``bundle`` field is authoritative)."""
        if not isinstance(data, dict) or "bundle" not in data:
            raise DecodeError("bundle: dict has no 'bundle' field")
        return cls.decode(_unb64(data["bundle"], "bundle"))


def compose_bundle(
    published: bytes, one_time_x25519: bytes | None, one_time_kem: bytes | None
) -> bytes:
    """Hub-side helper: combine a published bundle with popped one-time prekeys."""
    bundle = PrekeyBundle.decode(published)
    opk = SignedPrekey.decode(one_time_x25519) if one_time_x25519 is not None else None
    kem = SignedPrekey.decode(one_time_kem) if one_time_kem is not None else None
    return bundle.with_one_time(opk, kem).encode()


@dataclass(slots=True)
class _SignedSecret:
    private: bytes  # X25519 raw private key, or ML-KEM-768 64-byte seed
    public: SignedPrekey
    created_ms: int
    retired_ms: int | None = None


@dataclass(slots=True)
class PrekeySecrets:
    """All prekey private keys of one identity, and the schedule that rotates them.

    Mutating methods change this object in place; callers that need
    transactional behaviour work on :meth:`copy` and keep it only on success.
    """

    next_id: int = 1
    signed: dict[int, _SignedSecret] = field(default_factory=dict)
    last_resort: dict[int, _SignedSecret] = field(default_factory=dict)
    one_time: dict[int, _SignedSecret] = field(default_factory=dict)
    one_time_kem: dict[int, _SignedSecret] = field(default_factory=dict)
    current_signed_id: int = 0
    current_last_resort_id: int = 0
    #: one-time public prekeys the hub has not stored yet
    unpublished: list[int] = field(default_factory=list)
    #: when :meth:`replenish` last made keys (None: never)
    last_replenish_ms: int | None = None
    #: ``(missing, pool_size)`` of a report the rate limit held back; :meth:`rotate`
    #: carries it out once the interval is over (a hub reports a low pool only once)
    deferred_replenish: tuple[int, int] | None = None
    #: signed prekey id -> base keys (EK_A) of the initial messages accepted on it
    #: without a one-time prekey, oldest first (a dict used as an ordered set)
    base_keys: dict[int, dict[bytes, None]] = field(default_factory=dict)

    def copy(self) -> PrekeySecrets:
        return PrekeySecrets(
            self.next_id,
            {k: replace(v) for k, v in self.signed.items()},
            {k: replace(v) for k, v in self.last_resort.items()},
            dict(self.one_time),
            dict(self.one_time_kem),
            self.current_signed_id,
            self.current_last_resort_id,
            list(self.unpublished),
            self.last_replenish_ms,
            self.deferred_replenish,
            {k: dict(v) for k, v in self.base_keys.items()},
        )

    def _id_in_use(self, prekey_id: int) -> bool:
        return any(
            prekey_id in table
            for table in (self.signed, self.last_resort, self.one_time, self.one_time_kem)
        )

    def _new_id(self) -> int:
        """The next free id of this state's epoch; the counter wraps within the epoch."""
        epoch_bits = self.next_id & ~_COUNTER_MASK
        for _ in range(_COUNTER_MASK + 1):
            prekey_id = self.next_id
            self.next_id = epoch_bits | ((prekey_id + 1) & _COUNTER_MASK)
            # Skipping held ids matters only after a wrap: 65,536 ids per epoch.
            if prekey_id not in _RESERVED_IDS and not self._id_in_use(prekey_id):
                return prekey_id
        raise LocalProtocolError("no free prekey id left in this epoch")

    def _make(
        self, identity: IdentityKeyPair, kind: int, now_ms: int, rng: p.RandomBytes
    ) -> _SignedSecret:
        prekey_id = self._new_id()
        if kind == KIND_X25519:
            key = p.x25519_generate(rng)
            private, public = p.x25519_private_bytes(key), p.x25519_public_bytes(key)
        else:
            kem = p.mlkem_generate(rng)
            private, public = p.mlkem_private_seed(kem), p.mlkem_public_bytes(kem)
        return _SignedSecret(
            private, SignedPrekey.create(identity, kind, prekey_id, public), now_ms
        )

    @classmethod
    def create(
        cls, identity: IdentityKeyPair, now_ms: int, rng: p.RandomBytes = p.random_bytes
    ) -> PrekeySecrets:
        """A new state: a random id epoch and counter start (finding F-9), then a
        signed prekey and a last-resort KEM prekey (PQXDH section 3.2)."""
        draw = int.from_bytes(rng(4), "big")
        epoch = 1 + (draw >> _EPOCH_SHIFT) % _COUNTER_MASK  # 1..65535: 0 is the legacy epoch
        secrets = cls(next_id=(epoch << _EPOCH_SHIFT) | (draw & _COUNTER_MASK))
        secrets.rotate(identity, now_ms, rng, force=True)
        return secrets

    def rotate(
        self,
        identity: IdentityKeyPair,
        now_ms: int,
        rng: p.RandomBytes = p.random_bytes,
        *,
        force: bool = False,
        rotation_ms: int = SIGNED_PREKEY_ROTATION_MS,
        grace_ms: int = SIGNED_PREKEY_GRACE_MS,
    ) -> bool:
        """Run the schedule: replace the signed and last-resort prekeys if due, erase
        expired retired ones (with their base-key records), and carry out a
        replenishment the rate limit held back, once it may run.

        Returns True if something must be published (a new bundle or new one-time keys).
        """
        rotated = False
        current = self.signed.get(self.current_signed_id)
        # A legacy state whose counter crossed into the next epoch: a signed prekey
        # of the old epoch would make hubs drop the new one-time keys as stale.
        old_epoch = current is not None and prekey_epoch(current.public.prekey_id) != (
            prekey_epoch(self.next_id)
        )
        if force or current is None or old_epoch or now_ms - current.created_ms >= rotation_ms:
            if current is not None:
                current.retired_ms = now_ms
            old_lr = self.last_resort.get(self.current_last_resort_id)
            if old_lr is not None:
                old_lr.retired_ms = now_ms
            spk = self._make(identity, KIND_X25519, now_ms, rng)
            self.signed[spk.public.prekey_id] = spk
            self.current_signed_id = spk.public.prekey_id
            lr = self._make(identity, KIND_KEM, now_ms, rng)
            self.last_resort[lr.public.prekey_id] = lr
            self.current_last_resort_id = lr.public.prekey_id
            rotated = True
        for table in (self.signed, self.last_resort):
            for prekey_id in [
                k
                for k, v in table.items()
                if v.retired_ms is not None and now_ms - v.retired_ms >= grace_ms
            ]:
                del table[prekey_id]  # erased: past the grace period
        for prekey_id in [k for k in self.base_keys if k not in self.signed]:
            del self.base_keys[prekey_id]  # no replay can decrypt without the signed prekey
        if self.deferred_replenish is not None and self._replenish_allowed(now_ms):
            missing, pool_size = self.deferred_replenish
            self._replenish_now(identity, now_ms, rng, missing, pool_size)
            rotated = True
        return rotated

    def top_up(
        self,
        identity: IdentityKeyPair,
        now_ms: int,
        rng: p.RandomBytes = p.random_bytes,
        *,
        pool_size: int = ONE_TIME_POOL_SIZE,
    ) -> int:
        """Generate one-time prekeys (both kinds) up to ``pool_size``; return how many new."""
        added = 0
        for table, kind in ((self.one_time, KIND_X25519), (self.one_time_kem, KIND_KEM)):
            while len(table) < pool_size:
                secret = self._make(identity, kind, now_ms, rng)
                table[secret.public.prekey_id] = secret
                self.unpublished.append(secret.public.prekey_id)
                added += 1
        return added

    def replenish(
        self,
        identity: IdentityKeyPair,
        now_ms: int,
        rng: p.RandomBytes = p.random_bytes,
        *,
        remaining: int,
        pool_size: int = ONE_TIME_POOL_SIZE,
    ) -> int:
        """The hub has only ``remaining`` of our one-time prekeys (of each kind) left:
        make fresh ones so that it holds ``pool_size`` again; return how many were made
        (0: nothing was made, nothing needs publishing).

        The keys it handed out stay here (their initial messages may still come)
        until a table holds more than ``ONE_TIME_KEEP_FACTOR * pool_size``; then the
        oldest are erased, which bounds the state a drain by bundle fetches can grow.

        Rate limit (a flood of ``PREKEYS_LOW`` reports): after a replenishment, the
        next runs only once ``REPLENISH_MIN_INTERVAL_MS`` have passed (or the clock
        went back by as much). A report inside the interval makes nothing; it is
        remembered, and :meth:`rotate` carries out the largest one held back once
        the interval is over. So reports make at most ``pool_size`` keys of each
        kind per interval, however many arrive, and erasing a one-time key takes
        ``ONE_TIME_KEEP_FACTOR`` (4) replenishments after it was made: at least
        three intervals (1 h by default).
        """
        missing = min(max(0, pool_size - remaining), pool_size)
        if missing == 0:
            return 0
        if not self._replenish_allowed(now_ms):
            held = self.deferred_replenish
            self.deferred_replenish = (max(missing, held[0] if held else 0), pool_size)
            return 0
        return self._replenish_now(identity, now_ms, rng, missing, pool_size)

    def _replenish_allowed(self, now_ms: int) -> bool:
        last = self.last_replenish_ms
        # abs(): a clock set back by more than the interval must not block top-ups for good.
        return last is None or abs(now_ms - last) >= REPLENISH_MIN_INTERVAL_MS

    def _replenish_now(
        self,
        identity: IdentityKeyPair,
        now_ms: int,
        rng: p.RandomBytes,
        missing: int,
        pool_size: int,
    ) -> int:
        self.last_replenish_ms = now_ms
        self.deferred_replenish = None
        for table, kind in ((self.one_time, KIND_X25519), (self.one_time_kem, KIND_KEM)):
            for _ in range(missing):
                secret = self._make(identity, kind, now_ms, rng)
                table[secret.public.prekey_id] = secret
                self.unpublished.append(secret.public.prekey_id)
            while len(table) > ONE_TIME_KEEP_FACTOR * pool_size:
                del table[next(iter(table))]  # the oldest: handed out longest ago
        return 2 * missing

    def bundle(self, agent_id: str, identity: PublicIdentity) -> PrekeyBundle:
        """The bundle to publish: current signed prekey and last-resort KEM prekey."""
        return PrekeyBundle(
            agent_id,
            identity,
            self.signed[self.current_signed_id].public,
            self.last_resort[self.current_last_resort_id].public,
        )

    def unpublished_prekeys(self) -> list[SignedPrekey]:
        out = []
        for prekey_id in self.unpublished:
            secret = self.one_time.get(prekey_id) or self.one_time_kem.get(prekey_id)
            if secret is not None:
                out.append(secret.public)
        return out

    def mark_published(self, prekey_ids: list[int]) -> None:
        done = set(prekey_ids)
        self.unpublished = [i for i in self.unpublished if i not in done]

    # -- used by the PQXDH responder -------------------------------------

    def signed_private(self, prekey_id: int) -> bytes:
        secret = self.signed.get(prekey_id)
        if secret is None:
            raise InvalidKeyError("unknown or expired signed prekey")
        return secret.private

    def kem_private(self, prekey_id: int) -> tuple[bytes, bool]:
        """Return ``(seed, is_one_time)`` for a KEM prekey id."""
        if prekey_id in self.one_time_kem:
            return self.one_time_kem[prekey_id].private, True
        secret = self.last_resort.get(prekey_id)
        if secret is None:
            raise InvalidKeyError("unknown or expired KEM prekey")
        return secret.private, False

    def one_time_private(self, prekey_id: int) -> bytes:
        secret = self.one_time.get(prekey_id)
        if secret is None:
            raise InvalidKeyError("unknown or already used one-time prekey")
        return secret.private

    def consume(self, one_time_id: int | None, kem_id: int) -> None:
        """Erase the one-time keys an initial message used (call after it authenticates)."""
        if one_time_id is not None:
            self.one_time.pop(one_time_id, None)
        self.one_time_kem.pop(kem_id, None)

    def check_base_key(self, signed_prekey_id: int, base_key: bytes) -> None:
        """Raise ReplayError if an initial message without a one-time prekey and with
        this base key ``EK_A`` was already accepted on this signed prekey.

        Without a one-time prekey nothing is consumed, so the same initial message
        would otherwise build a valid session again once the first one is gone
        (PQXDH section 4.2, "Protocol replay").
        """
        if base_key in self.base_keys.get(signed_prekey_id, {}):
            raise ReplayError("base key already used with this signed prekey")

    def record_base_key(self, signed_prekey_id: int, base_key: bytes) -> None:
        """Remember the base key of an accepted last-resort initial message (see
        :meth:`check_base_key`); past MAX_BASE_KEYS_PER_SIGNED_PREKEY the oldest goes."""
        seen = self.base_keys.setdefault(signed_prekey_id, {})
        seen[bytes(base_key)] = None
        while len(seen) > MAX_BASE_KEYS_PER_SIGNED_PREKEY:
            del seen[next(iter(seen))]

    # -- serialization ---------------------------------------------------

    def to_bytes(self) -> bytes:
        w = Writer().u8(_STATE_VERSION).u32(self.next_id).u32(self.current_signed_id)
        w.u32(self.current_last_resort_id)
        for table in (self.signed, self.last_resort, self.one_time, self.one_time_kem):
            w.u32(len(table))
            for secret in table.values():
                w.bytes8(secret.private)
                secret.public.write(w)
                w.u64(secret.created_ms)
                w.u64(0 if secret.retired_ms is None else secret.retired_ms + 1)
        w.u32(len(self.unpublished))
        for prekey_id in self.unpublished:
            w.u32(prekey_id)
        # version 2 from here on
        w.u64(0 if self.last_replenish_ms is None else self.last_replenish_ms + 1)
        missing, pool_size = self.deferred_replenish or (0, 0)
        w.u32(missing).u32(pool_size)
        w.u32(len(self.base_keys))
        for signed_prekey_id, seen in self.base_keys.items():
            w.u32(signed_prekey_id).u32(len(seen))
            for base_key in seen:
                w.raw(base_key)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PrekeySecrets:
        """Parse version 2, or version 1 (no rate-limit state, no base keys)."""
        r = Reader(data, "prekey state")
        version = r.u8()
        if version not in (1, _STATE_VERSION):
            raise DecodeError("prekey state: unsupported version")
        out = cls(next_id=r.u32(), current_signed_id=r.u32(), current_last_resort_id=r.u32())
        for table in (out.signed, out.last_resort, out.one_time, out.one_time_kem):
            for _ in range(r.u32()):
                private = r.bytes8(64)
                public = SignedPrekey.read(r)
                created = r.u64()
                retired = r.u64()
                table[public.prekey_id] = _SignedSecret(
                    private, public, created, None if retired == 0 else retired - 1
                )
        out.unpublished = [r.u32() for _ in range(r.u32())]
        if version >= 2:
            last = r.u64()
            out.last_replenish_ms = None if last == 0 else last - 1
            missing, pool_size = r.u32(), r.u32()
            out.deferred_replenish = None if missing == 0 else (missing, pool_size)
            for _ in range(r.u32()):
                signed_prekey_id, count = r.u32(), r.u32()
                if signed_prekey_id in out.base_keys:
                    raise DecodeError("prekey state: repeated base-key record")
                seen = out.base_keys[signed_prekey_id] = {}
                for _ in range(count):
                    seen[r.raw(32)] = None
                while len(seen) > MAX_BASE_KEYS_PER_SIGNED_PREKEY:
                    del seen[next(iter(seen))]  # written under a larger bound
        r.finish()
        return out
