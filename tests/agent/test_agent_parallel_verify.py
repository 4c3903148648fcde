"""Batches verify their signatures on two threads; the outcomes must not change.

``Agent.receive_envelopes`` decrypts a batch in order with the signature
checks deferred, verifies them together, and redoes the batch one envelope at
a time if any fails. Two copies of the same receiver get the same envelopes,
one with the deferred path and one forced onto the one-by-one path; every
outcome, every committed message and the state afterwards must be the same.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from agentmesh import Agent, CryptoError, LocalHub
from agentmesh import agent as agent_module
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.wire.payload import encode_payload

BATCH = 12


def _envelopes(alice: Agent, count: int, forged: set[int]) -> list[bytes]:
    """``count`` envelopes from alice's session; those in ``forged`` signed by a stranger
    (they decrypt, since the session keys are alice's, but their signature is wrong)."""
    session = alice._core.record("bob").active.copy()  # type: ignore[union-attr]
    stranger = IdentityKeyPair.generate()
    now = int(time.time() * 1000)
    out = []
    for i in range(count):
        signer = stranger if i in forged else alice._core.identity
        payload = encode_payload({"type": "message", "text": f"m{i}"})
        envelope = session.encrypt(signer, payload, message_id=os.urandom(16), timestamp_ms=now)
        out.append(envelope.to_bytes())
    return out


@pytest.fixture
def twins(tmp_path: Path):
    """alice, and two identical copies of bob's state (a session with alice each)."""
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=tmp_path / "a" / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=tmp_path / "b1" / "bob.json")
    bob.on_message(lambda m: None)
    alice.send("bob", "hello")
    bob.send("alice", "hello back")  # alice's next envelopes are normal ones
    bob.close()
    shutil.copytree(tmp_path / "b1", tmp_path / "b2")
    made = [Agent("bob", keypair_path=tmp_path / d / "bob.json") for d in ("b1", "b2")]
    yield alice, made[0], made[1]
    for agent in (alice, *made):
        agent.close()


def _kinds(outcomes: list[DeliveryReport | Exception]) -> list[str]:
    return [
        type(o).__name__ + ("/dup" if isinstance(o, DeliveryReport) and o.duplicate else "")
        for o in outcomes
    ]


@pytest.mark.parametrize("forged", [set(), {0}, {5}, {BATCH - 1}, {0, 7}, set(range(BATCH))])
def test_deferred_verification_gives_the_outcomes_of_one_by_one(
    twins, monkeypatch: pytest.MonkeyPatch, forged: set[int]
) -> None:
    alice, deferred, one_by_one = twins
    batch = _envelopes(alice, BATCH + 1, forged)
    first, later = batch[:BATCH], batch[BATCH:]

    got = deferred.endpoint.receive_envelopes(first)
    with monkeypatch.context() as patch:
        patch.setattr(agent_module, "_PARALLEL_VERIFY_MIN", 10**9)
        expected = one_by_one.endpoint.receive_envelopes(first)

    assert _kinds(got) == _kinds(expected)
    for i, outcome in enumerate(got):
        if i in forged:
            assert isinstance(outcome, CryptoError)
        else:
            assert outcome == DeliveryReport(accepted=True)
    committed = [(r.message_id, r.payload) for r in deferred._state.unhandled()]
    assert committed == [(r.message_id, r.payload) for r in one_by_one._state.unhandled()]
    assert len(committed) == BATCH - len(forged)
    # A refused envelope changed nothing: sent again, it is refused again (not
    # "duplicate"), and the chain goes on where the good ones left it.
    for agent in (deferred, one_by_one):
        again = agent.endpoint.receive_envelopes([first[i] for i in sorted(forged)] + later)
        assert all(isinstance(o, CryptoError) for o in again[: len(forged)])
        assert again[-1] == DeliveryReport(accepted=True)


def test_a_large_batch_verifies_on_two_threads(twins, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob, _ = twins
    threads: list[tuple[str, int]] = []
    real = agent_module.verify_each

    def spy(checks: list[tuple[bytes, bytes, bytes]]) -> bool:
        threads.append((threading.current_thread().name, len(checks)))
        return real(checks)

    monkeypatch.setattr(agent_module, "verify_each", spy)
    outcomes = bob.endpoint.receive_envelopes(_envelopes(alice, 20, set()))
    assert outcomes == [DeliveryReport(accepted=True)] * 20
    assert sorted(n for _, n in threads) == [10, 10]
    assert len({name for name, _ in threads}) == 2


def test_small_batches_verify_as_they_go(twins, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob, _ = twins
    monkeypatch.setattr(agent_module, "verify_each", lambda checks: pytest.fail("deferred"))
    small = agent_module._PARALLEL_VERIFY_MIN - 1
    assert (
        bob.endpoint.receive_envelopes(_envelopes(alice, small, set()))
        == [DeliveryReport(accepted=True)] * small
    )
