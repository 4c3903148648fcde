"""The codecs' hot-path shortcuts accept, refuse and produce exactly what the general code does.

``decode_envelope`` tries a few slices for normal envelopes before the strict
reader; ``decode_frame`` and ``encode_frame`` do SEND, SEND_ACK, PUSH and ACK in
one struct call. Each shortcut must be invisible: same result, same error.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from agentmesh.errors import DecodeError
from agentmesh.wire import envelope as env
from agentmesh.wire import frames as f
from agentmesh.wire.codec import Reader, Writer


def _normal(sender: str = "alice", recipient: str = "bob", size: int = 300) -> bytes:
    return env.Envelope(
        message_id=os.urandom(16),
        timestamp=1_700_000_000_123,
        sender=sender,
        recipient=recipient,
        ratchet=env.RatchetHeader(os.urandom(32), 3, 7),
        prekey=None,
        ciphertext=os.urandom(size),
    ).to_bytes()


def _outcome_envelope(decode: object, data: bytes) -> object:
    try:
        parsed = decode(data, env.MAX_CIPHERTEXT_LEN)  # type: ignore[operator]
    except DecodeError as exc:
        return ("error", str(exc))
    if parsed is None:
        return None
    return (parsed, parsed.header_bytes)


def _same_as_strict(data: bytes) -> None:
    strict = _outcome_envelope(env._decode_strict, data)
    public = _outcome_envelope(lambda d, m: env.decode_envelope(d, max_ciphertext=m), data)
    assert public == strict
    fast = _outcome_envelope(env._decode_normal, data)
    assert fast is None or fast == strict  # the shortcut either agrees or steps aside


def test_a_normal_envelope_takes_the_shortcut() -> None:
    data = _normal()
    fast = env._decode_normal(data, env.MAX_CIPHERTEXT_LEN)
    assert fast is not None
    assert fast == env._decode_strict(data, env.MAX_CIPHERTEXT_LEN)
    assert fast.header_bytes == env._decode_strict(data, env.MAX_CIPHERTEXT_LEN).header_bytes
    assert fast.to_bytes() == data


@settings(max_examples=400, deadline=None)
@given(
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=0, max_value=255),
    st.sampled_from(["cut", "flip", "extend", "length"]),
    st.sampled_from(["a", "alice", "x" * 64, "n.o_d-e"]),
)
def test_mutated_envelopes_decode_exactly_as_the_strict_reader(
    position: int, value: int, how: str, sender: str
) -> None:
    data = bytearray(_normal(sender=sender, size=20 + position % 50))
    index = position % len(data)
    if how == "cut":
        del data[index:]
    elif how == "flip":
        data[index] = value
    elif how == "extend":
        data += bytes([value])
    else:  # corrupt the ciphertext length field
        length_at = len(data) - (20 + position % 50) - 4
        data[length_at + index % 4] = value
    _same_as_strict(bytes(data))


def test_envelope_edge_cases_decode_exactly_as_the_strict_reader() -> None:
    data = _normal(size=16)
    for candidate in (
        data,
        data[:-1],
        data + b"\x00",
        data[:-20] + (15).to_bytes(4, "big") + data[-15:],  # ciphertext shorter than a tag
        data.replace(b"alice", b"al ce", 1),
        data.replace(b"alice", b"al\xffce", 1),
        bytes([2]) + data[1:],
        data[:1] + bytes([3]) + data[2:],
        b"",
    ):
        _same_as_strict(candidate)
    _same_as_strict(bytearray(data))  # type: ignore[arg-type]  # not bytes: strict path


def _strict_frame(frame_type: int, body: bytes) -> object:
    try:
        cls = f.FRAME_TYPES[frame_type]
        r = Reader(body, "frame")
        frame = cls.read_body(r)
        r.finish()
    except DecodeError:
        return "error"
    return frame


def _public_frame(frame_type: int, body: bytes) -> object:
    try:
        return f.decode_frame(frame_type, body)
    except DecodeError:
        return "error"


def _slow_encode(frame: f.Frame) -> bytes:
    w = Writer()
    frame.write_body(w)
    body = w.getvalue()
    return (len(body) + 1).to_bytes(4, "big") + bytes((frame.TYPE,)) + body


HOT = [
    f.Send(7, _normal()),
    f.Send(0xFFFFFFFF, b""),
    f.SendAck(1, b"m" * 16, False),
    f.SendAck(2, b"n" * 16, True),
    f.Push(2**63, b"p" * 16, _normal()),
    f.Push(0, b"q" * 16, b""),
    f.Ack((b"a" * 16, b"b" * 16)),
    f.Ack(()),
]


def test_hot_frames_encode_byte_for_byte_like_the_writer() -> None:
    for frame in HOT:
        assert f.encode_frame(frame) == _slow_encode(frame)
        encoded = f.encode_frame(frame)
        assert f.decode_frame(encoded[4], encoded[5:]) == frame


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(range(len(HOT))),
    st.integers(min_value=0, max_value=600),
    st.integers(min_value=0, max_value=255),
    st.sampled_from(["cut", "flip", "extend"]),
)
def test_mutated_hot_frames_decode_exactly_as_the_strict_reader(
    which: int, position: int, value: int, how: str
) -> None:
    encoded = f.encode_frame(HOT[which])
    frame_type, body = encoded[4], bytearray(encoded[5:])
    index = position % (len(body) + 1)
    if how == "cut":
        del body[index:]
    elif how == "flip" and body:
        body[index % len(body)] = value
    else:
        body += bytes([value])
    assert _public_frame(frame_type, bytes(body)) == _strict_frame(frame_type, bytes(body))


def test_out_of_range_fields_still_raise() -> None:
    for frame in (f.SendAck(1, b"short", False), f.Push(1, b"short", b"x")):
        try:
            f.encode_frame(frame)
        except ValueError:
            continue
        raise AssertionError(f"{frame!r} encoded")
