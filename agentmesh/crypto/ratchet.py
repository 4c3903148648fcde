"""The Double Ratchet (Signal's "The Double Ratchet Algorithm", section 3).

Section numbers are those of revision 1 (2016-11-20): 3.2 "State variables",
3.3 "Initialization", 3.4 "Encrypting messages", 3.5 "Decrypting messages",
5.2 "Recommended cryptographic algorithms", 6.4 "Deletion of skipped message keys".

Recommended algorithms of section 5.2, except the AEAD (chosen by the
session layer, see :mod:`agentmesh.crypto.session`):

* ``KDF_RK(rk, dh_out)`` = HKDF-SHA256(salt=rk, IKM=dh_out, info) → 64 bytes:
  new root key, chain key.
* ``KDF_CK(ck)`` = HMAC-SHA256(ck, 0x01) → message key, HMAC-SHA256(ck, 0x02)
  → next chain key.

Skipped message keys (section 3.2 ``MKSKIPPED``, section 6.4 on deletion) are
capped per chain (``max_skip``) and in total (``max_skipped_total``, oldest
evicted first), erased once used, and expire after ``max_skip_age_steps``
DH-ratchet steps. See docs/PROTOCOL.md for the defaults and why.

:class:`RatchetState` methods mutate in place; decryption is made
transactional one level up by working on :meth:`RatchetState.copy`.
No I/O; randomness is injected for the DH ratchet's key generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agentmesh.crypto import primitives as p
from agentmesh.errors import CryptoError, DecodeError, ReplayError
from agentmesh.wire.codec import Reader, Writer
from agentmesh.wire.envelope import RatchetHeader

RATCHET_INFO = b"AgentMesh_v1_Ratchet"
_MESSAGE_KEY_SEED = b"\x01"
_CHAIN_KEY_SEED = b"\x02"
#: Version 2 adds ``reserved`` (see RatchetState); version 1 states read as reserved=0.
_STATE_VERSION = 2


@dataclass(frozen=True, slots=True)
class RatchetLimits:
    """Bounds on skipped message keys (documented in docs/PROTOCOL.md)."""

    max_skip: int = 1000
    max_skipped_total: int = 2000
    max_skip_age_steps: int = 5


DEFAULT_LIMITS = RatchetLimits()


def kdf_rk(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """Section 5.2: HKDF with the root key as salt; returns ``(root_key, chain_key)``."""
    out = p.hkdf_sha256(dh_out, salt=root_key, info=RATCHET_INFO, length=64)
    return out[:32], out[32:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """Section 5.2: HMAC-SHA256 with constants 0x01/0x02; returns ``(chain_key, message_key)``."""
    return p.hmac_sha256(chain_key, _CHAIN_KEY_SEED), p.hmac_sha256(chain_key, _MESSAGE_KEY_SEED)


@dataclass(slots=True)
class RatchetState:
    """Section 3.2 state variables (DHs, DHr, RK, CKs, CKr, Ns, Nr, PN, MKSKIPPED)."""

    root_key: bytes
    dhs_private: bytes
    dhs_public: bytes
    dhr: bytes | None = None
    cks: bytes | None = None
    ckr: bytes | None = None
    ns: int = 0
    nr: int = 0
    pn: int = 0
    #: DH ratchet steps taken on receipt; ages skipped keys.
    step: int = 0
    #: (remote ratchet key, n) -> (message key, step when stored); insertion-ordered.
    skipped: dict[tuple[bytes, int], tuple[bytes, int]] = field(default_factory=dict)
    #: recent remote ratchet keys, so an old-chain replay is named as one.
    previous_dhr: list[bytes] = field(default_factory=list)
    #: Sending counters below this may be in use without this state being durable
    #: (the agent's counter reservation, docs/PERFORMANCE.md "Reserved counters"):
    #: after an unclean restart the sender jumps ``ns`` up to it with
    #: :meth:`skip_sending`, so no message key is ever used twice. Not part of the
    #: Double Ratchet itself; a new sending chain starts with none (0).
    reserved: int = 0

    # -- initialisation (section 3.3) ------------------------------------

    @classmethod
    def initiator(
        cls, shared_key: bytes, responder_public: bytes, rng: p.RandomBytes = p.random_bytes
    ) -> RatchetState:
        """RatchetInitAlice: a fresh DHs, DHr = the responder's public key."""
        dhs = p.x25519_generate(rng)
        root_key, cks = kdf_rk(shared_key, p.x25519(dhs, responder_public))
        return cls(
            root_key=root_key,
            dhs_private=p.x25519_private_bytes(dhs),
            dhs_public=p.x25519_public_bytes(dhs),
            dhr=responder_public,
            cks=cks,
        )

    @classmethod
    def responder(cls, shared_key: bytes, own_private: bytes) -> RatchetState:
        """RatchetInitBob: DHs = the key pair the initiator used as DHr."""
        key = p.x25519_private_from_bytes(own_private)
        return cls(
            root_key=shared_key, dhs_private=own_private, dhs_public=p.x25519_public_bytes(key)
        )

    def copy(self) -> RatchetState:
        return RatchetState(
            self.root_key,
            self.dhs_private,
            self.dhs_public,
            self.dhr,
            self.cks,
            self.ckr,
            self.ns,
            self.nr,
            self.pn,
            self.step,
            dict(self.skipped),
            list(self.previous_dhr),
            self.reserved,
        )

    # -- sending (section 3.4) ---------------------------------------------

    @property
    def can_send(self) -> bool:
        return self.cks is not None

    def next_sending_key(self) -> tuple[RatchetHeader, bytes]:
        """RatchetEncrypt's key schedule: return the header and the message key."""
        if self.cks is None:
            raise CryptoError("this session cannot send before it has received a message")
        self.cks, message_key = kdf_ck(self.cks)
        header = RatchetHeader(self.dhs_public, self.pn, self.ns)
        self.ns += 1
        return header, message_key

    def skip_sending(self, count: int) -> None:
        """Advance the sending chain by ``count`` message keys, discarding them (the
        chain key is overwritten, so they are gone for good). The receiver sees a gap
        of ``count`` counters, which its skipped-key handling absorbs (section 3.5's
        ``SkipMessageKeys``, bounded by ``max_skip``)."""
        if count < 0:
            raise ValueError("count must not be negative")
        if count and self.cks is None:
            raise CryptoError("this session has no sending chain to advance")
        for _ in range(count):
            assert self.cks is not None
            self.cks, _ = kdf_ck(self.cks)
        self.ns += count

    # -- receiving (section 3.5) -----------------------------------------

    def receiving_key(
        self,
        header: RatchetHeader,
        limits: RatchetLimits = DEFAULT_LIMITS,
        rng: p.RandomBytes = p.random_bytes,
    ) -> bytes:
        """RatchetDecrypt's key schedule. Mutates; call on a copy and keep it only
        if the AEAD then succeeds. Raises ReplayError or CryptoError.
        """
        found = self.skipped.pop((header.dh, header.n), None)
        if found is not None:
            return found[0]
        if self.dhr is not None and p.constant_time_equal(header.dh, self.dhr):
            if header.n < self.nr:
                # A new message id with a used counter is what a sender whose state
                # was rolled back sends (a restored backup, a cloned disk).
                raise ReplayError(
                    "message key already used: a replay, or the sender restored an old "
                    "copy of its state"
                )
        elif any(p.constant_time_equal(header.dh, old) for old in self.previous_dhr):
            raise ReplayError("message from a finished chain whose key was already used")
        else:
            self._skip_keys(header.pn, limits)
            self._dh_ratchet(header, limits, rng)
        if self.ckr is None:
            # e.g. a forged header naming the initiator's DHr (the responder's
            # signed prekey) before any receiving chain exists
            raise CryptoError("no receiving chain for this message")
        self._skip_keys(header.n, limits)
        self.ckr, message_key = kdf_ck(self.ckr)
        self.nr += 1
        return message_key

    def _skip_keys(self, until: int, limits: RatchetLimits) -> None:
        if self.ckr is None or self.dhr is None:
            return
        if until - self.nr > limits.max_skip:
            raise CryptoError("too many skipped messages")
        while self.nr < until:
            self.ckr, message_key = kdf_ck(self.ckr)
            self.skipped[(self.dhr, self.nr)] = (message_key, self.step)
            self.nr += 1
        while len(self.skipped) > limits.max_skipped_total:
            del self.skipped[next(iter(self.skipped))]  # evict the oldest key

    def _dh_ratchet(self, header: RatchetHeader, limits: RatchetLimits, rng: p.RandomBytes) -> None:
        if self.dhr is not None:
            # at most 255: the state encoding stores the count in a u8
            keep = min(limits.max_skip_age_steps, 255)
            self.previous_dhr = [self.dhr, *self.previous_dhr][:keep]
        self.pn = self.ns
        self.ns = 0
        self.reserved = 0  # a new sending chain: nothing of it is in use yet
        self.nr = 0
        self.dhr = header.dh
        dhs = p.x25519_private_from_bytes(self.dhs_private)
        self.root_key, self.ckr = kdf_rk(self.root_key, p.x25519(dhs, header.dh))
        new = p.x25519_generate(rng)
        self.dhs_private = p.x25519_private_bytes(new)
        self.dhs_public = p.x25519_public_bytes(new)
        self.root_key, self.cks = kdf_rk(self.root_key, p.x25519(new, header.dh))
        self.step += 1
        oldest = self.step - limits.max_skip_age_steps
        self.skipped = {k: v for k, v in self.skipped.items() if v[1] >= oldest}

    # -- serialization ---------------------------------------------------

    def write(self, w: Writer) -> Writer:
        w.u8(_STATE_VERSION).raw(self.root_key).raw(self.dhs_private).raw(self.dhs_public)
        for optional in (self.dhr, self.cks, self.ckr):
            if optional is None:
                w.u8(0)
            else:
                w.u8(1).raw(optional)
        w.u32(self.ns).u32(self.nr).u32(self.pn).u32(self.step).u32(self.reserved)
        w.u8(len(self.previous_dhr))
        for key in self.previous_dhr:
            w.raw(key)
        w.u32(len(self.skipped))
        for (dh, n), (message_key, step) in self.skipped.items():
            w.raw(dh).u32(n).raw(message_key).u32(step)
        return w

    @classmethod
    def read(cls, r: Reader) -> RatchetState:
        version = r.u8()
        if version not in (1, _STATE_VERSION):
            raise DecodeError("ratchet state: unsupported version")
        root_key, dhs_private, dhs_public = r.raw(32), r.raw(32), r.raw(32)
        optional: list[bytes | None] = []
        for _ in range(3):
            flag = r.u8()
            if flag not in (0, 1):
                raise DecodeError("ratchet state: bad flag")
            optional.append(r.raw(32) if flag else None)
        state = cls(root_key, dhs_private, dhs_public, optional[0], optional[1], optional[2])
        state.ns, state.nr, state.pn, state.step = r.u32(), r.u32(), r.u32(), r.u32()
        # Version 1 states were made durable before each send: nothing is reserved.
        state.reserved = r.u32() if version >= 2 else 0
        state.previous_dhr = [r.raw(32) for _ in range(r.u8())]
        count = r.u32()
        if count > 1_000_000:
            raise DecodeError("ratchet state: too many skipped keys")
        for _ in range(count):
            dh, n, message_key, step = r.raw(32), r.u32(), r.raw(32), r.u32()
            state.skipped[(dh, n)] = (message_key, step)
        return state
