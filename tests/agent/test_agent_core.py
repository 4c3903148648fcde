"""The agent core with no driver: two ``AgentCore`` objects talk through bytes alone.

No hub, no threads, no sockets: a bundle is handed over as bytes, envelopes go from
``seal`` straight into ``open_batch``/``commit_batch``. This is the piece both drivers
(``Agent``, ``AsyncAgent``) share, so its rules are pinned here, without any driver:
what is committed when, what a failure leaves behind, and when the hub must be told.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agentkit import restore_durable_image

from agentmesh.agent_core import (
    RESERVE_AHEAD,
    AgentCore,
    InboxRow,
    OpenedBatch,
    SignatureChecks,
    verify_each,
)
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle
from agentmesh.crypto.ratchet import DEFAULT_LIMITS
from agentmesh.crypto.session import SessionRecord
from agentmesh.errors import (
    ConfigurationError,
    CryptoError,
    IdentityChangedError,
    LocalProtocolError,
    MessageTooLargeError,
    ReplayError,
)
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.protocol.hub_protocol import LOGIN_CONTEXT
from agentmesh.state import AgentState
from agentmesh.wire.envelope import decode_envelope
from agentmesh.wire.payload import decode_payload, encode_payload

DAY_MS = 24 * 3600 * 1000


def _core(agent_id: str, store: AgentState | None = None, **options: object) -> AgentCore:
    settings = {**_options(), **options}
    return AgentCore(
        agent_id,
        AgentKeyPair.generate(),
        store if store is not None else AgentState(None),
        **settings,
    )


def _bundle(core: AgentCore) -> PrekeyBundle:
    """What a hub would hand out: the encoded bundle, decoded and verified."""
    return PrekeyBundle.decode(core.prekey_bundle_bytes()).verify()


def _seal(sender: AgentCore, to: AgentCore, text: str, *, bundle: bool = False) -> bytes:
    return sender.seal(
        to.agent_id,
        encode_payload({"type": "message", "text": text}),
        _bundle(to) if bundle else None,
        message_id=os.urandom(16),
        durable=False,  # as the drivers seal: power-cut safe through the reservation
    )


def _deliver(receiver: AgentCore, items: list[bytes]) -> OpenedBatch:
    batch = receiver.open_batch(items)
    receiver.commit_batch(batch)
    receiver.after_commit(batch)
    return batch


def _texts(store: AgentState) -> list[str]:
    return [decode_payload(row.payload)["text"] for row in store.unhandled()]


def test_two_cores_talk_both_ways_through_bytes_alone() -> None:
    alice, bob = _core("alice"), _core("bob")
    threads_before = threading.active_count()
    first = _seal(alice, bob, "hello", bundle=True)
    assert [row[0] for row in alice.store.outbox()] == [first[2:18]]  # committed with it
    batch = _deliver(bob, [first])
    assert batch.outcomes == [DeliveryReport(accepted=True)]
    assert _texts(bob.store) == ["hello"]
    assert bob.store.pinned_identity("alice") is not None  # trust on first use
    # bob answers in the session alice started: no bundle needed
    assert bob.can_send_to("alice")
    answer = _seal(bob, alice, "hi alice")
    assert _deliver(alice, [answer]).outcomes == [DeliveryReport(accepted=True)]
    assert _texts(alice.store) == ["hi alice"]
    assert alice.safety_number("bob") == bob.safety_number("alice")
    assert threading.active_count() == threads_before  # the core starts no thread


def test_seal_without_a_session_or_bundle_commits_nothing() -> None:
    alice, bob = _core("alice"), _core("bob")
    with pytest.raises(LocalProtocolError, match="bundle is needed"):
        _seal(alice, bob, "lost?")
    assert alice.store.outbox() == []
    assert alice.record("bob") is None


def test_too_large_is_refused_before_anything_is_committed() -> None:
    alice, bob = _core("alice"), _core("bob")
    with pytest.raises(MessageTooLargeError):
        alice.seal(
            "bob",
            encode_payload({"text": "x" * 5000}),
            _bundle(bob),
            message_id=os.urandom(16),
            limit=1000,
        )
    assert alice.store.outbox() == []
    assert alice.store.pinned_identity("bob") is None


def test_open_batch_commits_nothing_until_commit_batch() -> None:
    alice, bob = _core("alice"), _core("bob")
    items = [_seal(alice, bob, "one", bundle=True), _seal(alice, bob, "two")]
    batch = bob.open_batch([*items, items[0]])  # the repeat counts as a duplicate
    assert batch.outcomes == [
        DeliveryReport(accepted=True),
        DeliveryReport(accepted=True),
        DeliveryReport(accepted=True, duplicate=True),
    ]
    assert [m.message_id for m in batch.messages] == [i[2:18] for i in items]
    assert bob.store.unhandled() == [] and bob.record("alice") is None
    assert bob.store.pinned_identity("alice") is None
    bob.commit_batch(batch)
    bob.after_commit(batch)
    assert _texts(bob.store) == ["one", "two"]
    again = bob.open_batch(items)  # now committed: both are duplicates
    assert again.outcomes == [DeliveryReport(accepted=True, duplicate=True)] * 2


class _FailingCommit(AgentState):
    def __init__(self) -> None:
        super().__init__(None)
        self.fail = True

    def commit_received_batch(
        self,
        records: dict[str, bytes],
        pins: dict[str, bytes],
        prekeys: bytes | None,
        messages: list[InboxRow],
        now_ms: int,
        *,
        durable: bool = True,
    ) -> None:
        if self.fail:
            raise OSError("disk full")
        super().commit_received_batch(records, pins, prekeys, messages, now_ms, durable=durable)


def test_a_failed_commit_changes_nothing_and_the_batch_opens_again() -> None:
    store = _FailingCommit()
    alice, bob = _core("alice"), _core("bob", store)
    items = [_seal(alice, bob, "one", bundle=True), _seal(alice, bob, "two")]
    batch = bob.open_batch(items)
    with pytest.raises(OSError) as caught:
        bob.commit_batch(batch)
    outcomes = batch.failed(caught.value)
    assert outcomes == [caught.value, caught.value]
    with pytest.raises(LocalProtocolError):
        bob.after_commit(batch)  # housekeeping only after a commit
    assert bob.record("alice") is None  # the cache did not move ahead of the store
    store.fail = False
    assert _deliver(bob, items).outcomes == [DeliveryReport(accepted=True)] * 2
    assert _texts(store) == ["one", "two"]


def test_a_changed_identity_is_refused_and_recorded_as_pending() -> None:
    alice, bob = _core("alice"), _core("bob")
    _deliver(bob, [_seal(alice, bob, "hello", bundle=True)])
    impostor = _core("alice")  # the same id, another key
    forged = _seal(impostor, bob, "it is me", bundle=True)
    [outcome] = bob.open_batch([forged]).outcomes
    assert isinstance(outcome, IdentityChangedError)
    pinned = bob.store.pinned_identity("alice")
    assert pinned is not None and pinned[1] is not None  # pending, for trust()
    with pytest.raises(IdentityChangedError):  # and bob does not write to it either
        _seal(bob, alice, "who are you?")
    wanted = impostor.fingerprint.encode()
    assert AgentCore.matching_identity(wanted, pinned[0], pinned[1]) == pinned[1]


def test_a_tampered_envelope_changes_nothing() -> None:
    alice, bob = _core("alice"), _core("bob")
    good = _seal(alice, bob, "hello", bundle=True)
    bad = bytearray(good)
    bad[-1] ^= 1
    [outcome] = bob.open_batch([bytes(bad)]).outcomes
    assert isinstance(outcome, CryptoError)
    assert bob.store.pinned_identity("alice") is None
    assert _deliver(bob, [good]).outcomes == [DeliveryReport(accepted=True)]


def test_parallel_batches_use_the_drivers_verifier_with_the_same_outcomes() -> None:
    calls: list[int] = []

    def verify(checks: SignatureChecks) -> bool:
        calls.append(len(checks))
        return verify_each(checks)

    alice, bob = _core("alice"), _core("bob", verify_batch=verify)
    _deliver(bob, [_seal(alice, bob, "first", bundle=True)])
    _deliver(alice, [_seal(bob, alice, "answer")])  # alice's next ones are normal messages
    calls.clear()
    items = [_seal(alice, bob, f"m{i}") for i in range(10)]
    batch = bob.open_batch(items, parallel=True)
    assert batch.outcomes == [DeliveryReport(accepted=True)] * 10
    assert calls == [10]  # all ten signatures, checked together by the hook


def test_sign_login_signs_only_hub_challenges() -> None:
    alice = _core("alice")
    assert len(alice.sign_login(LOGIN_CONTEXT + os.urandom(32))) == 64
    with pytest.raises(LocalProtocolError):
        alice.sign_login(b"transfer all funds")


def test_prekey_changes_are_due_for_publishing_once() -> None:
    alice, bob = _core("alice"), _core("bob")
    assert not bob.take_publish_due()
    bob.prekeys_low(0)  # the hub ran out: fresh keys to publish
    assert bob.take_publish_due()
    assert not bob.take_publish_due()
    bob.publish_failed()  # the hub could not be told: due again
    assert bob.take_publish_due()
    unpublished = bob.one_time_prekeys()
    assert unpublished
    bob.one_time_prekeys_uploaded(unpublished)
    assert bob.one_time_prekeys() == []
    del alice


def test_the_store_belongs_to_one_identity(tmp_path: Path) -> None:
    store = AgentState(tmp_path / "a.state.sqlite")
    _core("alice", store)
    with pytest.raises(ConfigurationError, match="belongs to identity"):
        _core("alice", store)
    store.close()


# -- reserved counters (docs/PERFORMANCE.md "Reserved counters") ------------------------


class _CountingStore(AgentState):
    """Records which sends waited for the disk."""

    def __init__(self, path: Path | None) -> None:
        super().__init__(path)
        self.durable_sends: list[bool] = []

    def commit_sent(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        self.durable_sends.append(bool(kwargs.get("durable", True)))
        super().commit_sent(*args, **kwargs)  # type: ignore[arg-type]


def test_one_durable_commit_reserves_the_next_counters(tmp_path: Path) -> None:
    store = _CountingStore(tmp_path / "alice.state.sqlite")
    alice, bob = _core("alice", store), _core("bob")
    for i in range(2 * RESERVE_AHEAD + 1):
        alice.seal(
            "bob",
            encode_payload({"text": str(i)}),
            _bundle(bob) if i == 0 else None,
            message_id=os.urandom(16),
            durable=False,
        )
    expected = [i % RESERVE_AHEAD == 0 for i in range(2 * RESERVE_AHEAD + 1)]
    assert store.durable_sends == expected
    active = alice.record("bob").active  # type: ignore[union-attr]
    assert active is not None and active.ratchet.reserved == 3 * RESERVE_AHEAD
    store.close()


def _alice_after_power_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[AgentCore, AgentCore, list[bytes], AgentCore]:
    """alice sends 10 messages (one durable, nine below the reservation) and bob reads
    them; then the power goes: alice restarts from what was durable."""
    monkeypatch.setattr(AgentState, "_durable_image", tmp_path / "images")
    keys = AgentKeyPair.generate()
    # No scrub meanwhile: it syncs, and the cut is to come before anything else does.
    store = AgentState(tmp_path / "alice.state.sqlite", scrub_interval_s=3600)
    alice = AgentCore("alice", keys, store, **_options())
    bob = _core("bob")
    sent = [_seal(alice, bob, "m0", bundle=True)]
    sent += [_seal(alice, bob, f"m{i}") for i in range(1, 10)]
    assert _deliver(bob, sent).outcomes == [DeliveryReport(accepted=True)] * 10
    monkeypatch.setattr(AgentState, "_durable_image", None)
    restored = AgentState(
        restore_durable_image(tmp_path / "images", tmp_path / "after" / "alice.state.sqlite")
    )
    assert not restored.opened_clean
    rolled_back = SessionRecord.from_bytes(restored.session_record("bob") or b"").active
    assert rolled_back is not None and rolled_back.ratchet.ns == 1  # m1..m9 are gone
    return AgentCore("alice", keys, restored, **_options()), bob, sent, alice


def _options() -> dict[str, Any]:
    return {
        "sign_messages": True,
        "require_signatures": True,
        "limits": DEFAULT_LIMITS,
        "replay_window_ms": 30 * DAY_MS,
        "pool_size": 20,
        "clock": lambda: int(time.time() * 1000),
        "rng": os.urandom,
    }


def test_after_a_power_cut_the_sender_jumps_past_its_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob, _, _ = _alice_after_power_cut(tmp_path, monkeypatch)
    assert alice.chains_jumped == 1
    active = alice.record("bob").active  # type: ignore[union-attr]
    assert active is not None and active.ratchet.ns == RESERVE_AHEAD
    after = _seal(alice, bob, "after the cut")
    assert _deliver(bob, [after]).outcomes == [DeliveryReport(accepted=True)]
    assert _texts(bob.store)[-1] == "after the cut"


def test_without_the_jump_a_power_cut_reuses_message_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defence removed: the rolled-back chain sends counters bob already used."""
    monkeypatch.setattr(AgentCore, "_jump_reserved_counters", lambda self: 0)
    alice, bob, _, _ = _alice_after_power_cut(tmp_path, monkeypatch)
    [outcome] = bob.open_batch([_seal(alice, bob, "after the cut")]).outcomes
    assert isinstance(outcome, ReplayError)


def test_a_clean_close_keeps_the_counters(tmp_path: Path) -> None:
    keys = AgentKeyPair.generate()
    store = AgentState(tmp_path / "alice.state.sqlite")
    alice, bob = AgentCore("alice", keys, store, **_options()), _core("bob")
    _deliver(bob, [_seal(alice, bob, "m0", bundle=True), _seal(alice, bob, "m1")])
    store.close()
    again = AgentState(tmp_path / "alice.state.sqlite")
    assert again.opened_clean
    alice = AgentCore("alice", keys, again, **_options())
    assert alice.chains_jumped == 0
    header_n = decode_envelope(_seal(alice, bob, "m2")).ratchet.n
    assert header_n == 2
    again.close()
    running = AgentState(tmp_path / "alice.state.sqlite")
    assert running.opened_clean
    crashed = AgentState(tmp_path / "alice.state.sqlite")  # `running` never closed: unclean
    assert not crashed.opened_clean
    running.close()
    crashed.close()
