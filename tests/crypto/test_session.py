"""Sessions: PQXDH + Double Ratchet + envelopes, end to end.

Round trips, out-of-order and lost messages, skip caps at the envelope level,
tampering with every byte, replays, forward secrecy, post-compromise recovery,
inner signatures, serialization, arbitrary input to the state decoders, and a
hypothesis state machine over two parties.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from deterministic import FUZZ, Rng
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeySecrets, SignedPrekey
from agentmesh.crypto.ratchet import DEFAULT_LIMITS, RatchetLimits, RatchetState
from agentmesh.crypto.session import Session, SessionRecord
from agentmesh.errors import (
    AgentMeshError,
    AuthenticationError,
    CryptoError,
    DecodeError,
    NoSessionError,
    ReplayError,
    SignatureError,
)
from agentmesh.wire.codec import Reader, Writer
from agentmesh.wire.envelope import Envelope, RatchetHeader, decode_envelope, encode_header

NOW_MS = 1_700_000_000_000


class Pair:
    """Alice initiates to Bob via PQXDH; each side holds a SessionRecord."""

    def __init__(
        self,
        *,
        opk: bool = True,
        one_time_kem: bool = True,
        sign: bool = True,
        limits: RatchetLimits = DEFAULT_LIMITS,
        seed: str = "pair",
    ) -> None:
        self.rng = Rng(seed)
        self.sign = sign
        self.limits = limits
        self.alice = IdentityKeyPair.generate(self.rng)
        self.bob = IdentityKeyPair.generate(self.rng)
        self.prekeys = PrekeySecrets.create(self.bob, NOW_MS, self.rng)
        self.prekeys.top_up(self.bob, NOW_MS, self.rng, pool_size=2)
        self.opk_id = min(self.prekeys.one_time)
        self.kem_id = min(self.prekeys.one_time_kem)
        bundle = self.prekeys.bundle("bob", self.bob.public).with_one_time(
            self.prekeys.one_time[self.opk_id].public if opk else None,
            self.prekeys.one_time_kem[self.kem_id].public if one_time_kem else None,
        )
        self.bundle = bundle
        session = Session.initiate(
            self.alice, "alice", bundle, sign_messages=sign, limits=limits, rng=self.rng
        )
        self.a = SessionRecord([session])
        self.b = SessionRecord()
        self.alice_prekeys = PrekeySecrets()
        self.counter = 0

    def _mid(self) -> bytes:
        self.counter += 1
        return self.counter.to_bytes(16, "big")

    def send_a(self, payload: bytes = b"") -> Envelope:
        session = self.a.active
        assert session is not None
        env = session.encrypt(
            self.alice,
            payload or b"a%d" % self.counter,
            message_id=self._mid(),
            timestamp_ms=NOW_MS,
        )
        return decode_envelope(env.to_bytes())

    def send_b(self, payload: bytes = b"") -> Envelope:
        session = self.b.active
        assert session is not None
        env = session.encrypt(
            self.bob, payload or b"b%d" % self.counter, message_id=self._mid(), timestamp_ms=NOW_MS
        )
        return decode_envelope(env.to_bytes())

    def recv_b(self, env: Envelope) -> bytes:
        self.b, new_prekeys, message = self.b.decrypt(
            env,
            identity=self.bob,
            prekeys=self.prekeys,
            require_signatures=self.sign,
            limits=self.limits,
            rng=self.rng,
        )
        if new_prekeys is not None:
            self.prekeys = new_prekeys
        return message.payload

    def recv_a(self, env: Envelope) -> bytes:
        self.a, _, message = self.a.decrypt(
            env, identity=self.alice, prekeys=self.alice_prekeys, rng=self.rng
        )
        return message.payload

    def state(self) -> tuple[bytes, bytes, bytes]:
        return self.a.to_bytes(), self.b.to_bytes(), self.prekeys.to_bytes()

    def established(self) -> Pair:
        """One message each way, so both sides have sending and receiving chains."""
        assert self.recv_b(self.send_a(b"hello")) == b"hello"
        assert self.recv_a(self.send_b(b"hi")) == b"hi"
        return self


def reencode(env: Envelope, *, ratchet: RatchetHeader | None = None) -> Envelope:
    """The same envelope with a different ratchet header (the AEAD will no longer match)."""
    header = encode_header(
        env.message_id, env.timestamp, env.sender, env.recipient, ratchet or env.ratchet, env.prekey
    )
    return decode_envelope(header + len(env.ciphertext).to_bytes(4, "big") + env.ciphertext)


# --- round trips -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("opk", "one_time_kem"),
    [(True, True), (False, False), (True, False), (False, True)],
    ids=["opk+one-time-kem", "last-resort-only", "opk+last-resort-kem", "one-time-kem-only"],
)
def test_round_trip(opk: bool, one_time_kem: bool) -> None:
    pair = Pair(opk=opk, one_time_kem=one_time_kem, seed=f"rt{opk}{one_time_kem}")
    assert pair.recv_b(pair.send_a(b"first")) == b"first"
    assert pair.recv_b(pair.send_a(b"second")) == b"second"
    for i in range(4):
        assert pair.recv_a(pair.send_b(b"b%d" % i)) == b"b%d" % i
        assert pair.recv_b(pair.send_a(b"a%d" % i)) == b"a%d" % i
        assert pair.recv_b(pair.send_a(b"a%d'" % i)) == b"a%d'" % i
    a, b = pair.a.active, pair.b.active
    assert a is not None and b is not None
    assert a.base_key == b.base_key
    assert a.associated_data == b.associated_data
    assert a.pending_prekey is None  # cleared by Bob's first reply
    # one-time keys were consumed; the last-resort KEM prekey never is
    assert (pair.opk_id in pair.prekeys.one_time) is not opk
    assert (pair.kem_id in pair.prekeys.one_time_kem) is not one_time_kem
    assert pair.prekeys.current_last_resort_id in pair.prekeys.last_resort


def test_alice_keeps_sending_prekey_messages_until_reply() -> None:
    pair = Pair(seed="pending")
    e1, e2 = pair.send_a(), pair.send_a()
    assert e1.prekey is not None and e2.prekey is not None
    assert e1.prekey == e2.prekey
    pair.recv_b(e2)  # the second arrives first: it too sets up the session
    pair.recv_b(e1)
    assert len(pair.b.sessions) == 1
    pair.recv_a(pair.send_b())
    assert pair.send_a().prekey is None


def test_responder_cannot_send_first_and_empty_record_has_no_session() -> None:
    pair = Pair(seed="nosend").established()
    env = pair.send_b()
    with pytest.raises(NoSessionError):
        SessionRecord().decrypt(env, identity=pair.alice, prekeys=pair.alice_prekeys)
    fresh = RatchetState.responder(bytes(32), bytes(range(32)))
    assert not fresh.can_send
    with pytest.raises(CryptoError):
        fresh.next_sending_key()


def test_encrypt_rejects_bad_message_id() -> None:
    pair = Pair(seed="mid")
    session = pair.a.active
    assert session is not None
    with pytest.raises(ValueError):
        session.encrypt(pair.alice, b"x", message_id=b"short", timestamp_ms=NOW_MS)


def test_decrypt_is_pure() -> None:
    pair = Pair(seed="pure").established()
    session = pair.b.active
    assert session is not None
    before = session.to_bytes()
    env = pair.send_a(b"x")
    new, message = session.decrypt(env)
    assert message.payload == b"x"
    assert session.to_bytes() == before
    assert new.to_bytes() != before


def test_envelope_for_another_session_rejected() -> None:
    pair = Pair(seed="addr").established()
    env = pair.send_a(b"x")
    session = pair.b.active
    assert session is not None
    other = dataclasses.replace(session, peer_id="mallory")
    with pytest.raises(AuthenticationError):
        other.decrypt(env)


def test_forged_header_naming_the_signed_prekey_is_a_crypto_error() -> None:
    """Regression: the initiator has DHr = SPK but no receiving chain yet."""
    pair = Pair(seed="spk-forge")
    header = encode_header(
        bytes(16),
        NOW_MS,
        "bob",
        "alice",
        RatchetHeader(pair.bundle.signed_prekey.public, 0, 0),
        None,
    )
    forged = decode_envelope(header + (32).to_bytes(4, "big") + bytes(32))
    before = pair.a.to_bytes()
    with pytest.raises(CryptoError):
        pair.recv_a(forged)
    assert pair.a.to_bytes() == before


# --- out of order and lost messages ----------------------------------------------------


def test_out_of_order_within_a_chain() -> None:
    pair = Pair(seed="ooo").established()
    envs = [pair.send_a(b"m%d" % i) for i in range(6)]
    for i in (5, 0, 3, 1, 4, 2):
        assert pair.recv_b(envs[i]) == b"m%d" % i
    b = pair.b.active
    assert b is not None and b.ratchet.skipped == {}


def test_lost_messages_do_not_block_later_ones() -> None:
    pair = Pair(seed="lost").established()
    envs = [pair.send_a(b"m%d" % i) for i in range(5)]
    assert pair.recv_b(envs[4]) == b"m4"  # 0-3 lost
    assert pair.recv_a(pair.send_b(b"reply")) == b"reply"
    assert pair.recv_b(pair.send_a(b"after")) == b"after"
    b = pair.b.active
    assert b is not None and len(b.ratchet.skipped) == 4


def test_out_of_order_across_dh_ratchet_steps() -> None:
    pair = Pair(seed="steps").established()
    old = [pair.send_a(b"old%d" % i) for i in range(3)]
    assert pair.recv_b(old[2]) == b"old2"
    b_old = [pair.send_b(b"bold%d" % i) for i in range(2)]
    assert pair.recv_a(b_old[1]) == b"bold1"
    new = [pair.send_a(b"new%d" % i) for i in range(2)]  # Alice's next chain
    assert new[0].ratchet.dh != old[0].ratchet.dh
    assert new[0].ratchet.pn == 3
    assert pair.recv_b(new[1]) == b"new1"
    assert pair.recv_b(old[0]) == b"old0"  # from the finished chain, via skipped keys
    assert pair.recv_b(new[0]) == b"new0"
    assert pair.recv_b(old[1]) == b"old1"
    assert pair.recv_a(b_old[0]) == b"bold0"


def test_messages_before_the_first_reply_arrive_late() -> None:
    pair = Pair(seed="late-first")
    first = [pair.send_a(b"f%d" % i) for i in range(3)]
    assert pair.recv_b(first[1]) == b"f1"
    assert pair.recv_a(pair.send_b(b"r")) == b"r"
    assert pair.recv_b(pair.send_a(b"next")) == b"next"
    assert pair.recv_b(first[2]) == b"f2"
    assert pair.recv_b(first[0]) == b"f0"


# --- skip caps, at the envelope level ----------------------------------------------


def test_huge_message_number_rejected_state_unchanged() -> None:
    pair = Pair(seed="huge").established()
    env = pair.send_a(b"x")
    forged = reencode(env, ratchet=RatchetHeader(env.ratchet.dh, env.ratchet.pn, 10**9))
    before = pair.state()
    with pytest.raises(CryptoError, match="too many skipped"):
        pair.recv_b(forged)
    assert pair.state() == before
    assert pair.recv_b(env) == b"x"


def test_huge_previous_chain_length_rejected_state_unchanged() -> None:
    pair = Pair(seed="huge-pn").established()
    new_dh = p.x25519_public_bytes(p.x25519_generate(Rng("other")))
    env = pair.send_a(b"x")
    forged = reencode(env, ratchet=RatchetHeader(new_dh, 10**9, 0))
    before = pair.state()
    with pytest.raises(CryptoError, match="too many skipped"):
        pair.recv_b(forged)
    assert pair.state() == before


def test_per_chain_skip_cap_boundary() -> None:
    limits = RatchetLimits(max_skip=5, max_skipped_total=50, max_skip_age_steps=5)
    pair = Pair(seed="cap", limits=limits)
    pair.recv_b(pair.send_a(b"0"))
    pair.recv_a(pair.send_b(b"r"))
    envs = [pair.send_a(b"m%d" % i) for i in range(7)]
    before = pair.state()
    with pytest.raises(CryptoError):
        pair.recv_b(envs[6])  # would skip 6 > 5
    assert pair.state() == before
    assert pair.recv_b(envs[5]) == b"m5"  # skips exactly 5
    assert pair.recv_b(envs[6]) == b"m6"


def test_total_skip_cap_evicts_oldest() -> None:
    limits = RatchetLimits(max_skip=100, max_skipped_total=5, max_skip_age_steps=5)
    pair = Pair(seed="total", limits=limits).established()
    envs = [pair.send_a(b"m%d" % i) for i in range(8)]
    assert pair.recv_b(envs[7]) == b"m7"  # skipped 0..6: 7 keys, the oldest 2 evicted
    b = pair.b.active
    assert b is not None and len(b.ratchet.skipped) == 5
    for i in (0, 1):
        with pytest.raises(CryptoError):
            pair.recv_b(envs[i])
    for i in range(2, 7):
        assert pair.recv_b(envs[i]) == b"m%d" % i


@pytest.mark.parametrize(("steps", "readable"), [(5, True), (6, False)])
def test_skipped_keys_expire_after_max_age_steps(steps: int, readable: bool) -> None:
    pair = Pair(seed=f"expire{steps}")
    late, first = pair.send_a(b"late"), pair.send_a(b"first")
    pair.recv_b(first)  # "late" is skipped at Bob's DH ratchet step 1
    for _ in range(steps):  # each round trip is one more DH ratchet step at Bob
        pair.recv_a(pair.send_b())
        pair.recv_b(pair.send_a())
    b = pair.b.active
    assert b is not None and b.ratchet.step == 1 + steps
    if readable:
        assert pair.recv_b(late) == b"late"
    else:
        before = pair.state()
        with pytest.raises(CryptoError):
            pair.recv_b(late)
        assert pair.state() == before


def test_used_skipped_keys_are_erased() -> None:
    pair = Pair(seed="erase").established()
    envs = [pair.send_a() for _ in range(3)]
    pair.recv_b(envs[2])
    b = pair.b.active
    assert b is not None and len(b.ratchet.skipped) == 2
    pair.recv_b(envs[0])
    b = pair.b.active
    assert b is not None
    assert (envs[0].ratchet.dh, 0) not in b.ratchet.skipped
    assert len(b.ratchet.skipped) == 1


# --- tampering ---------------------------------------------------------------------


def _tamper_every_byte(
    data: bytes, attempt: object, state: object, flips: tuple[int, ...] = (0x01, 0xFF)
) -> None:
    assert callable(attempt) and callable(state)
    before = state()
    for i in range(len(data)):
        for flip in flips:
            mutated = bytearray(data)
            mutated[i] ^= flip
            try:
                attempt(bytes(mutated))
            except (CryptoError, DecodeError):
                pass
            else:
                raise AssertionError(f"byte {i} ^ {flip:#x} was accepted")
            assert state() == before, f"state changed after byte {i} ^ {flip:#x}"


def test_tamper_every_byte_of_a_prekey_envelope() -> None:
    pair = Pair(seed="tamper-prekey")
    data = pair.send_a(b"tamper me").to_bytes()
    assert data[1] == 1  # a prekey envelope: Bob has no session yet

    def attempt(raw: bytes) -> None:
        SessionRecord().decrypt(decode_envelope(raw), identity=pair.bob, prekeys=pair.prekeys)

    _tamper_every_byte(data, attempt, pair.state, flips=(0x01,))
    assert pair.recv_b(decode_envelope(data)) == b"tamper me"


@pytest.mark.parametrize("direction", ["alice->bob", "bob->alice"])
def test_tamper_every_byte_of_a_normal_envelope(direction: str) -> None:
    pair = Pair(seed="tamper-normal").established()
    if direction == "alice->bob":
        data = pair.send_a(b"genuine").to_bytes()
        recv = pair.recv_b
    else:
        data = pair.send_b(b"genuine").to_bytes()
        recv = pair.recv_a
    assert data[1] == 2

    def attempt(raw: bytes) -> None:
        recv(decode_envelope(raw))

    _tamper_every_byte(data, attempt, pair.state)
    assert recv(decode_envelope(data)) == b"genuine"


def test_truncated_and_extended_envelopes_rejected() -> None:
    pair = Pair(seed="trunc").established()
    data = pair.send_a(b"x").to_bytes()
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode_envelope(data[:n])
    with pytest.raises(DecodeError):
        decode_envelope(data + b"\x00")


# --- replay ----------------------------------------------------------------------


def test_replay_rejected_and_state_unchanged() -> None:
    pair = Pair(seed="replay").established()
    env = pair.send_a(b"once")
    assert pair.recv_b(env) == b"once"
    before = pair.state()
    with pytest.raises(ReplayError, match="Replay attack detected"):
        pair.recv_b(env)
    assert pair.state() == before


def test_replay_of_a_skipped_key_message() -> None:
    pair = Pair(seed="replay-skipped").established()
    envs = [pair.send_a() for _ in range(3)]
    pair.recv_b(envs[2])
    pair.recv_b(envs[0])
    with pytest.raises(ReplayError, match="Replay attack detected"):
        pair.recv_b(envs[0])


def test_replay_of_an_old_chain_message() -> None:
    pair = Pair(seed="replay-old").established()
    old = pair.send_a(b"old")
    pair.recv_b(old)
    pair.recv_a(pair.send_b())
    pair.recv_b(pair.send_a(b"new chain"))
    b = pair.b.active
    assert b is not None and old.ratchet.dh in b.ratchet.previous_dhr
    with pytest.raises(ReplayError, match="Replay attack detected"):
        pair.recv_b(old)


def test_replay_of_the_initial_prekey_message() -> None:
    pair = Pair(seed="replay-initial")
    first = pair.send_a(b"first")
    pair.recv_b(first)
    before = pair.state()
    with pytest.raises(ReplayError, match="Replay attack detected"):
        pair.recv_b(first)
    assert pair.state() == before
    pair.recv_a(pair.send_b())
    pair.recv_b(pair.send_a())
    with pytest.raises(ReplayError):
        pair.recv_b(first)


# --- forward secrecy and post-compromise security ----------------------------------


def test_forward_secrecy_later_snapshot_cannot_decrypt_earlier_messages() -> None:
    pair = Pair(seed="fs")
    history: list[Envelope] = []
    early_secrets: list[bytes] = []
    for i in range(4):
        envs = [pair.send_a(b"a%d.%d" % (i, j)) for j in range(2)]
        for env in envs:
            pair.recv_b(env)
        history += envs
        b = pair.b.active
        assert b is not None and b.ratchet.ckr is not None
        early_secrets += [b.ratchet.root_key, b.ratchet.ckr, b.ratchet.dhs_private]
        reply = pair.send_b(b"b%d" % i)
        pair.recv_a(reply)
        history.append(reply)
    pair.recv_b(pair.send_a(b"latest"))
    pair.recv_a(pair.send_b(b"latest reply"))
    pair.recv_b(pair.send_a(b"latest 2"))
    snapshot_b = SessionRecord.from_bytes(pair.b.to_bytes())
    snapshot_a = SessionRecord.from_bytes(pair.a.to_bytes())
    for env in history:
        snapshot = snapshot_b if env.sender == "alice" else snapshot_a
        ident = pair.bob if env.sender == "alice" else pair.alice
        with pytest.raises(CryptoError):
            snapshot.decrypt(env, identity=ident, prekeys=PrekeySecrets())
    state = pair.b.to_bytes()
    for secret in early_secrets:
        assert secret not in state  # old root, chain and ratchet keys are erased


def test_post_compromise_recovery() -> None:
    pair = Pair(seed="pcs").established()
    leaked = SessionRecord.from_bytes(pair.b.to_bytes())  # the attacker's copy of Bob's state

    def attacker_reads(env: Envelope) -> bytes:
        # the attacker has no access to Bob's future randomness (default os.urandom)
        _, _, message = leaked.decrypt(env, identity=pair.bob, prekeys=PrekeySecrets())
        return message.payload

    a1 = pair.send_a(b"still readable")
    assert attacker_reads(a1) == b"still readable"  # compromise: readable until a DH round trip
    assert pair.recv_b(a1) == b"still readable"
    a1b = pair.send_a(b"same chain")
    assert attacker_reads(a1b) == b"same chain"
    pair.recv_b(a1b)
    pair.recv_a(pair.send_b(b"bob's fresh ratchet key"))  # the new DH round trip completes
    for text in (b"healed", b"healed again"):
        env = pair.send_a(text)
        with pytest.raises(CryptoError):
            attacker_reads(env)
        assert pair.recv_b(env) == text


# --- per-message signatures ------------------------------------------------------------


def test_unsigned_messages() -> None:
    pair = Pair(seed="unsigned", sign=False)
    env = pair.send_a(b"quiet")
    pair.b, _, message = pair.b.decrypt(
        env, identity=pair.bob, prekeys=pair.prekeys, require_signatures=False
    )
    assert message.signature is None and message.payload == b"quiet"
    signed = Pair(seed="signed")
    signed_env = signed.send_a(b"quiet")
    # the signature lives inside the ciphertext: 64 bytes longer, nothing in the clear
    assert len(signed_env.ciphertext) == len(env.ciphertext) + 64
    assert len(signed_env.to_bytes()) == len(env.to_bytes()) + 64


def test_signed_message_carries_verifiable_signature() -> None:
    pair = Pair(seed="sig").established()
    env = pair.send_a(b"audit me")
    session = pair.b.active
    assert session is not None
    _, message = session.decrypt(env)
    assert message.signature is not None
    p.ed25519_verify(
        pair.alice.public.signing,
        message.signature,
        b"AgentMesh-msg-v2" + env.header_bytes + b"audit me",
    )


def test_valid_aead_with_bad_inner_signature_rejected() -> None:
    pair = Pair(seed="badsig").established()
    mallory = IdentityKeyPair.generate(Rng("mallory"))
    session = pair.a.active
    assert session is not None
    env = session.encrypt(mallory, b"forged", message_id=bytes(16), timestamp_ms=NOW_MS)
    before = pair.state()
    with pytest.raises(SignatureError):
        pair.recv_b(decode_envelope(env.to_bytes()))
    assert pair.state() == before


def _corrupt(sig: bytes) -> bytes:
    return bytes([sig[0] ^ 1]) + sig[1:]


@pytest.mark.parametrize(
    "part", ["identity_binding", "signed_prekey", "kem_prekey", "one_time_prekey"]
)
def test_bundle_with_one_bad_signature_aborts(part: str) -> None:
    pair = Pair(seed="bundle-sig")
    bundle = pair.bundle
    assert bundle.one_time_prekey is not None
    if part == "identity_binding":
        bundle = dataclasses.replace(
            bundle,
            identity=dataclasses.replace(
                bundle.identity, binding=_corrupt(bundle.identity.binding)
            ),
        )
    elif part == "signed_prekey":
        spk = bundle.signed_prekey
        bundle = dataclasses.replace(
            bundle, signed_prekey=dataclasses.replace(spk, signature=_corrupt(spk.signature))
        )
    elif part == "kem_prekey":
        kem = bundle.kem_prekey
        bundle = dataclasses.replace(
            bundle, kem_prekey=dataclasses.replace(kem, signature=_corrupt(kem.signature))
        )
    else:
        opk = bundle.one_time_prekey
        assert opk is not None
        bundle = dataclasses.replace(
            bundle, one_time_prekey=dataclasses.replace(opk, signature=_corrupt(opk.signature))
        )
    with pytest.raises(SignatureError):
        Session.initiate(pair.alice, "alice", bundle)


def test_bundle_signed_by_someone_else_aborts() -> None:
    pair = Pair(seed="bundle-other")
    mallory = IdentityKeyPair.generate(Rng("mallory"))
    spk = pair.bundle.signed_prekey
    forged = SignedPrekey.create(mallory, spk.kind, spk.prekey_id, spk.public)
    with pytest.raises(SignatureError):
        Session.initiate(
            pair.alice, "alice", dataclasses.replace(pair.bundle, signed_prekey=forged)
        )


# --- serialization ------------------------------------------------------------------


def test_session_serialization_round_trip_behaves_identically() -> None:
    pair = Pair(seed="ser").established()
    envs = [pair.send_a(b"m%d" % i) for i in range(4)]
    pair.recv_b(envs[3])  # leaves skipped keys in the state
    session = pair.b.active
    assert session is not None
    restored = Session.from_bytes(session.to_bytes())
    assert restored.to_bytes() == session.to_bytes()
    assert restored == session
    for env in envs[:3]:
        n1, m1 = session.decrypt(env, Rng("x"))
        n2, m2 = restored.decrypt(env, Rng("x"))
        assert m1.payload == m2.payload and n1.to_bytes() == n2.to_bytes()
    e1 = session.copy().encrypt(pair.bob, b"same", message_id=bytes(16), timestamp_ms=1)
    e2 = restored.copy().encrypt(pair.bob, b"same", message_id=bytes(16), timestamp_ms=1)
    assert e1.to_bytes() == e2.to_bytes()


def test_initiator_session_with_pending_prekey_round_trips() -> None:
    pair = Pair(seed="ser-pending")
    session = pair.a.active
    assert session is not None and session.pending_prekey is not None
    restored = Session.from_bytes(session.to_bytes())
    assert restored.pending_prekey == session.pending_prekey
    e1 = session.copy().encrypt(pair.alice, b"x", message_id=bytes(16), timestamp_ms=1)
    e2 = restored.encrypt(pair.alice, b"x", message_id=bytes(16), timestamp_ms=1)
    assert e1.to_bytes() == e2.to_bytes()


def test_session_record_serialization_round_trip() -> None:
    pair = Pair(seed="ser-record").established()
    restored = SessionRecord.from_bytes(pair.b.to_bytes())
    assert restored.to_bytes() == pair.b.to_bytes()
    env = pair.send_a(b"after restore")
    r1, _, m1 = restored.decrypt(env, identity=pair.bob, prekeys=pair.prekeys, rng=Rng("y"))
    r2, _, m2 = pair.b.decrypt(env, identity=pair.bob, prekeys=pair.prekeys, rng=Rng("y"))
    assert m1.payload == m2.payload == b"after restore"
    assert r1.to_bytes() == r2.to_bytes()
    assert SessionRecord.from_bytes(SessionRecord().to_bytes()).sessions == []


def test_simultaneous_initiation_keeps_both_sessions() -> None:
    pair = Pair(seed="simul")
    # Bob also initiates towards Alice, from Alice's own bundle
    alice_prekeys = PrekeySecrets.create(pair.alice, NOW_MS, Rng("alice-pk"))
    bob_session = Session.initiate(
        pair.bob, "bob", alice_prekeys.bundle("alice", pair.alice.public)
    )
    pair.alice_prekeys = alice_prekeys
    from_bob = decode_envelope(
        bob_session.encrypt(pair.bob, b"from bob", message_id=bytes(16), timestamp_ms=1).to_bytes()
    )
    from_alice = pair.send_a(b"from alice")
    pair.b = SessionRecord([bob_session])
    assert pair.recv_a(from_bob) == b"from bob"
    assert pair.recv_b(from_alice) == b"from alice"
    assert len(pair.a.sessions) == 2 and len(pair.b.sessions) == 2
    # each side now sends on its newest session; the other finds it
    assert pair.recv_a(pair.send_b(b"b on new")) == b"b on new"
    assert pair.recv_b(pair.send_a(b"a on new")) == b"a on new"


def test_session_record_caps_archived_sessions() -> None:
    pair = Pair(seed="cap-archive").established()
    session = pair.b.active
    assert session is not None
    record = SessionRecord([session])
    for _ in range(10):
        record = record.promote(session.copy())
    assert len(record.sessions) == 5
    assert SessionRecord.from_bytes(record.to_bytes()).to_bytes() == record.to_bytes()
    too_many = Writer().u8(1).u8(6).getvalue()
    with pytest.raises(DecodeError):
        SessionRecord.from_bytes(too_many)


# --- arbitrary bytes into the state decoders -----------------------------------------


@FUZZ
@given(st.binary(max_size=600))
def test_session_from_bytes_arbitrary(data: bytes) -> None:
    try:
        Session.from_bytes(data)
    except AgentMeshError:
        pass


@FUZZ
@given(st.binary(max_size=600))
def test_session_record_from_bytes_arbitrary(data: bytes) -> None:
    try:
        SessionRecord.from_bytes(data)
    except AgentMeshError:
        pass


_STATE_SAMPLE = Pair(seed="fuzz").established()
_SESSION_BYTES = SessionRecord.from_bytes(_STATE_SAMPLE.b.to_bytes()).to_bytes()


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.data())
def test_mutated_state_bytes(data: st.DataObject) -> None:
    """Near-valid state (one byte changed, or cut short) never raises anything else."""
    raw = bytearray(_SESSION_BYTES)
    i = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        raw[i] = data.draw(st.integers(0, 255))
        candidate = bytes(raw)
    else:
        candidate = bytes(raw[:i])
    try:
        record = SessionRecord.from_bytes(candidate)
    except AgentMeshError:
        return
    # a state that parses must also be usable without crashing
    env = decode_envelope(
        _STATE_SAMPLE.a.sessions[0]
        .copy()
        .encrypt(_STATE_SAMPLE.alice, b"x", message_id=bytes(16), timestamp_ms=1)
        .to_bytes()
    )
    try:
        record.decrypt(env, identity=_STATE_SAMPLE.bob, prekeys=PrekeySecrets())
    except AgentMeshError:
        pass


def test_ratchet_state_read_write_round_trip() -> None:
    pair = Pair(seed="ratchet-ser").established()
    envs = [pair.send_a() for _ in range(3)]
    pair.recv_b(envs[2])
    session = pair.b.active
    assert session is not None
    w = Writer()
    session.ratchet.write(w)
    r = Reader(w.getvalue())
    restored = RatchetState.read(r)
    r.finish()
    assert restored == session.ratchet


# --- the two-party state machine -------------------------------------------------------


class TwoParties(RuleBasedStateMachine):
    """Alice and Bob (PQXDH, then the ratchet) over a lossy, reordering, duplicating network."""

    def __init__(self) -> None:
        super().__init__()
        limits = RatchetLimits(max_skip=1000, max_skipped_total=2000, max_skip_age_steps=200)
        self.pair = Pair(seed="machine", limits=limits)
        self.in_flight: list[tuple[str, Envelope, bytes]] = []
        self.delivered: list[tuple[str, Envelope, bytes]] = []
        self.received: dict[bytes, int] = {}
        self.sent: dict[bytes, bytes] = {}

    def _send(self, who: str) -> None:
        payload = f"{who}-{len(self.sent)}".encode()
        env = self.pair.send_a(payload) if who == "alice" else self.pair.send_b(payload)
        self.in_flight.append((who, env, payload))
        self.sent[env.message_id] = payload

    @rule()
    def alice_sends(self) -> None:
        self._send("alice")

    @precondition(lambda self: self.pair.b.active is not None)
    @rule()
    def bob_sends(self) -> None:
        self._send("bob")

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.in_flight) - 1))
        who, env, payload = self.in_flight.pop(i)
        got = self.pair.recv_b(env) if who == "alice" else self.pair.recv_a(env)
        assert got == payload
        self.received[env.message_id] = self.received.get(env.message_id, 0) + 1
        self.delivered.append((who, env, payload))

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        who, env, _ = self.delivered[data.draw(st.integers(0, len(self.delivered) - 1))]
        before = self.pair.state()
        with pytest.raises(ReplayError):
            if who == "alice":
                self.pair.recv_b(env)
            else:
                self.pair.recv_a(env)
        assert self.pair.state() == before

    @precondition(lambda self: len(self.in_flight) > 1)
    @rule(seed=st.integers(0, 2**32))
    def reorder(self, seed: int) -> None:
        random.Random(seed).shuffle(self.in_flight)

    @invariant()
    def each_delivered_message_decrypted_exactly_once(self) -> None:
        assert all(count == 1 for count in self.received.values())
        assert len(self.received) == len(self.delivered)
        for _, env, payload in self.delivered:
            assert self.sent[env.message_id] == payload


TestTwoParties = TwoParties.TestCase
TestTwoParties.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
