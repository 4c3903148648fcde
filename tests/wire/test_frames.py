"""The hub frame codec: round trips, strictness, and the streaming decoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentmesh.errors import DecodeError
from agentmesh.wire import frames as f

MID = bytes(range(16))

SAMPLES: list[f.Frame] = [
    f.Hello(1, b"\x07" * 32, "hub.example:7700", 1 << 20, 1 << 19),
    f.Login(1, 1, "alice", b"\x01" * 32, b"\x02" * 64, b""),
    f.Login(2, 1, "alice.bot-1_x", b"\x01" * 32, b"\x02" * 64, b"bundle-bytes"),
    f.Login(3, 2, "alice", b"\x01" * 32, b"\x02" * 64, b"", "hub.example:7700", b"\x03" * 32),
    f.Login(4, 2, "alice", b"\x01" * 32, b"\x02" * 64, b"b", "[::1]:7700", b""),
    f.LoggedIn(1, True),
    f.LoggedIn(0xFFFFFFFF, False),
    f.RotateKey(3, b"\x03" * 32, b"\x04" * 64, b"\x05" * 64),
    f.Ok(9),
    f.Error(0, "bad_frame", "", b"", True),
    f.Error(5, "mailbox_full", "quota: 10 messages", MID, False),
    f.Error(6, "x", "ünïcödé ✓"),
    f.Ping(1),
    f.Pong(1),
    f.PublishBundle(4, b"\x00" * 300),
    f.UploadPrekeys(5, ()),
    f.UploadPrekeys(5, (b"a", b"", b"\xff" * 1300)),
    f.FetchBundle(6, "bob"),
    f.Bundle(6, b"bundle"),
    f.PrekeysLow(19),
    f.Send(7, b"envelope" * 10),
    f.SendAck(7, MID, False),
    f.SendAck(8, MID, True),
    f.Push(2**64 - 1, MID, b"env"),
    f.Ack(()),
    f.Ack((MID, bytes(16))),
    f.ListAgents(10),
    f.Agents(10, ()),
    f.Agents(10, ("alice", "bob", "x" * 64)),
    f.GetStats(11),
    f.Stats(11, ()),
    f.Stats.from_mapping(11, {"queued": 3, "agents": 2**64 - 1}),
]


def _ids(frame: f.Frame) -> str:
    return type(frame).__name__


def test_every_frame_type_has_a_sample_and_a_unique_code() -> None:
    assert {type(s) for s in SAMPLES} == set(f.FRAME_TYPES.values())
    assert all(code == cls.TYPE for code, cls in f.FRAME_TYPES.items())


@pytest.mark.parametrize("frame", SAMPLES, ids=_ids)
def test_round_trip(frame: f.Frame) -> None:
    data = f.encode_frame(frame)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert data[4] == frame.TYPE
    assert f.decode_frame(data[4], data[5:]) == frame
    assert f.FrameDecoder().feed(data) == [frame]


def test_decoder_reassembles_byte_by_byte_and_in_bulk() -> None:
    stream = b"".join(f.encode_frame(s) for s in SAMPLES)
    decoder = f.FrameDecoder()
    out: list[f.Frame] = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == SAMPLES
    assert decoder.buffered == 0
    assert f.FrameDecoder().feed(stream) == SAMPLES


@pytest.mark.parametrize("frame", SAMPLES, ids=_ids)
def test_every_truncation_of_a_body_is_rejected(frame: f.Frame) -> None:
    body = f.encode_frame(frame)[5:]
    for cut in range(len(body)):
        with pytest.raises(DecodeError):
            f.decode_frame(frame.TYPE, body[:cut])
        # The same, framed with a consistent length prefix, through the decoder.
        framed = (cut + 1).to_bytes(4, "big") + bytes((frame.TYPE,)) + body[:cut]
        with pytest.raises(DecodeError):
            f.FrameDecoder().feed(framed)


@pytest.mark.parametrize("frame", SAMPLES, ids=_ids)
def test_partial_frames_are_buffered_not_rejected(frame: f.Frame) -> None:
    data = f.encode_frame(frame)
    for cut in range(len(data)):
        decoder = f.FrameDecoder()
        assert decoder.feed(data[:cut]) == []
        assert decoder.feed(data[cut:]) == [frame]


@pytest.mark.parametrize("frame", SAMPLES, ids=_ids)
def test_trailing_bytes_are_rejected(frame: f.Frame) -> None:
    body = f.encode_frame(frame)[5:] + b"\x00"
    with pytest.raises(DecodeError, match="trailing"):
        f.decode_frame(frame.TYPE, body)


def test_unknown_type_and_zero_length_are_rejected() -> None:
    with pytest.raises(DecodeError, match="unknown type"):
        f.FrameDecoder().feed(b"\x00\x00\x00\x01\xee")
    with pytest.raises(DecodeError, match="zero length"):
        f.FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_oversized_declared_length_fails_immediately_without_buffering() -> None:
    decoder = f.FrameDecoder(max_frame_size=100)
    with pytest.raises(f.FrameTooLargeError):
        decoder.feed((101).to_bytes(4, "big"))
    assert decoder.buffered == 0
    with pytest.raises(DecodeError):  # the stream stays failed
        decoder.feed(f.encode_frame(f.Ping(1)))
    ok = f.FrameDecoder(max_frame_size=100)
    assert ok.feed(f.encode_frame(f.Send(1, b"x" * 91))) == [f.Send(1, b"x" * 91)]


@pytest.mark.parametrize(
    ("frame_type", "body"),
    [
        (f.LoggedIn.TYPE, b"\x00\x00\x00\x01\x02"),  # bool must be 0 or 1
        (f.SendAck.TYPE, b"\x00\x00\x00\x01" + MID + b"\x07"),
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x01x\x05abcde\x00\x00"),  # 5-byte message id
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x01x\x00\x00\x01\xff"),  # text not UTF-8
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x02x\n\x00\x00\x00"),  # code with a newline
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x01X\x00\x00\x00"),  # code not [a-z_]
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"),  # empty code
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x41" + b"x" * 65 + b"\x00\x00\x00"),  # 65 chars
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x01x\x00\x00\x02a\n"),  # text with a newline
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x01x\x00\x00\x03\xe2\x80\xa8"),  # U+2028
        (f.Error.TYPE, b"\x00\x00\x00\x00\x00\x01x\x00\x04\x01" + b"a" * 1025),  # too long
        # A version 2 LOGIN with a 65-byte channel binding.
        (f.Login.TYPE, bytes(5) + b"\x02\x01x" + bytes(100) + b"\x00\x41" + bytes(65)),
        (f.FetchBundle.TYPE, b"\x00\x00\x00\x01\x03../"),  # invalid agent id
        (f.FetchBundle.TYPE, b"\x00\x00\x00\x01\x00"),  # empty agent id
        (f.Agents.TYPE, b"\x00\x00\x00\x01\xff\xff\xff\xff"),  # count beyond the frame
        (f.Stats.TYPE, b"\x00\x00\x00\x01\x00\x02" + (b"\x01k" + bytes(8)) * 2),  # dup key
    ],
)
def test_field_level_strictness(frame_type: int, body: bytes) -> None:
    with pytest.raises(DecodeError):
        f.decode_frame(frame_type, body)


def test_encoder_refuses_out_of_range_fields() -> None:
    with pytest.raises(ValueError):
        f.encode_frame(f.SendAck(1, b"short", False))
    with pytest.raises(ValueError):
        f.encode_frame(f.Login(1, 1, "bad id", b"\x01" * 32, b"\x02" * 64))
    with pytest.raises(ValueError):
        f.encode_frame(f.Hello(1, b"\x00" * 31, "hub", 1, 1))
    for code in ("", "Bad", "x\nFORGED", "x" * 65, "code-1"):
        with pytest.raises(ValueError, match="error code"):
            f.encode_frame(f.Error(1, code))
    with pytest.raises(ValueError):  # version 1 had no place for them
        f.encode_frame(f.Login(1, 1, "alice", b"\x01" * 32, b"\x02" * 64, b"", "hub:1"))
    with pytest.raises(ValueError):
        f.encode_frame(f.Login(1, 2, "alice", b"\x01" * 32, b"\x02" * 64, b"", "h:1", bytes(65)))


def test_error_text_is_cut_on_a_character_boundary() -> None:
    frame = f.Error(1, "x", "é" * 40000)
    decoded = f.FrameDecoder().feed(f.encode_frame(frame))[0]
    assert isinstance(decoded, f.Error)
    assert decoded.text == "é" * (f.MAX_ERROR_TEXT // 2)


def test_error_text_controls_are_escaped_by_the_encoder() -> None:
    frame = f.Error(1, "x", "line one\nFORGED line\r\x1b[31m\u2028end")
    decoded = f.FrameDecoder().feed(f.encode_frame(frame))[0]
    assert isinstance(decoded, f.Error)
    assert decoded.text == "line one\\nFORGED line\\r\\x1b[31m\\u2028end"
    assert decoded.text.isprintable()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_raise_only_decode_error(chunks: list[bytes]) -> None:
    decoder = f.FrameDecoder(max_frame_size=4096)
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert isinstance(frame, f.Frame)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=200))
def test_arbitrary_bodies_raise_only_decode_error(frame_type: int, body: bytes) -> None:
    try:
        frame = f.decode_frame(frame_type, body)
    except DecodeError:
        return
    # Whatever parses re-encodes to exactly the same bytes (the codec is canonical).
    assert f.encode_frame(frame)[5:] == body


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.binary(max_size=2000),
    st.lists(st.binary(min_size=16, max_size=16), max_size=50),
    st.integers(1, 7),
)
def test_generated_frames_round_trip_in_any_chunking(
    request_id: int, envelope: bytes, ids: list[bytes], step: int
) -> None:
    frames: list[f.Frame] = [
        f.Send(request_id, envelope),
        f.Ack(tuple(ids)),
        f.Push(request_id, MID, envelope),
    ]
    stream = b"".join(f.encode_frame(x) for x in frames)
    decoder = f.FrameDecoder()
    out: list[f.Frame] = []
    for i in range(0, len(stream), step):
        out.extend(decoder.feed(stream[i : i + step]))
    assert out == frames
