"""Prekeys, bundles and PrekeySecrets: signing, encodings, rotation, one-time keys."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from deterministic import FUZZ, Rng
from hypothesis import given
from hypothesis import strategies as st

from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import (
    KIND_KEM,
    KIND_X25519,
    ONE_TIME_LOW_WATER,
    ONE_TIME_POOL_SIZE,
    SIGNED_PREKEY_GRACE_MS,
    SIGNED_PREKEY_ROTATION_MS,
    PrekeyBundle,
    PrekeySecrets,
    SignedPrekey,
    compose_bundle,
    prekey_epoch,
)
from agentmesh.crypto.session import Session, SessionRecord
from agentmesh.errors import (
    AgentMeshError,
    CryptoError,
    DecodeError,
    InvalidKeyError,
    SignatureError,
)
from agentmesh.wire.envelope import decode_envelope

NOW = 1_700_000_000_000
DAY = 24 * 3600 * 1000


RNG = Rng("prekeys")
BOB = IdentityKeyPair.generate(RNG)
ALICE = IdentityKeyPair.generate(RNG)


def fresh_secrets(pool: int = 2) -> PrekeySecrets:
    secrets = PrekeySecrets.create(BOB, NOW, RNG)
    if pool:
        secrets.top_up(BOB, NOW, RNG, pool_size=pool)
    return secrets


def initial_envelope(bundle: PrekeyBundle, text: bytes = b"hello") -> bytes:
    session = Session.initiate(ALICE, "alice", bundle, rng=RNG)
    return session.encrypt(ALICE, text, message_id=bytes(16), timestamp_ms=NOW).to_bytes()


def receive(
    secrets: PrekeySecrets, data: bytes, rng: Rng | None = None
) -> tuple[SessionRecord, PrekeySecrets | None]:
    record, new, _ = SessionRecord().decrypt(
        decode_envelope(data), identity=BOB, prekeys=secrets, rng=rng or Rng("receive")
    )
    return record, new


# --- defaults ----------------------------------------------------------------------------


def test_documented_defaults() -> None:
    assert SIGNED_PREKEY_ROTATION_MS == 7 * DAY
    assert SIGNED_PREKEY_GRACE_MS == 14 * DAY
    assert (ONE_TIME_POOL_SIZE, ONE_TIME_LOW_WATER) == (100, 20)


# --- creation and bundles ----------------------------------------------------------------


def test_create_makes_signed_and_last_resort_prekeys() -> None:
    secrets = PrekeySecrets.create(BOB, NOW, RNG)
    assert secrets.current_signed_id in secrets.signed
    assert secrets.current_last_resort_id in secrets.last_resort
    spk = secrets.signed[secrets.current_signed_id].public
    kem = secrets.last_resort[secrets.current_last_resort_id].public
    assert (spk.kind, len(spk.public)) == (KIND_X25519, 32)
    assert (kem.kind, len(kem.public)) == (KIND_KEM, 1184)
    spk.verify(BOB.public.signing)
    kem.verify(BOB.public.signing)
    bundle = secrets.bundle("bob", BOB.public).verify()
    assert bundle.one_time_prekey is None and bundle.fingerprint == BOB.fingerprint


def test_top_up_and_publication_bookkeeping() -> None:
    secrets = PrekeySecrets.create(BOB, NOW, RNG)
    assert secrets.top_up(BOB, NOW, RNG, pool_size=3) == 6
    assert len(secrets.one_time) == 3 and len(secrets.one_time_kem) == 3
    unpublished = secrets.unpublished_prekeys()
    assert len(unpublished) == 6
    assert {k.kind for k in unpublished} == {KIND_X25519, KIND_KEM}
    for prekey in unpublished:
        prekey.verify(BOB.public.signing)
    secrets.mark_published([k.prekey_id for k in unpublished[:4]])
    assert [k.prekey_id for k in secrets.unpublished_prekeys()] == [
        k.prekey_id for k in unpublished[4:]
    ]
    assert secrets.top_up(BOB, NOW, RNG, pool_size=3) == 0
    ids = [*secrets.signed, *secrets.last_resort, *secrets.one_time, *secrets.one_time_kem]
    assert len(ids) == len(set(ids))  # ids are unique across kinds


def test_prekey_ids_wrap_around() -> None:
    secrets = PrekeySecrets(next_id=0xFFFFFFFE)
    secrets.rotate(BOB, NOW, RNG, force=True)
    assert secrets.current_signed_id == 0xFFFFFFFE
    # the counter wraps within the epoch (0xFFFF), skipping the reserved 0xFFFFFFFF
    assert secrets.current_last_resort_id == 0xFFFF0000


def test_prekey_ids_wrap_within_the_epoch_and_skip_held_ids() -> None:
    secrets = PrekeySecrets(next_id=0x0005FFFF)
    secrets.rotate(BOB, NOW, RNG, force=True)
    assert (secrets.current_signed_id, secrets.current_last_resort_id) == (0x0005FFFF, 0x00050000)
    held = secrets.current_signed_id
    secrets.next_id = held  # as after 65,536 more ids: the held one is skipped
    secrets.top_up(BOB, NOW, RNG, pool_size=1)
    assert held not in secrets.one_time and held not in secrets.one_time_kem
    assert all(prekey_epoch(i) == 5 for i in [*secrets.one_time, *secrets.one_time_kem])


def test_legacy_epoch_zero_never_hands_out_id_zero() -> None:
    secrets = PrekeySecrets(next_id=0xFFFF)
    secrets.rotate(BOB, NOW, RNG, force=True)
    assert (secrets.current_signed_id, secrets.current_last_resort_id) == (0xFFFF, 1)


def test_create_draws_a_random_nonzero_epoch() -> None:
    epochs = {prekey_epoch(PrekeySecrets.create(BOB, NOW, Rng(f"e{i}")).next_id) for i in range(8)}
    assert len(epochs) == 8 and 0 not in epochs
    secrets = fresh_secrets(pool=3)
    ids = [*secrets.signed, *secrets.last_resort, *secrets.one_time, *secrets.one_time_kem]
    assert {prekey_epoch(i) for i in ids} == {prekey_epoch(secrets.next_id)}


def test_legacy_state_past_an_epoch_boundary_rotates_into_the_new_epoch() -> None:
    secrets = PrekeySecrets(next_id=0xFFFF)
    secrets.rotate(BOB, NOW, RNG, force=True)  # signed prekey 0xFFFF: epoch 0
    secrets.next_id = 0x10000  # a version-1 counter that crossed into epoch 1
    assert secrets.rotate(BOB, NOW + 1, RNG)
    assert prekey_epoch(secrets.current_signed_id) == 1
    assert secrets.signed[0xFFFF].retired_ms == NOW + 1  # kept for the grace period
    assert not secrets.rotate(BOB, NOW + 2, RNG)


def test_hub_composition_leaves_out_one_time_keys_of_another_epoch() -> None:
    secrets = fresh_secrets()
    lost = fresh_secrets()  # a state its owner has lost, whose keys the hub still holds
    lost.next_id = 0x00010000 if prekey_epoch(secrets.next_id) != 1 else 0x00020000
    lost.top_up(BOB, NOW, RNG, pool_size=3)
    stale_opk = lost.one_time[max(lost.one_time)].public
    stale_kem = lost.one_time_kem[max(lost.one_time_kem)].public
    published = secrets.bundle("bob", BOB.public)
    opk = next(iter(secrets.one_time.values())).public
    kem = next(iter(secrets.one_time_kem.values())).public
    assert published.with_one_time(stale_opk, stale_kem) == published
    mixed = published.with_one_time(stale_opk, kem)
    assert mixed.one_time_prekey is None and mixed.kem_prekey == kem
    mixed = PrekeyBundle.decode(
        compose_bundle(published.encode(), opk.encode(), stale_kem.encode())
    )
    assert mixed.one_time_prekey == opk and mixed.kem_prekey == published.kem_prekey
    # and a sender's initial message on the fallback bundle decrypts
    record, _ = receive(secrets, initial_envelope(published.with_one_time(stale_opk, stale_kem)))
    assert record.active is not None


def test_bundle_encode_decode_and_dict() -> None:
    secrets = fresh_secrets()
    published = secrets.bundle("bob", BOB.public)
    full = published.with_one_time(
        next(iter(secrets.one_time.values())).public,
        next(iter(secrets.one_time_kem.values())).public,
    )
    for bundle in (published, full):
        assert PrekeyBundle.decode(bundle.encode()) == bundle
        d = bundle.to_dict()
        assert d["agent_id"] == "bob" and d["fingerprint"] == BOB.fingerprint
        assert PrekeyBundle.from_dict(d) == bundle
        assert ("one_time_prekey" in d) is (bundle.one_time_prekey is not None)


def test_compose_bundle_for_the_hub() -> None:
    secrets = fresh_secrets()
    published = secrets.bundle("bob", BOB.public)
    opk = next(iter(secrets.one_time.values())).public
    kem = next(iter(secrets.one_time_kem.values())).public
    composed = PrekeyBundle.decode(compose_bundle(published.encode(), opk.encode(), kem.encode()))
    assert composed.one_time_prekey == opk and composed.kem_prekey == kem
    plain = PrekeyBundle.decode(compose_bundle(published.encode(), None, None))
    assert plain == published


def test_signed_prekey_validation() -> None:
    secrets = fresh_secrets()
    spk = secrets.signed[secrets.current_signed_id].public
    with pytest.raises(SignatureError):
        spk.verify(ALICE.public.signing)
    with pytest.raises(InvalidKeyError):
        dataclasses.replace(spk, public=spk.public[:31]).verify(BOB.public.signing)
    with pytest.raises(InvalidKeyError):
        dataclasses.replace(spk, kind=KIND_KEM).verify(BOB.public.signing)
    with pytest.raises(InvalidKeyError):
        dataclasses.replace(spk, kind=9).verify(BOB.public.signing)
    low_order = SignedPrekey.create(BOB, KIND_X25519, 77, bytes(32))
    with pytest.raises(InvalidKeyError):
        low_order.verify(BOB.public.signing)
    # the id is signed too: the hub cannot relabel a prekey
    with pytest.raises(SignatureError):
        dataclasses.replace(spk, prekey_id=spk.prekey_id + 1).verify(BOB.public.signing)


def test_bundle_kind_checks() -> None:
    secrets = fresh_secrets()
    bundle = secrets.bundle("bob", BOB.public)
    with pytest.raises(InvalidKeyError):
        dataclasses.replace(bundle, kem_prekey=bundle.signed_prekey).verify()
    kem = next(iter(secrets.one_time_kem.values())).public
    with pytest.raises(InvalidKeyError):
        dataclasses.replace(bundle, one_time_prekey=kem).verify()


def test_bundle_decode_strictness() -> None:
    data = fresh_secrets().bundle("bob", BOB.public).encode()
    with pytest.raises(DecodeError):
        PrekeyBundle.decode(b"\x02" + data[1:])
    with pytest.raises(DecodeError):
        PrekeyBundle.decode(data + b"\x00")
    with pytest.raises(DecodeError):
        PrekeyBundle.decode(data[:-1] + b"\x02")  # one-time flag must be 0 or 1
    with pytest.raises(DecodeError):
        PrekeyBundle.decode(data[:1] + b"\x03b/b" + data[5:])  # invalid agent id
    for n in range(0, len(data), 37):
        with pytest.raises(DecodeError):
            PrekeyBundle.decode(data[:n])
    with pytest.raises(DecodeError):
        PrekeyBundle.from_dict({"bundle": "***"})
    with pytest.raises(DecodeError):
        PrekeyBundle.from_dict({"agent_id": "bob"})


# --- rotation ---------------------------------------------------------------------------


def test_rotation_schedule_and_grace_period() -> None:
    secrets = PrekeySecrets.create(BOB, NOW, RNG)
    first_spk, first_lr = secrets.current_signed_id, secrets.current_last_resort_id
    assert not secrets.rotate(BOB, NOW + SIGNED_PREKEY_ROTATION_MS - 1, RNG)
    assert secrets.current_signed_id == first_spk
    rotated_at = NOW + SIGNED_PREKEY_ROTATION_MS
    assert secrets.rotate(BOB, rotated_at, RNG)
    assert secrets.current_signed_id != first_spk
    assert secrets.current_last_resort_id != first_lr
    assert secrets.signed[first_spk].retired_ms == rotated_at
    assert secrets.last_resort[first_lr].retired_ms == rotated_at
    # retired keys still answer during the grace period ...
    assert not secrets.rotate(BOB, rotated_at + SIGNED_PREKEY_GRACE_MS - 1, RNG, rotation_ms=10**15)
    assert secrets.signed_private(first_spk)
    assert secrets.kem_private(first_lr)[1] is False
    # ... and are erased once it is over
    secrets.rotate(BOB, rotated_at + SIGNED_PREKEY_GRACE_MS, RNG, rotation_ms=10**15)
    assert first_spk not in secrets.signed and first_lr not in secrets.last_resort
    with pytest.raises(InvalidKeyError):
        secrets.signed_private(first_spk)
    with pytest.raises(InvalidKeyError):
        secrets.kem_private(first_lr)
    assert secrets.current_signed_id in secrets.signed


def test_forced_rotation() -> None:
    secrets = PrekeySecrets.create(BOB, NOW, RNG)
    old = secrets.current_signed_id
    assert secrets.rotate(BOB, NOW + 1, RNG, force=True)
    assert secrets.current_signed_id != old and secrets.signed[old].retired_ms == NOW + 1


def test_initial_message_to_a_retired_prekey_within_and_after_grace() -> None:
    secrets = fresh_secrets(pool=0)
    data = initial_envelope(secrets.bundle("bob", BOB.public))
    secrets.rotate(BOB, NOW + SIGNED_PREKEY_ROTATION_MS, RNG)
    record, _ = receive(secrets, data)  # in flight during rotation: still decrypts
    assert record.active is not None
    secrets.rotate(BOB, NOW + SIGNED_PREKEY_ROTATION_MS + SIGNED_PREKEY_GRACE_MS, RNG)
    before = secrets.to_bytes()
    with pytest.raises(InvalidKeyError):
        receive(secrets, data)
    assert secrets.to_bytes() == before


# --- one-time prekeys ----------------------------------------------------------------


def _one_time_bundle(secrets: PrekeySecrets) -> tuple[PrekeyBundle, int, int]:
    opk_id, kem_id = min(secrets.one_time), min(secrets.one_time_kem)
    bundle = secrets.bundle("bob", BOB.public).with_one_time(
        secrets.one_time[opk_id].public, secrets.one_time_kem[kem_id].public
    )
    return bundle, opk_id, kem_id


def test_one_time_keys_consumed_only_after_successful_decrypt() -> None:
    secrets = fresh_secrets()
    bundle, opk_id, kem_id = _one_time_bundle(secrets)
    data = initial_envelope(bundle)
    before = secrets.to_bytes()
    # a forged initial message (ciphertext changed) changes nothing
    forged = bytearray(data)
    forged[-1] ^= 1
    with pytest.raises(CryptoError):
        receive(secrets, bytes(forged))
    assert secrets.to_bytes() == before
    # the genuine one returns new secrets without those keys; the input is untouched
    _, new = receive(secrets, data)
    assert new is not None
    assert opk_id not in new.one_time and kem_id not in new.one_time_kem
    assert secrets.to_bytes() == before
    assert new.current_last_resort_id in new.last_resort
    # a second session on the same one-time keys fails against the new secrets
    with pytest.raises(InvalidKeyError):
        receive(new, initial_envelope(bundle, b"again"))


def test_last_resort_session_consumes_nothing() -> None:
    secrets = fresh_secrets()
    _, new = receive(secrets, initial_envelope(secrets.bundle("bob", BOB.public)))
    assert new is not None
    assert new.one_time.keys() == secrets.one_time.keys()
    assert new.one_time_kem.keys() == secrets.one_time_kem.keys()


def test_unknown_prekey_ids_rejected() -> None:
    secrets = fresh_secrets()
    bundle, _, _ = _one_time_bundle(secrets)
    data = initial_envelope(bundle)
    other = PrekeySecrets.create(BOB, NOW, Rng("other"))
    before = other.to_bytes()
    with pytest.raises(InvalidKeyError):
        receive(other, data)
    assert other.to_bytes() == before


# --- serialization ----------------------------------------------------------------------


def test_prekey_secrets_serialization_round_trip() -> None:
    secrets = fresh_secrets(pool=3)
    secrets.rotate(BOB, NOW + SIGNED_PREKEY_ROTATION_MS, RNG)  # a retired key in the state
    secrets.mark_published([min(secrets.one_time)])
    restored = PrekeySecrets.from_bytes(secrets.to_bytes())
    assert restored == secrets
    assert restored.to_bytes() == secrets.to_bytes()
    bundle, _, _ = _one_time_bundle(secrets)
    data = initial_envelope(bundle)
    r1, n1 = receive(secrets, data)
    r2, n2 = receive(restored, data)
    assert n1 is not None and n2 is not None and n1.to_bytes() == n2.to_bytes()
    assert r1.to_bytes() == r2.to_bytes()
    with pytest.raises(DecodeError):
        PrekeySecrets.from_bytes(b"\x03" + secrets.to_bytes()[1:])


def test_version_1_prekey_state_still_loads() -> None:
    secrets = fresh_secrets(pool=2)
    secrets.mark_published([min(secrets.one_time)])
    body = secrets.to_bytes()
    # version 1 is version 2 without the tail: u64 last replenish, 2 x u32, u32 records
    v1 = b"\x01" + body[1 : len(body) - (8 + 4 + 4 + 4)]
    restored = PrekeySecrets.from_bytes(v1)
    assert restored == secrets
    assert restored.to_bytes() == body
    with pytest.raises(DecodeError):
        PrekeySecrets.from_bytes(v1 + b"\x00")
    legacy = PrekeySecrets(next_id=1)
    legacy.rotate(BOB, NOW, RNG, force=True)
    legacy.top_up(BOB, NOW, RNG, pool_size=1)
    v1 = b"\x01" + legacy.to_bytes()[1:-20]
    loaded = PrekeySecrets.from_bytes(v1)
    ids = [*loaded.signed, *loaded.last_resort, *loaded.one_time, *loaded.one_time_kem]
    assert sorted(ids) == [1, 2, 3, 4]
    loaded.top_up(BOB, NOW, RNG, pool_size=2)  # counts on in the legacy epoch 0
    assert max(loaded.one_time_kem) == 6 and loaded.next_id == 7


def test_copy_is_independent() -> None:
    secrets = fresh_secrets()
    copy = secrets.copy()
    copy.rotate(BOB, NOW + 1, RNG, force=True)
    copy.consume(min(copy.one_time), min(copy.one_time_kem))
    copy.mark_published(list(copy.unpublished))
    assert secrets.to_bytes() != copy.to_bytes()
    assert secrets == PrekeySecrets.from_bytes(secrets.to_bytes())
    assert all(s.retired_ms is None for s in secrets.signed.values())


# --- arbitrary input ------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=1500))
def test_bundle_decode_arbitrary(data: bytes) -> None:
    try:
        PrekeyBundle.decode(data)
    except AgentMeshError:
        pass


@FUZZ
@given(st.binary(max_size=1500))
def test_signed_prekey_decode_arbitrary(data: bytes) -> None:
    try:
        SignedPrekey.decode(data)
    except AgentMeshError:
        pass


@FUZZ
@given(st.binary(max_size=1500))
def test_prekey_secrets_from_bytes_arbitrary(data: bytes) -> None:
    try:
        PrekeySecrets.from_bytes(data)
    except AgentMeshError:
        pass


_BUNDLE = fresh_secrets().bundle("bob", BOB.public).encode()


@FUZZ
@given(st.integers(0, len(_BUNDLE) - 1), st.integers(1, 255))
def test_bundle_single_byte_changes(i: int, flip: int) -> None:
    data = bytearray(_BUNDLE)
    data[i] ^= flip
    try:
        PrekeyBundle.decode(bytes(data)).verify()
    except AgentMeshError:
        return
    # only the agent id could still parse and verify (it is not signed; the AD binds it)
    assert 1 <= i < 1 + 1 + 3


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    st.one_of(
        st.dictionaries(st.text(max_size=10), _JSON, max_size=5),
        st.fixed_dictionaries({"bundle": _JSON}),
        st.fixed_dictionaries({"bundle": st.text(alphabet="ABCDEFab0123456789-_=", max_size=60)}),
    )
)
def test_bundle_from_dict_arbitrary(data: dict[str, Any]) -> None:
    try:
        PrekeyBundle.from_dict(data)
    except AgentMeshError:
        pass
