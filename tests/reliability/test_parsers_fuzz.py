"""Property tests for the parsers the other suites do not fuzz yet.

Already covered elsewhere (and not repeated here): arbitrary bytes into
``FrameDecoder``/``decode_frame`` (tests/protocol/test_frames.py), envelopes
and payloads (test_envelope.py), bundles, signed prekeys and prekey secrets
from arbitrary bytes (tests/crypto/test_prekeys.py), identities and key-pair
dicts (test_identity.py), sessions, records and mutated records
(test_session.py), envelopes into a live agent (tests/agent/test_agent_fuzz.py).

Added here, each "arbitrary or mutated input -> a result or an AgentMeshError,
never anything else":

* every frame type, valid and then with one byte changed, cut short or
  extended, through ``FrameDecoder`` (byte-at-a-time too);
* the hub and client connection state machines (``receive_data`` never
  raises; protocol violations become a ConnectionFailed event), before and
  after login;
* the hub's ``compose_bundle`` on mutated bundles and prekeys;
* mutated ``PrekeySecrets`` state;
* key files: arbitrary bytes, mutated plain and encrypted files;
* ``AgentState`` (and a whole ``Agent``) opened on a state file that is
  arbitrary bytes or a valid file with bytes changed or cut off.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentmesh import Agent, LocalHub, keyfile
from agentmesh.crypto.identity import IdentityKeyPair, PublicIdentity
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.crypto.prekeys import PrekeySecrets, compose_bundle
from agentmesh.crypto.session import SessionRecord
from agentmesh.errors import AgentMeshError
from agentmesh.keyfile import decode_key_file, encode_key_file
from agentmesh.protocol import hub_protocol as hp
from agentmesh.state import AgentState
from agentmesh.wire import frames as f
from agentmesh.wire.envelope import decode_envelope
from agentmesh.wire.payload import decode_payload

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
HUB = "hub.fuzz:7700"
_IDENTITY = IdentityKeyPair.generate()
_SECRETS = PrekeySecrets.create(_IDENTITY, 1_700_000_000_000)
_SECRETS.top_up(_IDENTITY, 1_700_000_000_000, pool_size=3)
_BUNDLE = _SECRETS.bundle("alice", _IDENTITY.public).encode()
_OPK = next(iter(_SECRETS.one_time.values())).public.encode()
_PQOPK = next(iter(_SECRETS.one_time_kem.values())).public.encode()


def mutate(data: bytes, draw: st.DataObject) -> bytes:
    """One byte changed, a cut, a random insertion, or a few bytes overwritten."""
    raw = bytearray(data)
    how = draw.draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
    i = draw.draw(st.integers(0, max(0, len(raw) - 1)))
    if how == "flip" and raw:
        raw[i] = draw.draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
    elif how == "cut":
        del raw[i:]
    elif how == "insert":
        raw[i:i] = draw.draw(st.binary(min_size=1, max_size=8))
    else:
        chunk = draw.draw(st.binary(min_size=1, max_size=16))
        raw[i : i + len(chunk)] = chunk
    return bytes(raw)


# --- frames ----------------------------------------------------------------


def sample_frames() -> list[f.Frame]:
    """One valid frame of every type, with realistic field contents."""
    mid = bytes(range(16))
    return [
        f.Hello(hp.PROTOCOL_VERSION, bytes(32), HUB, 1 << 20, 1 << 20),
        f.Login(7, 1, "alice", _IDENTITY.public.signing, bytes(64), _BUNDLE),
        f.LoggedIn(7, True),
        f.RotateKey(8, bytes(32), bytes(64), bytes(64)),
        f.Ok(9),
        f.Error(10, "mailbox_full", "mailbox of 'bob' is full", mid, False),
        f.Ping(11),
        f.Pong(11),
        f.PublishBundle(12, _BUNDLE),
        f.UploadPrekeys(13, tuple(k.public.encode() for k in list(_SECRETS.one_time.values())[:2])),
        f.FetchBundle(14, "bob"),
        f.Bundle(14, _BUNDLE),
        f.PrekeysLow(3),
        f.Send(15, b"\x01\x02" + bytes(100)),
        f.SendAck(15, mid, False),
        f.Push(16, mid, bytes(120)),
        f.Ack((mid, bytes(16))),
        f.ListAgents(17),
        f.Agents(17, ("alice", "bob", "carol.v2")),
        f.GetStats(18),
        f.Stats.from_mapping(18, {"queued": 3, "agents": 2}),
    ]


_FRAMES = sample_frames()
_ENCODED = [f.encode_frame(frame) for frame in _FRAMES]


def test_sample_frames_cover_every_type() -> None:
    assert {type(frame) for frame in _FRAMES} == set(f.FRAME_TYPES.values())


def _feed(decoder: f.FrameDecoder, data: bytes, step: int) -> None:
    try:
        for i in range(0, len(data), step):
            for frame in decoder.feed(data[i : i + step]):
                assert isinstance(frame, f.Frame)
    except AgentMeshError:
        pass


@FUZZ
@given(st.sampled_from(range(len(_ENCODED))), st.data(), st.integers(1, 64))
def test_mutated_frames_decode_or_raise_decode_error(
    index: int, data: st.DataObject, step: int
) -> None:
    frame = mutate(_ENCODED[index], data)
    _feed(f.FrameDecoder(max_frame_size=1 << 20), frame, step)
    # and inside a stream of valid frames
    _feed(f.FrameDecoder(max_frame_size=1 << 20), _ENCODED[4] + frame + _ENCODED[6], step)


@FUZZ
@given(st.sampled_from(range(len(_FRAMES))), st.data())
def test_frame_bodies_with_one_field_replaced(index: int, data: st.DataObject) -> None:
    """Re-encode a valid frame with one body byte range replaced by a boundary value."""
    encoded = _ENCODED[index]
    body = bytearray(encoded[5:])
    if not body:
        return
    i = data.draw(st.integers(0, len(body) - 1))
    width = data.draw(st.sampled_from([1, 2, 4, 8]))
    value = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
    body[i : i + width] = bytes([value]) * width
    try:
        frame = f.decode_frame(encoded[4], bytes(body))
    except AgentMeshError:
        return
    assert f.encode_frame(frame)[5:] == bytes(body)  # canonical


# --- the connection state machines ----------------------------------------


def _server(authenticated: bool) -> hp.ServerConnection:
    server = hp.ServerConnection(nonce=bytes(32), hub_address=HUB, max_envelope_bytes=4096)
    if authenticated:
        client = hp.ClientConnection()
        client.receive_data(server.data_to_send())
        signature = _IDENTITY.sign(client.login_challenge("alice"))
        client.login("alice", _IDENTITY.public.signing, signature, b"")
        events = server.receive_data(client.data_to_send())
        assert isinstance(events[0], hp.LoginRequested), events
        server.accept_login(created=True)
    server.data_to_send()
    return server


_CLIENT_SENDS = [e for e, x in zip(_ENCODED, _FRAMES, strict=True) if not isinstance(x, f.Hello)]


@FUZZ
@given(st.booleans(), st.lists(st.sampled_from(range(len(_CLIENT_SENDS))), max_size=4), st.data())
def test_hub_connection_never_raises(
    authenticated: bool, picks: list[int], data: st.DataObject
) -> None:
    server = _server(authenticated)
    stream = b"".join(_CLIENT_SENDS[i] for i in picks)
    if data.draw(st.booleans()):
        stream = mutate(stream or b"\x00", data)
    else:
        stream += data.draw(st.binary(max_size=64))
    step = data.draw(st.integers(1, 97))
    for i in range(0, len(stream), step):
        for event in server.receive_data(stream[i : i + step]):
            assert isinstance(event, hp.Event)
    server.data_to_send()
    if server.closed:
        assert server.receive_data(b"more") == []


@FUZZ
@given(st.lists(st.sampled_from(range(len(_ENCODED))), max_size=4), st.data())
def test_client_connection_never_raises(picks: list[int], data: st.DataObject) -> None:
    client = hp.ClientConnection()
    hello = f.encode_frame(f.Hello(hp.PROTOCOL_VERSION, bytes(32), HUB, 1 << 20, 4096))
    stream = hello + b"".join(_ENCODED[i] for i in picks)
    stream = mutate(stream, data) if data.draw(st.booleans()) else stream
    for event in client.receive_data(stream):
        assert isinstance(event, hp.Event)
    client.data_to_send()


# --- bundles and prekey state ----------------------------------------------


@FUZZ
@given(st.data())
def test_compose_bundle_on_mutated_inputs(data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["bundle", "opk", "pqopk"]))
    bundle, opk, pqopk = _BUNDLE, _OPK, _PQOPK
    if which == "bundle":
        bundle = mutate(bundle, data)
    elif which == "opk" and opk is not None:
        opk = mutate(opk, data)
    elif pqopk is not None:
        pqopk = mutate(pqopk, data)
    try:
        composed = compose_bundle(bundle, opk, pqopk)
    except AgentMeshError:
        return
    try:
        hp.check_bundle(composed, "alice", _IDENTITY.public.signing)
    except (AgentMeshError, ValueError):
        pass


_SECRET_BYTES = _SECRETS.to_bytes()


@FUZZ
@given(st.data())
def test_mutated_prekey_secrets(data: st.DataObject) -> None:
    try:
        secrets = PrekeySecrets.from_bytes(mutate(_SECRET_BYTES, data))
    except AgentMeshError:
        return
    secrets.to_bytes()


# --- key files ------------------------------------------------------------

_KEYPAIR = AgentKeyPair.generate()
_PLAIN_KEY = encode_key_file(_KEYPAIR)

with pytest.MonkeyPatch.context() as _cheap:
    # every fuzz example derives the key once: the pre-F-7 cost keeps this test fast,
    # and the parser under test is the same for every cost
    _cheap.setattr(keyfile, "_SCRYPT_N", 2**15)
    _ENCRYPTED_KEY = encode_key_file(_KEYPAIR, "passphrase")


@FUZZ
@given(st.binary(max_size=400))
def test_key_file_arbitrary_bytes(data: bytes) -> None:
    for passphrase in (None, "passphrase"):
        try:
            decode_key_file(data, passphrase)
        except AgentMeshError:
            pass


@FUZZ
@given(st.data())
def test_mutated_plain_key_file(data: st.DataObject) -> None:
    try:
        decode_key_file(mutate(_PLAIN_KEY, data))
    except AgentMeshError:
        pass


@settings(FUZZ, max_examples=40)
@given(st.data())
def test_mutated_encrypted_key_file(data: st.DataObject) -> None:
    doc = json.loads(_ENCRYPTED_KEY)
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(
        st.one_of(
            st.none(),
            st.integers(-(2**63), 2**63),
            st.sampled_from([0, 1, 2, 2**14, 2**20, 2**21]),
            st.text(max_size=40),
            st.just(doc[key][:-4] if isinstance(doc[key], str) else doc[key]),
        )
    )
    try:
        decode_key_file(json.dumps(doc).encode(), "passphrase")
    except AgentMeshError:
        pass


# --- the agent's state file ------------------------------------------------


def _exercise(path: Path) -> None:
    """Open the state file and read (and parse) everything in it."""
    try:
        state = AgentState(path)
    except AgentMeshError:
        return
    try:
        for key in ("prekeys", "identity", "schema_version"):
            raw = state.get_meta(key)
            if raw is not None and key == "prekeys":
                PrekeySecrets.from_bytes(raw)
            elif raw is not None and key == "identity":
                PublicIdentity.decode(raw)
        for peer in state.session_peers() + state.known_peers():
            record = state.session_record(peer)
            if record is not None:
                SessionRecord.from_bytes(record)
            pinned = state.pinned_identity(peer)
            if pinned is not None:
                PublicIdentity.decode(pinned[0])
        for _, envelope in state.outbox():
            decode_envelope(envelope)
        for row in state.unhandled():
            decode_payload(row.payload)
        state.outbox_size()
        state.inbox_pending()
        state.seen(bytes(16))
    except AgentMeshError:
        pass
    finally:
        state.close()


@functools.cache
def valid_state() -> tuple[bytes, bytes]:
    """(key file, state file) of a real agent: sessions, pins, prekeys, outbox and inbox rows."""
    with tempfile.TemporaryDirectory(prefix="agentmesh-state-fuzz-") as tmp:
        folder = Path(tmp)
        hub = LocalHub()
        alice = Agent("alice", hub=hub, keypair_path=folder / "alice.json", prekey_pool_size=5)
        bob = Agent("bob", hub=hub, keypair_path=folder / "bob.json", prekey_pool_size=5)
        for i in range(3):
            alice.send("bob", f"hello {i}")
            bob.send("alice", f"reply {i}")  # alice has no handler: these stay in her inbox
        alice._state.commit_sent(  # and one envelope the hub never acknowledged
            "bob", alice._state.session_record("bob") or b"", os.urandom(16), bytes(200), 1
        )
        alice.close()
        bob.close()
        hub.close()
        return (folder / "alice.json").read_bytes(), (folder / "alice.state.sqlite").read_bytes()


@FUZZ
@given(st.binary(max_size=2048))
def test_state_file_of_arbitrary_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.state.sqlite"
        path.write_bytes(data)
        _exercise(path)


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_mutated_state_file(data: st.DataObject) -> None:
    _, original = valid_state()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.state.sqlite"
        path.write_bytes(mutate(original, data))
        _exercise(path)


@settings(FUZZ, max_examples=25)
@given(st.data())
def test_agent_on_a_mutated_state_file(data: st.DataObject) -> None:
    key_file, original = valid_state()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "alice.json").write_bytes(key_file)
        (Path(tmp) / "alice.state.sqlite").write_bytes(mutate(original, data))
        try:
            agent = Agent("alice", keypair_path=Path(tmp) / "alice.json", prekey_pool_size=5)
        except AgentMeshError:
            return
        try:
            agent.status()
            agent.on_message(lambda _msg: None)  # dispatches the inbox rows
        except AgentMeshError:
            pass
        finally:
            agent.close()
