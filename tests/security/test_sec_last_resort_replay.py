"""Replay of a last-resort initial message at the crypto level (no message-id window).

An initial message without a one-time prekey consumes nothing, so once its
session is gone it would build a valid session again. The responder now
remembers the base key (the initiator's ephemeral ``EK_A``) of every such message
per signed prekey and refuses a second use (libsignal: ``ReusedBaseKeyException``).
"""

from __future__ import annotations

import pytest
from deterministic import Rng

from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import (
    MAX_BASE_KEYS_PER_SIGNED_PREKEY,
    SIGNED_PREKEY_GRACE_MS,
    SIGNED_PREKEY_ROTATION_MS,
    PrekeyBundle,
    PrekeySecrets,
)
from agentmesh.crypto.session import Session, SessionRecord
from agentmesh.errors import AuthenticationError, InvalidKeyError, ReplayError
from agentmesh.wire.envelope import Envelope, decode_envelope

NOW = 1_700_000_000_000
RNG = Rng("last-resort-replay")
BOB = IdentityKeyPair.generate(RNG)
ALICE = IdentityKeyPair.generate(RNG)


def _secrets() -> PrekeySecrets:
    secrets = PrekeySecrets.create(BOB, NOW, RNG)
    secrets.top_up(BOB, NOW, RNG, pool_size=2)
    return secrets


def _initial(bundle: PrekeyBundle, text: bytes = b"hello") -> Envelope:
    session = Session.initiate(ALICE, "alice", bundle, rng=RNG)
    data = session.encrypt(ALICE, text, message_id=RNG(16), timestamp_ms=NOW).to_bytes()
    return decode_envelope(data)


def _receive(
    prekeys: PrekeySecrets, envelope: Envelope, record: SessionRecord | None = None
) -> tuple[SessionRecord, PrekeySecrets]:
    new_record, new_prekeys, message = (record or SessionRecord()).decrypt(
        envelope, identity=BOB, prekeys=prekeys, rng=Rng("receive")
    )
    assert new_prekeys is not None and message.payload
    return new_record, new_prekeys


def test_replayed_last_resort_initial_message_is_refused__reused_base_key() -> None:
    """Accepted once; replayed into a fresh record (the session is gone) with the
    committed prekeys: ReplayError, nothing changes; also after a reload."""
    secrets = _secrets()
    envelope = _initial(secrets.bundle("bob", BOB.public))  # no one-time prekey
    assert envelope.prekey is not None and envelope.prekey.one_time_prekey_id is None
    record, committed = _receive(secrets, envelope)
    assert record.active is not None
    # the same message on the session that still exists is a plain duplicate
    with pytest.raises(ReplayError):
        record.decrypt(envelope, identity=BOB, prekeys=committed, rng=Rng("receive"))

    before = committed.to_bytes()
    with pytest.raises(ReplayError):
        SessionRecord().decrypt(envelope, identity=BOB, prekeys=committed, rng=Rng("receive"))
    assert committed.to_bytes() == before

    reloaded = PrekeySecrets.from_bytes(committed.to_bytes())
    assert reloaded == committed
    with pytest.raises(ReplayError):
        SessionRecord().decrypt(envelope, identity=BOB, prekeys=reloaded, rng=Rng("receive"))
    assert reloaded.to_bytes() == before

    # a new last-resort session on the same signed prekey is still accepted
    _, newer = _receive(reloaded, _initial(secrets.bundle("bob", BOB.public), b"again"))
    assert len(newer.base_keys[envelope.prekey.signed_prekey_id]) == 2


def test_forged_initial_message_records_no_base_key__reused_base_key() -> None:
    """A tampered initial message fails and leaves no record: the genuine one still works."""
    secrets = _secrets()
    envelope = _initial(secrets.bundle("bob", BOB.public))
    forged = decode_envelope(envelope.to_bytes()[:-1] + bytes([envelope.to_bytes()[-1] ^ 1]))
    before = secrets.to_bytes()
    with pytest.raises(AuthenticationError):
        SessionRecord().decrypt(forged, identity=BOB, prekeys=secrets, rng=Rng("receive"))
    assert secrets.to_bytes() == before and not secrets.base_keys
    _receive(secrets, envelope)


def test_one_time_prekey_sessions_need_no_record__consumed_keys() -> None:
    """With a one-time prekey the replay fails on the consumed key; nothing is recorded."""
    secrets = _secrets()
    opk_id, kem_id = min(secrets.one_time), min(secrets.one_time_kem)
    bundle = secrets.bundle("bob", BOB.public).with_one_time(
        secrets.one_time[opk_id].public, secrets.one_time_kem[kem_id].public
    )
    envelope = _initial(bundle)
    _, committed = _receive(secrets, envelope)
    assert not committed.base_keys
    with pytest.raises(InvalidKeyError):
        SessionRecord().decrypt(envelope, identity=BOB, prekeys=committed, rng=Rng("receive"))


def test_base_key_records_are_bounded_and_erased_with_the_signed_prekey() -> None:
    """Per signed prekey at most MAX_BASE_KEYS_PER_SIGNED_PREKEY, the oldest forgotten
    first (new sessions are never refused); erased when the signed prekey is."""
    secrets = _secrets()
    envelope = _initial(secrets.bundle("bob", BOB.public))
    assert envelope.prekey is not None
    spk_id = envelope.prekey.signed_prekey_id
    _, committed = _receive(secrets, envelope)
    for i in range(MAX_BASE_KEYS_PER_SIGNED_PREKEY - 1):
        committed.record_base_key(spk_id, i.to_bytes(32, "big"))
    with pytest.raises(ReplayError):
        committed.check_base_key(spk_id, envelope.prekey.ephemeral)
    committed.record_base_key(spk_id, b"\xff" * 32)  # one more: the first is forgotten
    assert len(committed.base_keys[spk_id]) == MAX_BASE_KEYS_PER_SIGNED_PREKEY
    committed.check_base_key(spk_id, envelope.prekey.ephemeral)
    restored = PrekeySecrets.from_bytes(committed.to_bytes())
    assert restored == committed

    # rotation retires the signed prekey; the record lives as long as the key does
    rotated_at = NOW + SIGNED_PREKEY_ROTATION_MS
    assert restored.rotate(BOB, rotated_at, RNG)
    assert spk_id in restored.base_keys
    restored.rotate(BOB, rotated_at + SIGNED_PREKEY_GRACE_MS, RNG)
    assert spk_id not in restored.signed and spk_id not in restored.base_keys
    with pytest.raises(InvalidKeyError):  # and no replay can decrypt any more
        SessionRecord().decrypt(envelope, identity=BOB, prekeys=restored, rng=Rng("receive"))
