"""AgentMesh's own fixed-randomness vectors (``tests/vectors/agentmesh_*.json``).

These pin the wire format so that it can never drift silently. If one of these
fails, the change you made breaks interoperability with every deployed peer:
revert it, or make it deliberately (bump the version byte, update
docs/PROTOCOL.md, regenerate with tests/vectors/generate_agentmesh_vectors.py).

ML-KEM encapsulation randomness cannot be injected, so the initiator's side is
checked by rebuilding its session from the *recorded* shared key and KEM
ciphertext, and the responder's side by deriving everything from the recorded
initial message.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from agentmesh.crypto import pqxdh
from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair, PublicIdentity, safety_number
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle, PrekeySecrets, SignedPrekey
from agentmesh.crypto.ratchet import RatchetState, kdf_ck, kdf_rk
from agentmesh.crypto.session import (
    Session,
    SessionRecord,
    message_key_material,
    session_associated_data,
)
from agentmesh.crypto.static import perform_key_exchange
from agentmesh.wire.envelope import (
    SESSION_SIGNED,
    PrekeyMessage,
    RatchetHeader,
    decode_envelope,
    encode_header,
)
from agentmesh.wire.payload import decode_payload, encode_payload

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


class DeterministicRng:
    """block_i = SHA-256(label || u32be(i)); rng(n) returns the next n stream bytes.

    Deliberately re-implemented here (not imported from the generator): the
    stream definition is part of the vectors.
    """

    def __init__(self, label: str) -> None:
        self._label = label.encode()
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.sha256(self._label + self._counter.to_bytes(4, "big")).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


@cache
def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"agentmesh_{name}.json").read_text())
    return data


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def identity(name: str) -> IdentityKeyPair:
    vec = load("identity")[name]
    return IdentityKeyPair.generate(DeterministicRng(vec["rng_label"]))


def _one_time_publics(secrets: PrekeySecrets) -> tuple[SignedPrekey, SignedPrekey]:
    [opk] = secrets.one_time.values()
    [otk] = secrets.one_time_kem.values()
    return opk.public, otk.public


def bob_prekeys() -> PrekeySecrets:
    vec = load("prekeys")
    rng = DeterministicRng(vec["rng_label"])
    secrets = PrekeySecrets.create(identity("bob"), vec["created_ms"], rng)
    secrets.top_up(identity("bob"), vec["created_ms"], rng, pool_size=1)
    return secrets


# --- identity -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "bob"])
def test_identity_vectors(name: str) -> None:
    vec = load("identity")[name]
    ident = identity(name)
    signing, exchange = ident.private_bytes()
    assert signing.hex() == vec["ed25519_private"]
    assert exchange.hex() == vec["x25519_private"]
    assert ident.public.signing.hex() == vec["ed25519_public"]
    assert ident.public.exchange.hex() == vec["x25519_public"]
    assert ident.public.binding.hex() == vec["binding_signature"]
    assert (
        h(vec["binding_signed_message"]) == b"AgentMesh-identity-binding-v1" + ident.public.exchange
    )
    p.ed25519_verify(ident.public.signing, ident.public.binding, h(vec["binding_signed_message"]))
    assert ident.public.encode().hex() == vec["public_identity_encoding"]
    assert ident.fingerprint == vec["fingerprint"]
    assert AgentKeyPair(ident).to_dict() == vec["v1_key_dict"]
    # an independent implementation needs only the raw private keys
    rebuilt = IdentityKeyPair.from_private_bytes(
        h(vec["ed25519_private"]), h(vec["x25519_private"])
    )
    assert rebuilt.public == ident.public
    assert AgentKeyPair.from_dict(vec["v1_key_dict"]).public == ident.public
    assert PublicIdentity.decode(h(vec["public_identity_encoding"])).verify() == ident.public
    assert vec["fingerprint"] == ":".join(
        hashlib.sha256(ident.public.signing).hexdigest()[i : i + 4] for i in range(0, 32, 4)
    )


def test_safety_number_vector() -> None:
    vec = load("identity")
    a, b = identity("alice").public.signing, identity("bob").public.signing
    assert safety_number("alice", a, "bob", b) == vec["safety_number"]
    assert safety_number("bob", b, "alice", a) == vec["safety_number"]


# --- prekeys and bundles ----------------------------------------------------------


PREKEY_FIELDS = [
    "signed_prekey",
    "last_resort_kem_prekey",
    "one_time_prekey",
    "one_time_kem_prekey",
]


@pytest.mark.parametrize("field", PREKEY_FIELDS)
def test_prekey_vectors(field: str) -> None:
    vec = load("prekeys")[field]
    secrets = bob_prekeys()
    table = {
        "signed_prekey": secrets.signed,
        "last_resort_kem_prekey": secrets.last_resort,
        "one_time_prekey": secrets.one_time,
        "one_time_kem_prekey": secrets.one_time_kem,
    }[field]
    secret = table[vec["id"]]
    assert secret.private.hex() == vec["private"]
    assert secret.public.kind == vec["kind"]
    assert secret.public.public.hex() == vec["public"]
    assert secret.public.signature.hex() == vec["signature"]
    assert secret.public.encode().hex() == vec["encoding"]
    signed = SignedPrekey.signed_message(vec["kind"], vec["id"], h(vec["public"]))
    assert signed.hex() == vec["signed_message"]
    assert signed == b"AgentMesh-prekey-v1" + bytes([vec["kind"]]) + vec["id"].to_bytes(
        4, "big"
    ) + h(vec["public"])
    decoded = SignedPrekey.decode(h(vec["encoding"])).verify(identity("bob").public.signing)
    assert decoded == secret.public
    # the public key follows from the private key alone
    if vec["kind"] == 1:
        assert p.x25519_public_bytes(p.x25519_private_from_bytes(h(vec["private"]))) == h(
            vec["public"]
        )
    else:
        assert p.mlkem_public_bytes(p.mlkem_private_from_seed(h(vec["private"]))) == h(
            vec["public"]
        )


def test_bundle_vectors() -> None:
    vec = load("prekeys")
    secrets = bob_prekeys()
    bob = identity("bob")
    published = secrets.bundle("bob", bob.public)
    assert published.encode().hex() == vec["published_bundle"]
    one_time = published.with_one_time(*_one_time_publics(secrets))
    assert one_time.encode().hex() == vec["one_time_bundle"]
    for key in ("published_bundle", "one_time_bundle"):
        decoded = PrekeyBundle.decode(h(vec[key])).verify()
        assert decoded.encode().hex() == vec[key]
        assert decoded.identity == bob.public
    assert secrets.to_bytes().hex() == vec["prekey_secrets_state"]
    assert PrekeySecrets.from_bytes(h(vec["prekey_secrets_state"])).to_bytes() == secrets.to_bytes()


def test_bundle_byte_layout() -> None:
    """u8 version=1 | str8 agent_id | identity(128) | SPK | KEM | u8 flag [| OPK]."""
    vec = load("prekeys")
    data = h(vec["one_time_bundle"])
    assert data[0] == 1
    assert data[1] == 3 and data[2:5] == b"bob"
    assert data[5 : 5 + 128].hex() == load("identity")["bob"]["public_identity_encoding"]
    pos = 5 + 128
    for field in ("signed_prekey", "one_time_kem_prekey"):
        encoding = h(vec[field]["encoding"])
        assert data[pos : pos + len(encoding)] == encoding
        pos += len(encoding)
    assert data[pos] == 1
    assert data[pos + 1 :] == h(vec["one_time_prekey"]["encoding"])
    # a SignedPrekey encoding: u8 kind | u32 id | u16 len | public | 64-byte signature
    spk = h(vec["signed_prekey"]["encoding"])
    assert (
        spk[0] == 1
        and spk[1:5] == vec["signed_prekey"]["id"].to_bytes(4, "big")
        and spk[5:7] == (32).to_bytes(2, "big")
    )
    assert len(spk) == 1 + 4 + 2 + 32 + 64
    assert len(h(vec["one_time_kem_prekey"]["encoding"])) == 1 + 4 + 2 + 1184 + 64


# --- PQXDH ----------------------------------------------------------------------------


def _recorded_prekey_message(case: dict[str, Any]) -> PrekeyMessage:
    alice = load("identity")["alice"]
    return PrekeyMessage(
        identity_signing=h(alice["ed25519_public"]),
        identity_exchange=h(alice["x25519_public"]),
        identity_binding=h(alice["binding_signature"]),
        ephemeral=h(case["ephemeral_public"]),
        signed_prekey_id=case["signed_prekey_id"],
        kem_prekey_id=case["kem_prekey_id"],
        kem_ciphertext=h(case["kem_ciphertext"]),
        one_time_prekey_id=case["one_time_prekey_id"],
    )


@pytest.mark.parametrize("case_name", ["with_one_time_prekeys", "last_resort_only"])
def test_pqxdh_vectors(case_name: str) -> None:
    vec = load("pqxdh")
    case = vec[case_name]
    assert (
        vec["info"] == "AgentMesh_PQXDH_v1_X25519_SHA-256_ML-KEM-768" == pqxdh.PQXDH_INFO.decode()
    )
    alice, bob = identity("alice"), identity("bob")
    secrets = bob_prekeys()
    # the initiator's draws are deterministic: EK_A, then the first ratchet key
    rng = DeterministicRng(case["initiator_rng_label"])
    ephemeral = p.x25519_private_from_bytes(rng(32))
    assert p.x25519_private_bytes(ephemeral).hex() == case["ephemeral_private"]
    assert p.x25519_public_bytes(ephemeral).hex() == case["ephemeral_public"]
    spk_public = secrets.signed[case["signed_prekey_id"]].public.public
    # initiator-side DHs (section 3.3) ...
    assert p.x25519(alice.exchange_private, spk_public).hex() == case["dh1"]
    assert p.x25519(ephemeral, bob.public.exchange).hex() == case["dh2"]
    assert p.x25519(ephemeral, spk_public).hex() == case["dh3"]
    if case["one_time_prekey_id"] is None:
        assert case["dh4"] == ""
    else:
        opk_public = secrets.one_time[case["one_time_prekey_id"]].public.public
        assert p.x25519(ephemeral, opk_public).hex() == case["dh4"]
    # ... the recorded KEM ciphertext decapsulates to the recorded secret ...
    seed, one_time = secrets.kem_private(case["kem_prekey_id"])
    assert one_time == case["kem_prekey_is_one_time"]
    ss = p.mlkem_decapsulate(p.mlkem_private_from_seed(seed), h(case["kem_ciphertext"]))
    assert ss.hex() == case["kem_shared_secret"]
    # ... KDF (section 2.2) from the recorded inputs
    km = h(case["dh1"]) + h(case["dh2"]) + h(case["dh3"]) + h(case["dh4"]) + ss
    assert h(case["kdf_input"]) == b"\xff" * 32 + km
    assert pqxdh.kdf(km).hex() == case["shared_key"]
    assert (
        p.hkdf_sha256(h(case["kdf_input"]), salt=bytes(32), info=pqxdh.PQXDH_INFO, length=32).hex()
        == case["shared_key"]
    )
    # the responder derives the same SK and AD from the recorded initial message
    result, spk_private = pqxdh.respond(
        bob, "bob", secrets, "alice", _recorded_prekey_message(case)
    )
    assert result.shared_key.hex() == case["shared_key"]
    assert result.associated_data.hex() == case["associated_data"]
    assert p.x25519_public_bytes(p.x25519_private_from_bytes(spk_private)) == spk_public
    # AD layout: "AgentMesh-AD-v1" | str8 initiator id | Ed25519 | X25519 | str8 responder id | ...
    ad = (
        b"AgentMesh-AD-v1"
        + b"\x05alice"
        + alice.public.signing
        + alice.public.exchange
        + b"\x03bob"
        + bob.public.signing
        + bob.public.exchange
    )
    assert ad.hex() == case["associated_data"]
    # RatchetInitAlice from the same rng stream
    dhs = p.x25519_private_from_bytes(rng(32))
    assert p.x25519_private_bytes(dhs).hex() == case["initiator_ratchet_private"]
    assert p.x25519_public_bytes(dhs).hex() == case["initiator_ratchet_public"]
    assert p.x25519(dhs, spk_public).hex() == case["initiator_ratchet_dh"]
    rk, ck = kdf_rk(h(case["shared_key"]), h(case["initiator_ratchet_dh"]))
    assert rk.hex() == case["initiator_root_key_1"]
    assert ck.hex() == case["initiator_sending_chain_key_1"]


def test_pqxdh_initiator_draws_match_vectors() -> None:
    """Session.initiate with the recorded rng: everything but the KEM output is pinned."""
    for case_name, with_opk in (("with_one_time_prekeys", True), ("last_resort_only", False)):
        case = load("pqxdh")[case_name]
        secrets = bob_prekeys()
        bundle = secrets.bundle("bob", identity("bob").public)
        if with_opk:
            bundle = bundle.with_one_time(*_one_time_publics(secrets))
        session = Session.initiate(
            identity("alice"), "alice", bundle, rng=DeterministicRng(case["initiator_rng_label"])
        )
        assert session.base_key.hex() == case["ephemeral_public"]
        assert session.ratchet.dhs_public.hex() == case["initiator_ratchet_public"]
        assert session.pending_prekey is not None
        assert session.pending_prekey.kem_prekey_id == case["kem_prekey_id"]
        assert session.pending_prekey.one_time_prekey_id == case["one_time_prekey_id"]
        # the session AD is the PQXDH AD followed by the session flags (signed)
        assert session.associated_data.hex() == case["associated_data"] + "01"


# --- Double Ratchet KDFs ------------------------------------------------------------


def test_kdf_rk_vector() -> None:
    vec = load("ratchet")["kdf_rk"]
    assert vec["info"] == "AgentMesh_v1_Ratchet"
    rk, ck = kdf_rk(h(vec["root_key"]), h(vec["dh_out"]))
    assert rk.hex() == vec["new_root_key"]
    assert ck.hex() == vec["chain_key"]
    out = p.hkdf_sha256(
        h(vec["dh_out"]), salt=h(vec["root_key"]), info=b"AgentMesh_v1_Ratchet", length=64
    )
    assert out.hex() == vec["new_root_key"] + vec["chain_key"]


def test_kdf_ck_and_message_key_vectors() -> None:
    chain = load("ratchet")["kdf_ck_chain"]
    ck = h(chain[0]["chain_key"])
    for step in chain:
        assert ck.hex() == step["chain_key"]
        next_ck, mk = kdf_ck(ck)
        assert mk.hex() == step["message_key"] == p.hmac_sha256(ck, b"\x01").hex()
        assert next_ck.hex() == step["next_chain_key"] == p.hmac_sha256(ck, b"\x02").hex()
        message_id = h(step["message_id"])
        key, nonce = message_key_material(mk, message_id)
        assert key.hex() == step["aes_key"] and nonce.hex() == step["nonce"]
        expanded = p.hkdf_sha256(mk, salt=message_id, info=b"AgentMesh_v2_MessageKeys", length=44)
        assert expanded.hex() == step["aes_key"] + step["nonce"]
        ck = next_ck


def test_session_first_chain_vector() -> None:
    chain = load("ratchet")["session_alice_sending_chain"]
    assert (
        chain[0]["chain_key"]
        == load("pqxdh")["with_one_time_prekeys"]["initiator_sending_chain_key_1"]
    )
    ck = h(chain[0]["chain_key"])
    for step in chain:
        assert ck.hex() == step["chain_key"]
        ck, mk = kdf_ck(ck)
        assert mk.hex() == step["message_key"]


# --- envelopes --------------------------------------------------------------------


def _messages() -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in load("envelope")["messages"]}


def _rebuilt_alice_session() -> Session:
    """Alice's session rebuilt from the recorded SK and KEM ciphertext (no KEM randomness)."""
    case = load("pqxdh")["with_one_time_prekeys"]
    rng = DeterministicRng(case["initiator_rng_label"])
    rng(32)  # EK_A was drawn first
    bob_public = identity("bob").public
    spk_public = bob_prekeys().signed[case["signed_prekey_id"]].public.public
    return Session(
        local_id="alice",
        peer_id="bob",
        peer_identity=bob_public,
        associated_data=session_associated_data(h(case["associated_data"]), SESSION_SIGNED),
        ratchet=RatchetState.initiator(h(case["shared_key"]), spk_public, rng),
        base_key=h(case["ephemeral_public"]),
        pending_prekey=_recorded_prekey_message(case),
    )


def _bob_record_after_alice_messages() -> SessionRecord:
    msgs = _messages()
    record, new_secrets, m1 = SessionRecord().decrypt(
        decode_envelope(h(msgs["alice_1"]["envelope"])),
        identity=identity("bob"),
        prekeys=bob_prekeys(),
        rng=DeterministicRng(load("envelope")["bob_ratchet_rng_label"]),
    )
    assert new_secrets is not None
    assert decode_payload(m1.payload) == msgs["alice_1"]["payload"]
    record, _, m2 = record.decrypt(
        decode_envelope(h(msgs["alice_2"]["envelope"])),
        identity=identity("bob"),
        prekeys=new_secrets,
    )
    assert decode_payload(m2.payload) == msgs["alice_2"]["payload"]
    return record


@pytest.mark.parametrize("name", ["alice_1", "alice_2", "bob_1"])
def test_envelope_parses_and_reencodes(name: str) -> None:
    msg = _messages()[name]
    data = h(msg["envelope"])
    env = decode_envelope(data)
    assert env.kind == msg["kind"]
    assert env.message_id.hex() == msg["message_id"]
    assert env.timestamp == msg["timestamp_ms"]
    assert env.header_bytes.hex() == msg["header"]
    assert env.to_bytes() == data
    # re-encoding the parsed fields (not the kept header bytes) gives the same bytes
    assert (
        encode_header(
            env.message_id, env.timestamp, env.sender, env.recipient, env.ratchet, env.prekey
        )
        == env.header_bytes
    )
    assert data[len(env.header_bytes) : len(env.header_bytes) + 4] == len(env.ciphertext).to_bytes(
        4, "big"
    )
    assert encode_payload(msg["payload"]).hex() == msg["payload_bytes"]


def test_prekey_envelope_byte_layout() -> None:
    msg = _messages()["alice_1"]
    case = load("pqxdh")["with_one_time_prekeys"]
    alice = load("identity")["alice"]
    data = h(msg["envelope"])
    assert data[0] == 2  # version
    assert data[1] == 1  # kind: prekey
    assert data[2:18].hex() == msg["message_id"]
    assert int.from_bytes(data[18:26], "big") == msg["timestamp_ms"]
    assert data[26:32] == b"\x05alice"
    assert data[32:36] == b"\x03bob"
    assert data[36:68].hex() == case["initiator_ratchet_public"]  # ratchet DH
    assert data[68:72] == (0).to_bytes(4, "big")  # PN
    assert data[72:76] == (0).to_bytes(4, "big")  # N
    assert data[76] == 1  # session flags: signed
    assert data[77:109].hex() == alice["ed25519_public"]
    assert data[109:141].hex() == alice["x25519_public"]
    assert data[141:205].hex() == alice["binding_signature"]
    assert data[205:237].hex() == case["ephemeral_public"]
    assert int.from_bytes(data[237:241], "big") == case["signed_prekey_id"]
    assert int.from_bytes(data[241:245], "big") == case["kem_prekey_id"]
    assert data[245:1333].hex() == case["kem_ciphertext"]
    assert data[1333] == 1
    assert int.from_bytes(data[1334:1338], "big") == case["one_time_prekey_id"]
    assert len(msg["header"]) // 2 == 1338
    ct_len = int.from_bytes(data[1338:1342], "big")
    assert len(data) == 1342 + ct_len
    # inner plaintext: u8 flags | u32 len | payload | 64-byte signature; + 16-byte tag
    assert ct_len == 1 + 4 + len(h(msg["payload_bytes"])) + 64 + 16


def test_fixed_header_encoding() -> None:
    vec = load("envelope")["fixed_header"]
    header = encode_header(
        h(vec["message_id"]),
        vec["timestamp_ms"],
        vec["sender"],
        vec["recipient"],
        RatchetHeader(h(vec["ratchet_dh"]), vec["pn"], vec["n"]),
        None,
    )
    assert header.hex() == vec["encoding"]
    expected = (
        b"\x02\x02"
        + h(vec["message_id"])
        + vec["timestamp_ms"].to_bytes(8, "big")
        + b"\x03bob\x05alice"
        + h(vec["ratchet_dh"])
        + (7).to_bytes(4, "big")
        + (9).to_bytes(4, "big")
    )
    assert header == expected


def test_responder_decrypts_recorded_initiator_envelopes() -> None:
    record = _bob_record_after_alice_messages()
    session = record.active
    assert session is not None
    assert session.peer_identity == identity("alice").public
    assert (
        session.associated_data.hex()
        == load("pqxdh")["with_one_time_prekeys"]["associated_data"] + "01"
    )


def test_responder_signed_flags() -> None:
    msgs = _messages()
    record, secrets, m1 = SessionRecord().decrypt(
        decode_envelope(h(msgs["alice_1"]["envelope"])),
        identity=identity("bob"),
        prekeys=bob_prekeys(),
        rng=DeterministicRng(load("envelope")["bob_ratchet_rng_label"]),
    )
    assert (m1.signature is not None) is msgs["alice_1"]["signed"]
    assert secrets is not None
    _, _, m2 = record.decrypt(
        decode_envelope(h(msgs["alice_2"]["envelope"])), identity=identity("bob"), prekeys=secrets
    )
    assert (m2.signature is not None) is msgs["alice_2"]["signed"]
    # the one-time keys the initial message used are gone from the returned secrets
    case = load("pqxdh")["with_one_time_prekeys"]
    assert case["one_time_prekey_id"] not in secrets.one_time
    assert case["kem_prekey_id"] not in secrets.one_time_kem


def test_responder_reply_is_byte_exact() -> None:
    vec = load("envelope")
    msg = _messages()["bob_1"]
    session = _bob_record_after_alice_messages().active
    assert session is not None
    assert session.ratchet.dhs_public.hex() == vec["bob_ratchet_public"]
    env = session.encrypt(
        identity("bob"),
        h(msg["payload_bytes"]),
        message_id=h(msg["message_id"]),
        timestamp_ms=msg["timestamp_ms"],
    )
    assert env.to_bytes().hex() == msg["envelope"]


def test_initiator_envelopes_are_byte_exact_from_recorded_sk() -> None:
    msgs = _messages()
    alice = identity("alice")
    session = _rebuilt_alice_session()
    for name in ("alice_1", "alice_2"):
        env = session.encrypt(
            alice,
            h(msgs[name]["payload_bytes"]),
            message_id=h(msgs[name]["message_id"]),
            timestamp_ms=msgs[name]["timestamp_ms"],
        )
        assert env.to_bytes().hex() == msgs[name]["envelope"], name
    # and the rebuilt initiator reads the responder's reply
    new, message = session.decrypt(decode_envelope(h(msgs["bob_1"]["envelope"])))
    assert decode_payload(message.payload) == msgs["bob_1"]["payload"]
    assert message.signature is not None
    assert new.pending_prekey is None


def test_initiator_header_matches_except_kem_ciphertext() -> None:
    """Session.initiate with the recorded rng: a fresh KEM ciphertext, all else identical."""
    msg = _messages()["alice_1"]
    secrets = bob_prekeys()
    bundle = secrets.bundle("bob", identity("bob").public).with_one_time(
        *_one_time_publics(secrets)
    )
    case = load("pqxdh")["with_one_time_prekeys"]
    session = Session.initiate(
        identity("alice"), "alice", bundle, rng=DeterministicRng(case["initiator_rng_label"])
    )
    env = session.encrypt(
        identity("alice"),
        h(msg["payload_bytes"]),
        message_id=h(msg["message_id"]),
        timestamp_ms=msg["timestamp_ms"],
    )
    recorded = h(msg["header"])
    kem = slice(245, 1333)
    assert len(env.header_bytes) == len(recorded)
    assert env.header_bytes[: kem.start] == recorded[: kem.start]
    assert env.header_bytes[kem.stop :] == recorded[kem.stop :]


# --- version-1 static bootstrap -------------------------------------------------------


def test_static_first_message_vector() -> None:
    """Protocol 2's static path: the first sender initiates with a fresh ratchet key."""
    vec = load("static")
    alice, bob = AgentKeyPair(identity("alice")), AgentKeyPair(identity("bob"))
    dh = p.x25519(alice.identity.exchange_private, bob.public.exchange)
    assert dh.hex() == vec["dh"]
    sk = p.hkdf_sha256(b"\xff" * 32 + dh, salt=bytes(32), info=b"AgentMesh_static_v2", length=32)
    assert sk.hex() == vec["shared_key"]
    first = vec["first_message"]
    with pytest.warns(DeprecationWarning):
        sender = perform_key_exchange(
            alice,
            {**bob.public_bundle(), "agent_id": "bob"},
            _rng=DeterministicRng(vec["initiator_rng_label"]),
        )
        receiver = perform_key_exchange(bob, {**alice.public_bundle(), "agent_id": "alice"})
    ct = sender.encrypt(h(first["plaintext"]), h(first["associated_data"]))
    assert ct.hex() == first["ciphertext"]
    assert ct[:32].hex() == vec["initiator_ratchet_public"]
    assert sender._sessions[0].associated_data.hex() == vec["associated_data"]
    assert receiver.decrypt(ct, h(first["associated_data"])) == h(first["plaintext"])
