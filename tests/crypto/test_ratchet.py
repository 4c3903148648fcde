"""The Double Ratchet key schedule (RatchetState) without the envelope layer.

Two RatchetStates talk through headers and message keys: equal keys on both
sides mean the ratchet agrees. Covers KDF properties, skipped-key caps
(per chain, total, age), replay detection and serialization.
"""

from __future__ import annotations

import pytest
from deterministic import FUZZ, Rng
from hypothesis import given
from hypothesis import strategies as st

from agentmesh.crypto import primitives as p
from agentmesh.crypto.ratchet import (
    DEFAULT_LIMITS,
    RatchetLimits,
    RatchetState,
    kdf_ck,
    kdf_rk,
)
from agentmesh.errors import AgentMeshError, CryptoError, DecodeError, InvalidKeyError, ReplayError
from agentmesh.wire.codec import Reader, Writer
from agentmesh.wire.envelope import RatchetHeader


class Duo:
    """Alice (initiator) and Bob (responder) ratchets from one shared key."""

    def __init__(self, limits: RatchetLimits = DEFAULT_LIMITS, seed: str = "duo") -> None:
        self.rng = Rng(seed)
        self.limits = limits
        sk = self.rng(32)
        bob_key = p.x25519_generate(self.rng)
        self.alice = RatchetState.initiator(sk, p.x25519_public_bytes(bob_key), self.rng)
        self.bob = RatchetState.responder(sk, p.x25519_private_bytes(bob_key))

    def send(self, who: str) -> tuple[RatchetHeader, bytes]:
        return (self.alice if who == "alice" else self.bob).next_sending_key()

    def recv(self, who: str, header: RatchetHeader) -> bytes:
        """Transactional receive, as the session layer does it: work on a copy."""
        state = self.alice if who == "alice" else self.bob
        new = state.copy()
        key = new.receiving_key(header, self.limits, self.rng)
        if who == "alice":
            self.alice = new
        else:
            self.bob = new
        return key

    def round_trip(self) -> None:
        """Bob replies, Alice answers on a new chain: one DH ratchet step on each side."""
        if not self.bob.can_send:
            h, k = self.send("alice")
            assert self.recv("bob", h) == k
        h, k = self.send("bob")
        assert self.recv("alice", h) == k
        h, k = self.send("alice")
        assert self.recv("bob", h) == k

    def state(self) -> tuple[bytes, bytes]:
        return _encode(self.alice), _encode(self.bob)


def _encode(state: RatchetState) -> bytes:
    return state.write(Writer()).getvalue()


def _decode(data: bytes) -> RatchetState:
    r = Reader(data, "ratchet")
    state = RatchetState.read(r)
    r.finish()
    return state


# --- KDFs ---------------------------------------------------------------------------


def test_kdf_ck_uses_distinct_constants() -> None:
    ck = bytes(range(32))
    next_ck, mk = kdf_ck(ck)
    assert mk == p.hmac_sha256(ck, b"\x01")
    assert next_ck == p.hmac_sha256(ck, b"\x02")
    assert mk != next_ck


def test_kdf_rk_is_hkdf_with_root_key_as_salt() -> None:
    rk, dh = bytes(32), bytes([1]) * 32
    new_rk, ck = kdf_rk(rk, dh)
    out = p.hkdf_sha256(dh, salt=rk, info=b"AgentMesh_v1_Ratchet", length=64)
    assert (new_rk, ck) == (out[:32], out[32:])


def test_default_limits() -> None:
    assert (DEFAULT_LIMITS.max_skip, DEFAULT_LIMITS.max_skipped_total) == (1000, 2000)
    assert DEFAULT_LIMITS.max_skip_age_steps == 5


# --- agreement -----------------------------------------------------------------------


def test_both_sides_derive_the_same_keys_over_many_steps() -> None:
    duo = Duo()
    for _ in range(5):
        for _ in range(3):
            h, k = duo.send("alice")
            assert duo.recv("bob", h) == k
        for _ in range(2):
            h, k = duo.send("bob")
            assert duo.recv("alice", h) == k


def test_headers_carry_pn_and_n() -> None:
    duo = Duo()
    headers = [duo.send("alice")[0] for _ in range(3)]
    assert [h.n for h in headers] == [0, 1, 2] and {h.pn for h in headers} == {0}
    duo.recv("bob", headers[2])
    bh, _ = duo.send("bob")
    duo.recv("alice", bh)
    h, _ = duo.send("alice")
    assert (h.pn, h.n) == (3, 0)
    assert h.dh != headers[0].dh


def test_messages_keys_are_unique() -> None:
    duo = Duo()
    keys = set()
    for _ in range(3):
        for _ in range(4):
            h, k = duo.send("alice")
            keys.add(k)
            duo.recv("bob", h)
        h, k = duo.send("bob")
        keys.add(k)
        duo.recv("alice", h)
    assert len(keys) == 15


def test_responder_cannot_send_before_receiving() -> None:
    duo = Duo()
    assert duo.alice.can_send and not duo.bob.can_send
    with pytest.raises(CryptoError):
        duo.bob.next_sending_key()


def test_initiator_rejects_header_naming_its_dhr_before_any_chain() -> None:
    """Regression: DHr = the responder's prekey, no receiving chain: CryptoError, not assert."""
    duo = Duo()
    assert duo.alice.dhr is not None
    before = duo.state()
    with pytest.raises(CryptoError):
        duo.recv("alice", RatchetHeader(duo.alice.dhr, 0, 0))
    assert duo.state() == before


def test_low_order_ratchet_key_rejected() -> None:
    duo = Duo()
    with pytest.raises(InvalidKeyError):
        duo.recv("bob", RatchetHeader(bytes(32), 0, 0))


# --- skipped keys -------------------------------------------------------------------


def test_per_chain_cap() -> None:
    duo = Duo(RatchetLimits(max_skip=10, max_skipped_total=100, max_skip_age_steps=5))
    headers = [duo.send("alice") for _ in range(12)]
    before = duo.state()
    with pytest.raises(CryptoError, match="too many skipped"):
        duo.recv("bob", headers[11][0])
    assert duo.state() == before
    assert duo.recv("bob", headers[10][0]) == headers[10][1]
    assert len(duo.bob.skipped) == 10


def test_huge_n_rejected_with_default_limits() -> None:
    duo = Duo()
    h, _ = duo.send("alice")
    before = duo.state()
    with pytest.raises(CryptoError):
        duo.recv("bob", RatchetHeader(h.dh, 0, 10**9))
    assert duo.state() == before


def test_per_chain_cap_applies_to_pn_of_the_previous_chain() -> None:
    duo = Duo(RatchetLimits(max_skip=10, max_skipped_total=100, max_skip_age_steps=5))
    duo.round_trip()
    duo.send("bob")  # in flight, never delivered
    stranger = p.x25519_public_bytes(p.x25519_generate(Rng("stranger")))
    before = duo.state()
    with pytest.raises(CryptoError, match="too many skipped"):
        duo.recv("alice", RatchetHeader(stranger, 12, 0))  # Alice's nr is 1: skipping 11
    assert duo.state() == before


def test_total_cap_evicts_oldest_first() -> None:
    duo = Duo(RatchetLimits(max_skip=100, max_skipped_total=5, max_skip_age_steps=5))
    headers = [duo.send("alice") for _ in range(8)]
    duo.recv("bob", headers[7][0])
    assert [n for (_, n) in duo.bob.skipped] == [2, 3, 4, 5, 6]
    with pytest.raises(CryptoError):
        duo.recv("bob", headers[0][0])
    assert duo.recv("bob", headers[2][0]) == headers[2][1]


def test_total_cap_across_chains() -> None:
    duo = Duo(RatchetLimits(max_skip=100, max_skipped_total=4, max_skip_age_steps=50))
    first = [duo.send("alice") for _ in range(3)]
    duo.recv("bob", first[2][0])  # skips 2 of chain 1
    h, _ = duo.send("bob")
    duo.recv("alice", h)
    second = [duo.send("alice") for _ in range(4)]
    duo.recv("bob", second[3][0])  # skips 3 of chain 2: total 5 > 4, chain 1's n=0 goes
    assert len(duo.bob.skipped) == 4
    with pytest.raises(CryptoError):
        duo.recv("bob", first[0][0])
    assert duo.recv("bob", first[1][0]) == first[1][1]


@pytest.mark.parametrize("steps", [0, 1, 4, 5])
def test_skipped_key_survives_up_to_max_age_steps(steps: int) -> None:
    duo = Duo(seed=f"age{steps}")
    lost = [duo.send("alice") for _ in range(2)]
    duo.recv("bob", lost[1][0])  # lost[0] skipped, stored at Bob's step 1
    for _ in range(steps):
        duo.round_trip()
    assert duo.bob.step == 1 + steps
    assert duo.recv("bob", lost[0][0]) == lost[0][1]


@pytest.mark.parametrize("steps", [6, 7])
def test_skipped_key_expires_after_max_age_steps(steps: int) -> None:
    duo = Duo(seed=f"age{steps}")
    lost = [duo.send("alice") for _ in range(2)]
    duo.recv("bob", lost[1][0])
    for _ in range(steps):
        duo.round_trip()
    assert duo.bob.skipped == {}
    # its chain key has also left previous_dhr, so the header looks like a new
    # ratchet key: the derived key is wrong (the session layer's AEAD then fails)
    assert lost[0][0].dh not in duo.bob.previous_dhr
    try:
        key = duo.recv("bob", lost[0][0])
    except CryptoError:
        return
    assert key != lost[0][1]


def test_used_skipped_key_erased_and_replay_detected() -> None:
    duo = Duo()
    headers = [duo.send("alice") for _ in range(3)]
    duo.recv("bob", headers[2][0])
    assert duo.recv("bob", headers[0][0]) == headers[0][1]
    assert (headers[0][0].dh, 0) not in duo.bob.skipped
    with pytest.raises(ReplayError, match="Replay attack detected"):
        duo.recv("bob", headers[0][0])


def test_replay_in_current_and_finished_chains() -> None:
    duo = Duo()
    h0, _ = duo.send("alice")
    duo.recv("bob", h0)
    with pytest.raises(ReplayError):
        duo.recv("bob", h0)
    duo.round_trip()
    assert h0.dh in duo.bob.previous_dhr
    before = duo.state()
    with pytest.raises(ReplayError, match="finished chain"):
        duo.recv("bob", h0)
    assert duo.state() == before


def test_previous_chain_list_is_bounded() -> None:
    duo = Duo(RatchetLimits(max_skip=10, max_skipped_total=10, max_skip_age_steps=3))
    for _ in range(8):
        duo.round_trip()
    assert len(duo.bob.previous_dhr) == 3


def test_previous_chain_list_fits_its_u8_encoding() -> None:
    duo = Duo(RatchetLimits(max_skip=10, max_skipped_total=10, max_skip_age_steps=1000))
    for _ in range(260):
        duo.round_trip()
    assert len(duo.bob.previous_dhr) == 255
    assert _decode(_encode(duo.bob)) == duo.bob


# --- copies and serialization ----------------------------------------------------------


def test_copy_is_independent() -> None:
    duo = Duo()
    headers = [duo.send("alice") for _ in range(3)]
    duo.recv("bob", headers[2][0])
    copy = duo.bob.copy()
    copy.receiving_key(headers[0][0])
    assert len(copy.skipped) == 1 and len(duo.bob.skipped) == 2


def test_serialization_round_trip_behaves_identically() -> None:
    duo = Duo()
    headers = [duo.send("alice") for _ in range(4)]
    duo.recv("bob", headers[3][0])
    restored = _decode(_encode(duo.bob))
    assert restored == duo.bob
    assert restored.copy().receiving_key(headers[1][0]) == duo.bob.copy().receiving_key(
        headers[1][0]
    )
    h, _ = duo.send("bob")
    fresh = _decode(_encode(duo.alice))
    assert fresh.copy().receiving_key(h, rng=Rng("r")) == duo.alice.copy().receiving_key(
        h, rng=Rng("r")
    )


def test_unsupported_state_version() -> None:
    data = bytearray(_encode(Duo().alice))
    data[0] = 3
    with pytest.raises(DecodeError):
        _decode(bytes(data))


def _version_1(state: RatchetState) -> bytes:
    """The encoding before ``reserved`` existed: version byte 1, no reserved u32."""
    data = bytearray(_encode(state))
    data[0] = 1
    fixed = 1 + 32 * 3 + sum(1 if k is None else 33 for k in (state.dhr, state.cks, state.ckr))
    return bytes(data[: fixed + 16] + data[fixed + 20 :])


def test_version_1_states_read_with_nothing_reserved() -> None:
    duo = Duo()
    for _ in range(3):
        duo.send("alice")
    duo.alice.reserved = 64
    old = _decode(_version_1(duo.alice))
    assert old.reserved == 0 and old.ns == 3
    old.reserved = 64
    assert old == duo.alice


@given(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=5))
def test_skip_sending_discards_exactly_the_skipped_keys(skip: int, before: int) -> None:
    duo = Duo(seed="skip")
    twin = duo.alice.copy()
    for _ in range(before):
        duo.alice.next_sending_key()
    duo.alice.skip_sending(skip)
    header, key = duo.alice.next_sending_key()
    expected = [twin.next_sending_key() for _ in range(before + skip + 1)][-1]
    assert header.n == before + skip
    assert (header, key) == expected
    # the receiver absorbs the gap with its skipped keys, and the next one agrees
    assert duo.recv("bob", header) == key


def test_skip_sending_needs_a_sending_chain() -> None:
    duo = Duo()
    duo.bob.skip_sending(0)  # nothing to do is fine
    with pytest.raises(CryptoError):
        duo.bob.skip_sending(1)
    with pytest.raises(ValueError):
        duo.alice.skip_sending(-1)


def test_a_new_sending_chain_has_nothing_reserved() -> None:
    duo = Duo()
    h, _ = duo.send("alice")
    duo.recv("bob", h)
    duo.bob.reserved = 64
    h, _ = duo.send("bob")
    duo.alice.reserved = 64
    duo.recv("alice", h)  # a DH ratchet step: alice's new sending chain
    assert duo.alice.reserved == 0 and duo.alice.ns == 0
    assert _decode(_encode(duo.alice)) == duo.alice


def test_absurd_skipped_count_rejected() -> None:
    state = Duo().alice
    data = _encode(state)
    # the skipped count is the last u32 (no skipped keys here)
    forged = data[:-4] + (2_000_000).to_bytes(4, "big")
    with pytest.raises(DecodeError):
        _decode(forged)


@FUZZ
@given(st.binary(max_size=400))
def test_read_arbitrary_bytes(data: bytes) -> None:
    try:
        _decode(data)
    except AgentMeshError:
        pass
