"""Property tests: hostile bytes only ever raise AgentMeshError and change no state."""

from __future__ import annotations

import base64
import json

import pytest
from agent_helpers import RecordingHub
from agentkit import Inbox
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentmesh import Agent, AgentMeshError
from agentmesh.keyfile import decode_key_file, encode_key_file

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,  # the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

passphrases = st.one_of(
    st.none(), st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
)

# Values for the KDF fields, including wrong types and out-of-range numbers.
kdf_numbers = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 16, 1024, 2**14, 2**15, 2**20, 2**21, -1]),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.none(),
)
b64ish = st.one_of(
    st.sampled_from(["", "AAAA", "AA", "====", "a-_b", "!!"]),
    st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.integers(),
)


@st.composite
def encrypted_docs(draw: st.DrawFn) -> bytes:
    doc = {
        "format": "agentmesh-key-v2",
        "kdf": draw(st.sampled_from(["scrypt", "scrypt", "argon2", None])),
        "n": draw(kdf_numbers),
        "r": draw(kdf_numbers),
        "p": draw(kdf_numbers),
        "salt": draw(b64ish),
        "nonce": draw(b64ish),
        "ciphertext": draw(b64ish),
    }
    for key in draw(st.lists(st.sampled_from(sorted(doc)), max_size=3)):
        doc.pop(key, None)
    return json.dumps(doc).encode()


plain_docs = st.fixed_dictionaries(
    {},
    optional={
        "identity_private": b64ish,
        "exchange_private": b64ish,
        "format": st.text(max_size=5),
    },
).map(lambda d: json.dumps(d).encode())


@SETTINGS
@given(
    data=st.one_of(st.binary(max_size=2048), encrypted_docs(), plain_docs),
    passphrase=passphrases,
)
def test_decode_key_file_raises_only_agentmesh_errors(data: bytes, passphrase: str | None) -> None:
    try:
        keypair = decode_key_file(data, passphrase)
    except AgentMeshError:
        return
    # Anything that loads must be a usable identity that round-trips.
    assert decode_key_file(encode_key_file(keypair)).fingerprint == keypair.fingerprint


def test_decode_key_file_refuses_expensive_kdf_parameters() -> None:
    for n, r, p in [(2**20, 2**20, 1), (2**20, 8, 1), (2**15, 8, 2**20), (3, 8, 1), (True, 8, 1)]:
        doc = {
            "format": "agentmesh-key-v2",
            "kdf": "scrypt",
            "n": n,
            "r": r,
            "p": p,
            "salt": "AAAA",
            "nonce": "AAAAAAAAAAAAAAAA",
            "ciphertext": "AAAA",
        }
        with pytest.raises(AgentMeshError):
            decode_key_file(json.dumps(doc).encode(), "pw")


# --------------------------------------------------------------------------- envelopes


def _envelope_like() -> st.SearchStrategy[bytes]:
    # Raw bytes, and bytes that get past the version and kind bytes.
    return st.one_of(
        st.binary(max_size=4096),
        st.builds(
            lambda kind, rest: bytes([1, kind]) + rest,
            st.sampled_from([1, 2]),
            st.binary(max_size=2048),
        ),
    )


def test_receive_envelope_arbitrary_bytes() -> None:
    hub = RecordingHub()
    alice = Agent("alice", hub=hub)
    bob = Agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)
    alice.send("bob", "warm-up")  # bob has a session and a pinned peer
    before = bob.status()

    @SETTINGS
    @given(data=_envelope_like())
    def check(data: bytes) -> None:
        with pytest.raises(AgentMeshError):
            bob.endpoint.receive_envelope(data)
        assert bob.status() == before

    check()
    assert inbox.texts == ["warm-up"]
    alice.send("bob", "still fine")
    assert inbox.texts == ["warm-up", "still fine"]
    alice.close()
    bob.close()


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        out = bytearray(data)
        for index in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4)):
            out[index] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    start = draw(st.integers(0, len(data) - 1))
    return data[:start] + draw(st.binary(max_size=16)) + data[start + 1 :]


@pytest.mark.parametrize("kind", ["prekey", "normal"])
def test_receive_mutated_envelopes(kind: str) -> None:
    """Every alteration of a genuine envelope is refused and leaves no trace."""
    hub = RecordingHub()
    alice = Agent("alice", hub=hub)
    bob = Agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)
    alice.on_message(lambda m: None)
    if kind == "normal":
        alice.send("bob", "warm-up")
        bob.send("alice", "ack")
    hub.hold = True
    alice.send("bob", "genuine")
    hub.hold = False
    genuine = hub.envelopes[-1]
    before = bob.status()
    seen_before = list(inbox.texts)

    @SETTINGS
    @given(data=mutations(genuine))
    def check(data: bytes) -> None:
        if data == genuine:
            return
        with pytest.raises(AgentMeshError):
            bob.endpoint.receive_envelope(data)
        assert bob.status() == before

    check()
    assert inbox.texts == seen_before
    # The genuine envelope is still accepted, and the conversation goes on both ways.
    assert not bob.endpoint.receive_envelope(genuine).duplicate
    bob.endpoint.dispatch_pending()
    assert inbox.texts == [*seen_before, "genuine"]
    bob.send("alice", "reply")
    alice.send("bob", "next")
    assert inbox.texts[-1] == "next"
    alice.close()
    bob.close()
