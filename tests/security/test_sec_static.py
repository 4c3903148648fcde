"""Review finding F-1: version 1's CryptoSession reused AES-GCM keys and nonces.

Protocol 1 gave the responder a "bootstrap" sending chain derived from the two
identity keys alone, so every ``perform_key_exchange`` between the same two key
pairs encrypted message N under the same key and nonce: ``c1 xor c2 = p1 xor p2``,
GHASH key exposure, and replays of bootstrap messages into later sessions.
"""

from __future__ import annotations

import pytest
from agentkit import bundle_of, labelled_keypair

from agentmesh.crypto import (
    CryptoError,
    CryptoSession,
    perform_key_exchange,
    seal,
    unseal,
)

pytestmark = pytest.mark.filterwarnings("ignore:perform_key_exchange:DeprecationWarning")


ALICE, BOB = labelled_keypair("alice"), labelled_keypair("bob")


def _pair() -> tuple[CryptoSession, CryptoSession]:
    return (
        perform_key_exchange(ALICE, bundle_of(BOB, "bob")),
        perform_key_exchange(BOB, bundle_of(ALICE, "alice")),
    )


@pytest.mark.parametrize("speaker", ["alice", "bob"])
def test_sessions_between_the_same_key_pairs_never_share_a_key__fresh_session_keys(
    speaker: str,
) -> None:
    """The first messages of two sessions between the same key pairs, whoever speaks
    first, are encrypted under different keys and nonces: equal plaintexts give
    unrelated ciphertexts, and the xor of two ciphertexts is not the xor of the
    plaintexts."""
    index = 0 if speaker == "alice" else 1
    p1, p2 = b"attack at dawn!!", b"retreat at nine!"
    first = [_pair()[index].encrypt(p1) for _ in range(2)]
    assert first[0][40:] != first[1][40:]
    c1 = _pair()[index].encrypt(p1)
    c2 = _pair()[index].encrypt(p2)
    xor_c = bytes(a ^ b for a, b in zip(c1[40:56], c2[40:56], strict=True))
    assert xor_c != bytes(a ^ b for a, b in zip(p1, p2, strict=True))


def test_sealed_first_messages_of_two_sessions_differ__fresh_session_keys() -> None:
    """The same holds for sealed envelopes of the responder (protocol 1's bootstrap
    chain): the same payload in two sessions gives different ciphertexts."""
    payload = {"type": "message", "text": "same text"}
    bodies = []
    for _ in range(2):
        _, bob = _pair()
        envelope = seal(bob, BOB, "bob", "alice", payload)
        bodies.append(envelope.ciphertext[: len(payload["text"]) + 20])
    assert bodies[0] != bodies[1]


@pytest.mark.parametrize("first", ["alice", "bob"])
def test_messages_of_an_old_session_are_refused_by_a_later_one__session_binding(
    first: str,
) -> None:
    """Messages from an earlier session do not decrypt in a later session that has
    already decrypted a message, whoever spoke first there, raw or sealed, and the
    attempt changes nothing there."""
    _, old_bob = _pair()
    old_raw = old_bob.encrypt(b"from the old session")
    old_sealed = seal(old_bob, BOB, "bob", "alice", {"text": "old"})
    alice, bob = _pair()
    if first == "alice":
        assert bob.decrypt(alice.encrypt(b"hello")) == b"hello"
        assert alice.decrypt(bob.encrypt(b"hi")) == b"hi"
    else:
        assert alice.decrypt(bob.encrypt(b"hi")) == b"hi"
        assert bob.decrypt(alice.encrypt(b"hello")) == b"hello"
    before = alice._snapshot()
    with pytest.raises(CryptoError):
        alice.decrypt(old_raw)
    with pytest.raises(CryptoError):
        unseal(alice, old_sealed, bundle_of(BOB, "bob"))
    assert alice._snapshot() == before
    assert bob.decrypt(alice.encrypt(b"still fine")) == b"still fine"
