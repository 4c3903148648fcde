"""Identities: the Ed25519+X25519 pair and its binding, fingerprints, safety numbers,
private serialization and version 1's AgentKeyPair dict format."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from typing import Any

import pytest
from deterministic import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import (
    IdentityKeyPair,
    PublicIdentity,
    decode_identity_private,
    encode_identity_private,
    fingerprint_of,
    safety_number,
)
from agentmesh.crypto.keypair import AgentKeyPair, public_identity_from_bundle
from agentmesh.errors import AgentMeshError, DecodeError, InvalidKeyError, SignatureError

FINGERPRINT = re.compile(r"^([0-9a-f]{4}:){7}[0-9a-f]{4}$")
SAFETY_NUMBER = re.compile(r"^(\d{5} ){11}\d{5}$")


def seeded(label: str) -> IdentityKeyPair:
    stream = hashlib.sha512(label.encode()).digest()
    return IdentityKeyPair.from_private_bytes(stream[:32], stream[32:])


ALICE, BOB = seeded("alice"), seeded("bob")


# --- keys and binding -------------------------------------------------------------------


def test_public_identity_is_bound_and_verifies() -> None:
    public = ALICE.public
    assert len(public.signing) == 32 and len(public.exchange) == 32 and len(public.binding) == 64
    assert public.verify() is public
    p.ed25519_verify(
        public.signing, public.binding, b"AgentMesh-identity-binding-v1" + public.exchange
    )
    assert public.exchange == p.x25519_public_bytes(ALICE.exchange_private)


def test_binding_rejects_swapped_exchange_key() -> None:
    forged = dataclasses.replace(ALICE.public, exchange=BOB.public.exchange)
    with pytest.raises(SignatureError):
        forged.verify()
    with pytest.raises(SignatureError):
        dataclasses.replace(ALICE.public, binding=BOB.public.binding).verify()


def test_binding_rejects_bad_keys() -> None:
    with pytest.raises(InvalidKeyError):
        dataclasses.replace(ALICE.public, exchange=bytes(32)).verify()
    with pytest.raises(InvalidKeyError):
        dataclasses.replace(ALICE.public, signing=b"\x01" * 31).verify()


def test_encode_decode() -> None:
    data = ALICE.public.encode()
    assert len(data) == 128
    assert data == ALICE.public.signing + ALICE.public.exchange + ALICE.public.binding
    assert PublicIdentity.decode(data) == ALICE.public
    for bad in (data[:-1], data + b"\x00", b""):
        with pytest.raises(DecodeError):
            PublicIdentity.decode(bad)


def test_generate_is_deterministic_with_injected_rng() -> None:
    def rng(n: int) -> bytes:
        return bytes([9]) * n

    assert IdentityKeyPair.generate(rng).public == IdentityKeyPair.generate(rng).public
    assert IdentityKeyPair.generate().public != IdentityKeyPair.generate().public


def test_private_serialization_round_trip() -> None:
    data = encode_identity_private(ALICE)
    assert len(data) == 65 and data[0] == 1
    assert decode_identity_private(data).public == ALICE.public
    with pytest.raises(DecodeError):
        decode_identity_private(b"\x02" + data[1:])
    with pytest.raises(DecodeError):
        decode_identity_private(data[:-1])
    with pytest.raises(InvalidKeyError):
        IdentityKeyPair.from_private_bytes(b"short", bytes(32))


def test_repr_does_not_leak_private_keys() -> None:
    signing, exchange = ALICE.private_bytes()
    for text in (repr(ALICE), repr(AgentKeyPair(ALICE))):
        assert ALICE.fingerprint in text
        assert signing.hex() not in text and exchange.hex() not in text


# --- fingerprints and safety numbers ------------------------------------------------------


def test_fingerprint_format() -> None:
    for ident in (ALICE, BOB, IdentityKeyPair.generate()):
        assert FINGERPRINT.match(ident.fingerprint)
        digest = hashlib.sha256(ident.public.signing).hexdigest()
        assert ident.fingerprint.replace(":", "") == digest[:32]
        assert ident.fingerprint == fingerprint_of(ident.public.signing) == ident.public.fingerprint
    assert ALICE.fingerprint != BOB.fingerprint


def test_safety_number_symmetric_and_formatted() -> None:
    a, b = ALICE.public.signing, BOB.public.signing
    number = safety_number("alice", a, "bob", b)
    assert SAFETY_NUMBER.match(number)
    assert len(number.replace(" ", "")) == 60
    assert number == safety_number("bob", b, "alice", a)


def test_safety_number_changes_with_any_input() -> None:
    a, b = ALICE.public.signing, BOB.public.signing
    number = safety_number("alice", a, "bob", b)
    carol = seeded("carol").public.signing
    assert safety_number("alice", a, "bob", carol) != number
    assert safety_number("alice", a, "bobby", b) != number
    assert safety_number("alicia", a, "bob", b) != number


def test_safety_number_algorithm() -> None:
    """Signal's NumericFingerprintGenerator shape: 5200 SHA-512 iterations, 5-byte chunks."""

    def half(key: bytes, agent_id: str) -> str:
        digest = hashlib.sha512(b"\x00\x00" + key + agent_id.encode()).digest()
        for _ in range(5200):
            digest = hashlib.sha512(digest + key).digest()
        return "".join(
            f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
        )

    a, b = ALICE.public.signing, BOB.public.signing
    digits = "".join(sorted([half(a, "alice"), half(b, "bob")]))
    assert safety_number("alice", a, "bob", b) == " ".join(
        digits[i : i + 5] for i in range(0, 60, 5)
    )


# --- version 1's AgentKeyPair ------------------------------------------------------------


def test_agent_keypair_v1_dict_round_trip() -> None:
    pair = AgentKeyPair(ALICE)
    d = pair.to_dict()
    assert set(d) == {"identity_private", "exchange_private"}
    signing, exchange = ALICE.private_bytes()
    assert base64.urlsafe_b64decode(d["identity_private"]) == signing
    assert base64.urlsafe_b64decode(d["exchange_private"]) == exchange
    assert AgentKeyPair.from_dict(d).fingerprint == pair.fingerprint


def test_agent_keypair_loads_a_handwritten_v1_file() -> None:
    signing, exchange = bytes(range(32)), bytes(range(32, 64))
    old = {
        "identity_private": base64.urlsafe_b64encode(signing).decode(),
        "exchange_private": base64.urlsafe_b64encode(exchange).decode(),
    }
    pair = AgentKeyPair.from_dict(old)
    assert pair.identity.private_bytes()[0] == signing
    assert pair.public == IdentityKeyPair.from_private_bytes(signing, exchange).public


def test_agent_keypair_public_bundle() -> None:
    pair = AgentKeyPair(BOB)
    bundle = pair.public_bundle()
    assert bundle["fingerprint"] == BOB.fingerprint
    assert public_identity_from_bundle(bundle) == BOB.public
    bundle["exchange_public"] = base64.urlsafe_b64encode(ALICE.public.exchange).decode()
    with pytest.raises(SignatureError):
        public_identity_from_bundle(bundle)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {},
        {"identity_private": "x"},
        {"identity_private": 5, "exchange_private": 5},
        {"identity_private": "AAAA", "exchange_private": "AAAA"},
        {"identity_private": "é" * 44, "exchange_private": "é" * 44},
        {"identity_private": "!" * 44, "exchange_private": "!" * 44},
    ],
)
def test_agent_keypair_from_bad_dict(bad: Any) -> None:
    with pytest.raises(DecodeError):
        AgentKeyPair.from_dict(bad)


def test_public_identity_from_bad_bundles() -> None:
    with pytest.raises(DecodeError):
        public_identity_from_bundle("nope")  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        public_identity_from_bundle({"identity_public": "AAAA"})


# --- arbitrary input -------------------------------------------------------------------

_VALUES = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.lists(st.integers(), max_size=3),
)


@FUZZ
@given(st.binary(max_size=200))
def test_public_identity_decode_arbitrary(data: bytes) -> None:
    try:
        PublicIdentity.decode(data).verify()
    except AgentMeshError:
        pass


@FUZZ
@given(st.binary(max_size=100))
def test_decode_identity_private_arbitrary(data: bytes) -> None:
    try:
        decode_identity_private(data)
    except AgentMeshError:
        pass


@FUZZ
@given(
    st.one_of(
        st.dictionaries(st.text(max_size=20), _VALUES, max_size=4),
        st.fixed_dictionaries({"identity_private": _VALUES, "exchange_private": _VALUES}),
        st.fixed_dictionaries(
            {
                "identity_private": st.binary(min_size=32, max_size=32).map(
                    lambda b: base64.urlsafe_b64encode(b).decode()
                ),
                "exchange_private": st.binary(min_size=30, max_size=34).map(
                    lambda b: base64.urlsafe_b64encode(b).decode()
                ),
            }
        ),
    )
)
def test_agent_keypair_from_arbitrary_dict(data: dict[str, Any]) -> None:
    try:
        AgentKeyPair.from_dict(data)
    except AgentMeshError:
        pass


@FUZZ
@given(
    st.fixed_dictionaries(
        {"identity_public": _VALUES, "exchange_public": _VALUES, "identity_binding": _VALUES}
    )
)
def test_public_identity_from_arbitrary_bundle(data: dict[str, Any]) -> None:
    try:
        public_identity_from_bundle(data)
    except AgentMeshError:
        pass
