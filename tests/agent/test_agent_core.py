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

import pytest

from agentmesh.agent_core import AgentCore, InboxRow, OpenedBatch, SignatureChecks, verify_each
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle
from agentmesh.crypto.ratchet import DEFAULT_LIMITS
from agentmesh.errors import (
    ConfigurationError,
    CryptoError,
    IdentityChangedError,
    LocalProtocolError,
    MessageTooLargeError,
)
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.protocol.hub_protocol import LOGIN_CONTEXT
from agentmesh.state import AgentState
from agentmesh.wire.payload import decode_payload, encode_payload

DAY_MS = 24 * 3600 * 1000


def _core(agent_id: str, store: AgentState | None = None, **options: object) -> AgentCore:
    settings: dict[str, object] = {
        "sign_messages": True,
        "require_signatures": True,
        "limits": DEFAULT_LIMITS,
        "replay_window_ms": 30 * DAY_MS,
        "pool_size": 20,
        "clock": lambda: int(time.time() * 1000),
        "rng": os.urandom,
    }
    settings.update(options)
    return AgentCore(
        agent_id,
        AgentKeyPair.generate(),
        store if store is not None else AgentState(None),
        **settings,  # type: ignore[arg-type]
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
    ) -> None:
        if self.fail:
            raise OSError("disk full")
        super().commit_received_batch(records, pins, prekeys, messages, now_ms)


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
