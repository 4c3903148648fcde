"""The envelope codec: exact layout, strict parsing, and the payload codec."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentmesh.errors import AgentMeshError, DecodeError
from agentmesh.wire.envelope import (
    ENVELOPE_VERSION,
    KIND_NORMAL,
    KIND_PREKEY,
    MAX_CIPHERTEXT_LEN,
    Envelope,
    PrekeyMessage,
    RatchetHeader,
    decode_envelope,
    encode_header,
)
from agentmesh.wire.payload import decode_payload, encode_payload

FUZZ = settings(max_examples=200, derandomize=True, database=None, deadline=None)

MID = bytes(range(16))
DH = bytes(range(32, 64))
PREKEY = PrekeyMessage(
    identity_signing=b"\x11" * 32,
    identity_exchange=b"\x22" * 32,
    identity_binding=b"\x33" * 64,
    ephemeral=b"\x44" * 32,
    signed_prekey_id=0x01020304,
    kem_prekey_id=0x05060708,
    kem_ciphertext=b"\x55" * 1088,
    one_time_prekey_id=0x090A0B0C,
)


def make(prekey: PrekeyMessage | None = None, ciphertext: bytes = b"\xaa" * 40, **kw: Any) -> bytes:
    fields: dict[str, Any] = {
        "message_id": MID,
        "timestamp": 1_700_000_000_123,
        "sender": "alice",
        "recipient": "bob.worker-1",
        "ratchet": RatchetHeader(DH, 3, 7),
        "prekey": prekey,
    }
    fields.update(kw)
    return encode_header(**fields) + len(ciphertext).to_bytes(4, "big") + ciphertext


def test_constants() -> None:
    assert (ENVELOPE_VERSION, KIND_PREKEY, KIND_NORMAL) == (2, 1, 2)
    assert MAX_CIPHERTEXT_LEN == 16 * 1024 * 1024


def test_normal_envelope_exact_layout() -> None:
    data = make()
    expected = (
        b"\x02\x02"
        + MID
        + (1_700_000_000_123).to_bytes(8, "big")
        + b"\x05alice"
        + b"\x0cbob.worker-1"
        + DH
        + (3).to_bytes(4, "big")
        + (7).to_bytes(4, "big")
        + (40).to_bytes(4, "big")
        + b"\xaa" * 40
    )
    assert data == expected
    env = decode_envelope(data)
    assert env.kind == KIND_NORMAL and env.prekey is None
    assert (env.sender, env.recipient, env.timestamp) == (
        "alice",
        "bob.worker-1",
        1_700_000_000_123,
    )
    assert env.ratchet == RatchetHeader(DH, 3, 7)
    assert env.header_bytes == data[: len(data) - 44]
    assert env.to_bytes() == data == bytes(env) == Envelope.from_bytes(data).to_bytes()


@pytest.mark.parametrize("opk", [0x090A0B0C, None])
def test_prekey_envelope_exact_layout(opk: int | None) -> None:
    prekey = PrekeyMessage(**_with_opk(opk))
    data = make(prekey)
    header_len = 2 + 16 + 8 + 6 + 13 + 32 + 8
    tail = data[header_len:]
    expected = (
        b"\x01"  # session flags: a signed session
        + b"\x11" * 32
        + b"\x22" * 32
        + b"\x33" * 64
        + b"\x44" * 32
        + bytes([1, 2, 3, 4, 5, 6, 7, 8])
        + b"\x55" * 1088
        + (b"\x01\x09\x0a\x0b\x0c" if opk is not None else b"\x00")
        + (40).to_bytes(4, "big")
        + b"\xaa" * 40
    )
    assert data[1] == KIND_PREKEY
    assert tail == expected
    env = decode_envelope(data)
    assert env.prekey == prekey and env.kind == KIND_PREKEY
    assert env.to_bytes() == data


def _with_opk(opk: int | None) -> dict[str, Any]:
    return {
        "identity_signing": PREKEY.identity_signing,
        "identity_exchange": PREKEY.identity_exchange,
        "identity_binding": PREKEY.identity_binding,
        "ephemeral": PREKEY.ephemeral,
        "signed_prekey_id": PREKEY.signed_prekey_id,
        "kem_prekey_id": PREKEY.kem_prekey_id,
        "kem_ciphertext": PREKEY.kem_ciphertext,
        "one_time_prekey_id": opk,
    }


def test_envelope_without_header_bytes_reencodes() -> None:
    env = decode_envelope(make())
    bare = Envelope(
        env.message_id, env.timestamp, env.sender, env.recipient, env.ratchet, None, env.ciphertext
    )
    assert bare.to_bytes() == env.to_bytes()
    assert bare == env  # header_bytes does not take part in equality


# --- strict parsing -------------------------------------------------------------------


@pytest.mark.parametrize("prekey", [None, PREKEY])
def test_every_truncation_and_any_extension_rejected(prekey: PrekeyMessage | None) -> None:
    data = make(prekey)
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode_envelope(data[:n])
    with pytest.raises(DecodeError, match="trailing"):
        decode_envelope(data + b"\x00")


def test_unknown_version_and_kind() -> None:
    data = make()
    for version in (0, 1, 3, 255):  # 1: protocol 1's message keys ignored the message id
        with pytest.raises(DecodeError, match="version"):
            decode_envelope(bytes([version]) + data[1:])
    for kind in (0, 3, 255):
        with pytest.raises(DecodeError, match="kind"):
            decode_envelope(data[:1] + bytes([kind]) + data[2:])


def test_bad_one_time_flag() -> None:
    data = bytearray(make(PrekeyMessage(**_with_opk(None))))
    flag_at = len(data) - 44 - 1
    assert data[flag_at] == 0
    data[flag_at] = 2
    with pytest.raises(DecodeError, match="flag"):
        decode_envelope(bytes(data))


@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFF])
def test_unknown_session_flags_rejected(flags: int) -> None:
    data = bytearray(make(PREKEY))
    flags_at = 2 + 16 + 8 + 6 + 13 + 32 + 8
    assert data[flags_at] == 1
    data[flags_at] = flags
    with pytest.raises(DecodeError, match="session flags"):
        decode_envelope(bytes(data))
    with pytest.raises(ValueError, match="session flags"):
        make(PrekeyMessage(**{**_with_opk(None), "session_flags": flags}))


@pytest.mark.parametrize("bad_id", ["", "-alice", "a/b", "a b", "ali\x00ce", "é", "x" * 65])
def test_invalid_agent_ids_rejected(bad_id: str) -> None:
    raw = bad_id.encode()[:255]
    header = b"\x02\x02" + MID + bytes(8) + bytes([len(raw)]) + raw + b"\x03bob" + DH + bytes(8)
    with pytest.raises(DecodeError):
        decode_envelope(header + (16).to_bytes(4, "big") + bytes(16))
    with pytest.raises(ValueError):
        make(sender=bad_id)


def test_ciphertext_bounds() -> None:
    with pytest.raises(DecodeError, match="GCM tag"):
        decode_envelope(make(ciphertext=b"\x00" * 15))
    decode_envelope(make(ciphertext=b"\x00" * 16))
    with pytest.raises(DecodeError):
        decode_envelope(make(ciphertext=b"\x00" * 100), max_ciphertext=99)
    header = make()[:-44]
    huge = header + (MAX_CIPHERTEXT_LEN + 1).to_bytes(4, "big")
    with pytest.raises(DecodeError, match="exceeds"):
        decode_envelope(huge)


def test_encode_header_rejects_bad_fields() -> None:
    with pytest.raises(ValueError):
        make(message_id=b"short")
    with pytest.raises(ValueError):
        make(ratchet=RatchetHeader(b"\x00" * 31, 0, 0))
    bad_kem = PrekeyMessage(**{**_with_opk(None), "kem_ciphertext": b"\x00" * 1087})
    with pytest.raises(ValueError):
        make(bad_kem)


def test_non_bytes_input() -> None:
    with pytest.raises(DecodeError):
        decode_envelope("not bytes")  # type: ignore[arg-type]
    decode_envelope(bytearray(make()))  # type: ignore[arg-type]
    decode_envelope(memoryview(make()))  # type: ignore[arg-type]


# --- arbitrary input -----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=1500))
def test_decode_envelope_arbitrary(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except AgentMeshError:
        return
    assert env.to_bytes() == data


_VALID = [make(), make(PREKEY), make(PrekeyMessage(**_with_opk(None)))]


@FUZZ
@given(st.sampled_from(_VALID), st.data())
def test_decode_mutated_envelopes(data: bytes, draw: st.DataObject) -> None:
    raw = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        raw[draw.draw(st.integers(0, len(raw) - 1))] = draw.draw(st.integers(0, 255))
    try:
        env = decode_envelope(bytes(raw))
    except AgentMeshError:
        return
    assert env.to_bytes() == bytes(raw)


# --- payloads ----------------------------------------------------------------------------


def test_payload_round_trip_and_compact_encoding() -> None:
    payload = {"type": "message", "text": "héllo ☃", "n": [1, 2.5, None, True]}
    data = encode_payload(payload)
    assert data == json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    assert decode_payload(data) == payload


@pytest.mark.parametrize("bad", [b"[1]", b"1", b'"s"', b"null", b"{", b"\xff\xfe", b""])
def test_payload_must_be_a_json_object(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_payload(bad)


def test_encode_payload_rejects_non_dicts_and_nan() -> None:
    with pytest.raises(TypeError):
        encode_payload([1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_payload({"x": float("nan")})


def test_deeply_nested_payload() -> None:
    with pytest.raises(DecodeError):
        decode_payload(b"[" * 100_000 + b"]" * 100_000)
    assert decode_payload(b'{"a":' + b"[" * 50 + b"]" * 50 + b"}") is not None


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.dictionaries(st.text(), _JSON, max_size=5))
def test_payload_round_trip_property(payload: dict[str, Any]) -> None:
    assert decode_payload(encode_payload(payload)) == payload


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_decode_payload_arbitrary(data: bytes) -> None:
    try:
        value = decode_payload(data)
    except AgentMeshError:
        return
    assert isinstance(value, dict)
