"""Version 1's names: CryptoSession, perform_key_exchange, seal, unseal.

They now run a Double Ratchet seeded from the static identity DH whose every
sending chain starts from fresh randomness, so either side may speak first,
replays are refused, and a failure changes nothing. The review finding F-1
tests (no key reuse across sessions) are in tests/security/test_sec_static.py.
"""

from __future__ import annotations

import copy

import pytest
from agentkit import bundle_of, labelled_keypair

from agentmesh.crypto import (
    CryptoError,
    CryptoSession,
    perform_key_exchange,
    seal,
    unseal,
)
from agentmesh.errors import AuthenticationError, DecodeError, ReplayError, SignatureError
from agentmesh.wire.envelope import Envelope

ALICE, BOB = labelled_keypair("alice"), labelled_keypair("bob")
pytestmark = pytest.mark.filterwarnings("ignore:perform_key_exchange:DeprecationWarning")


def sessions() -> tuple[CryptoSession, CryptoSession]:
    return perform_key_exchange(ALICE, bundle_of(BOB, "bob")), perform_key_exchange(
        BOB, bundle_of(ALICE, "alice")
    )


def snapshot(s: CryptoSession) -> bytes:
    return s._snapshot()


def test_version1_names_are_exported() -> None:
    import agentmesh.crypto as crypto

    for name in (
        "AgentKeyPair",
        "CryptoSession",
        "perform_key_exchange",
        "seal",
        "unseal",
        "CryptoError",
    ):
        assert hasattr(crypto, name)


@pytest.mark.parametrize("first", ["alice", "bob"])
def test_either_side_speaks_first(first: str) -> None:
    a, b = sessions()
    order = [(a, b), (b, a)] if first == "alice" else [(b, a), (a, b)]
    for round_ in range(4):
        for sender, receiver in order:
            for i in range(2):
                msg = b"round %d msg %d" % (round_, i)
                assert receiver.decrypt(sender.encrypt(msg)) == msg


def test_both_speak_before_either_listens() -> None:
    a, b = sessions()
    from_a = [a.encrypt(b"a%d" % i) for i in range(3)]
    from_b = [b.encrypt(b"b%d" % i) for i in range(3)]
    for i in (2, 0, 1):
        assert b.decrypt(from_a[i]) == b"a%d" % i
        assert a.decrypt(from_b[i]) == b"b%d" % i
    assert b.decrypt(a.encrypt(b"x")) == b"x"
    assert a.decrypt(b.encrypt(b"y")) == b"y"


def test_peer_fingerprint() -> None:
    a, b = sessions()
    assert a.peer_fingerprint == BOB.fingerprint and b.peer_fingerprint == ALICE.fingerprint


def test_associated_data_must_match() -> None:
    a, b = sessions()
    ct = a.encrypt(b"x", b"context")
    before = snapshot(b)
    with pytest.raises(AuthenticationError, match="Authentication tag mismatch"):
        b.decrypt(ct, b"other")
    assert snapshot(b) == before
    assert b.decrypt(ct, b"context") == b"x"


def test_raw_replay_and_tamper() -> None:
    a, b = sessions()
    ct = a.encrypt(b"once")
    assert b.decrypt(ct) == b"once"
    with pytest.raises(ReplayError, match="Replay attack detected"):
        b.decrypt(ct)
    ct2 = a.encrypt(b"twice")
    before = snapshot(b)
    for i in range(len(ct2)):
        forged = bytearray(ct2)
        forged[i] ^= 0x01
        with pytest.raises(CryptoError):
            b.decrypt(bytes(forged))
        assert snapshot(b) == before
    with pytest.raises(CryptoError):
        b.decrypt(b"short")
    assert b.decrypt(ct2) == b"twice"


def test_seal_unseal_round_trip() -> None:
    a, b = sessions()
    env = seal(a, ALICE, "alice", "bob", {"type": "message", "text": "hi", "n": [1, 2]})
    assert isinstance(env, Envelope)
    assert unseal(b, env, bundle_of(ALICE, "alice")) == {
        "type": "message",
        "text": "hi",
        "n": [1, 2],
    }
    reply = seal(b, BOB, "bob", "alice", {"type": "message", "text": "hello"})
    assert unseal(a, bytes(reply), bundle_of(BOB, "bob"))["text"] == "hello"


def test_unseal_accepts_bytes_and_rejects_garbage() -> None:
    a, b = sessions()
    env = seal(a, ALICE, "alice", "bob", {"text": "x"})
    assert unseal(b, env.to_bytes(), bundle_of(ALICE, "alice")) == {"text": "x"}
    with pytest.raises(CryptoError):
        unseal(b, b"\x01\x02garbage", bundle_of(ALICE, "alice"))


def test_unseal_replay() -> None:
    a, b = sessions()
    env = seal(a, ALICE, "alice", "bob", {"text": "x"})
    unseal(b, env, bundle_of(ALICE, "alice"))
    before = snapshot(b)
    with pytest.raises(CryptoError, match="Replay attack detected"):
        unseal(b, env, bundle_of(ALICE, "alice"))
    assert snapshot(b) == before


def test_unseal_tampered_envelope() -> None:
    a, b = sessions()
    data = bytearray(seal(a, ALICE, "alice", "bob", {"text": "x"}).to_bytes())
    data[-1] ^= 0x01
    before = snapshot(b)
    with pytest.raises(CryptoError, match="Authentication tag mismatch"):
        unseal(b, bytes(data), bundle_of(ALICE, "alice"))
    assert snapshot(b) == before


def test_unseal_with_the_wrong_sender_bundle() -> None:
    a, b = sessions()
    env = seal(a, ALICE, "alice", "bob", {"text": "x"})
    carol = labelled_keypair("carol")
    with pytest.raises(CryptoError):
        unseal(b, env, bundle_of(carol, "alice"))


def test_seal_with_a_foreign_signing_key_rejected() -> None:
    a, b = sessions()
    env = seal(a, labelled_keypair("mallory"), "alice", "bob", {"text": "x"})
    with pytest.raises(SignatureError):
        unseal(b, env, bundle_of(ALICE, "alice"))


def test_unsigned_envelope_rejected_by_unseal() -> None:
    a, b = sessions()
    a._sending().sign_messages = False
    env = seal(a, ALICE, "alice", "bob", {"text": "x"})
    with pytest.raises(SignatureError, match="unsigned message in a signed session"):
        unseal(b, env, bundle_of(ALICE, "alice"))


def test_payload_must_be_a_json_object() -> None:
    a, b = sessions()
    inner = a._sending()
    inner.local_id, inner.peer_id = "alice", "bob"
    env = inner.encrypt(ALICE.identity, b"[1, 2]", message_id=bytes(16), timestamp_ms=1)
    with pytest.raises(CryptoError):
        unseal(b, env, bundle_of(ALICE, "alice"))


def test_key_exchange_warns_towards_agent() -> None:
    with pytest.warns(DeprecationWarning, match="Use agentmesh.Agent"):
        perform_key_exchange(ALICE, bundle_of(BOB, "bob"))


def test_key_exchange_with_oneself_or_bad_bundle() -> None:
    with pytest.raises(CryptoError):
        perform_key_exchange(ALICE, bundle_of(ALICE, "alice"))
    bad = bundle_of(BOB, "bob")
    bad["identity_binding"] = bundle_of(ALICE, "alice")["identity_binding"]
    with pytest.raises(SignatureError):
        perform_key_exchange(ALICE, bad)
    with pytest.raises(DecodeError):
        perform_key_exchange(ALICE, {"agent_id": "bob"})


def test_forward_secrecy_after_the_first_round_trip() -> None:
    """Unlike version 1, a later copy of the state cannot read earlier traffic."""
    a, b = sessions()
    early = [a.encrypt(b"early %d" % i) for i in range(2)]
    for ct in early:
        b.decrypt(ct)
    a.decrypt(b.encrypt(b"reply"))
    b.decrypt(a.encrypt(b"next"))
    later = copy.deepcopy(b)
    for ct in early:
        with pytest.raises(CryptoError):
            later.decrypt(ct)
