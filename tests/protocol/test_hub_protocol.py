"""The I/O-free hub connection state machines, paired over an in-memory link (h11 style)."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pytest

from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeySecrets
from agentmesh.errors import LocalProtocolError
from agentmesh.protocol import hub_protocol as hp
from agentmesh.wire import frames as f
from agentmesh.wire.codec import Writer
from agentmesh.wire.envelope import RatchetHeader, encode_header

HUB = "hub.test:7700"


def envelope(
    sender: str, recipient: str, *, size: int = 32, message_id: bytes | None = None
) -> bytes:
    mid = message_id or os.urandom(16)
    header = encode_header(mid, 0, sender, recipient, RatchetHeader(os.urandom(32), 0, 0), None)
    return header + size.to_bytes(4, "big") + os.urandom(size)


class Link:
    """A hub connection and a client connection wired back to back."""

    def __init__(
        self,
        *,
        max_envelope_bytes: int = 4096,
        hub_address: str = HUB,
        hub_binding: bytes = b"",
        **client_options: object,
    ) -> None:
        self.server = hp.ServerConnection(
            nonce=os.urandom(32),
            hub_address=hub_address,
            channel_binding=hub_binding,
            max_envelope_bytes=max_envelope_bytes,
        )
        self.client = hp.ClientConnection(**client_options)  # type: ignore[arg-type]
        self.server_events: list[hp.Event] = []
        self.client_events: list[hp.Event] = []

    def pump(self) -> tuple[list[hp.Event], list[hp.Event]]:
        """Move bytes both ways until quiet; return (server events, client events) seen."""
        s_start, c_start = len(self.server_events), len(self.client_events)
        while True:
            to_client = self.server.data_to_send()
            if to_client:
                self.client_events += self.client.receive_data(to_client)
            to_server = self.client.data_to_send()
            if to_server:
                self.server_events += self.server.receive_data(to_server)
            if not to_client and not to_server:
                return self.server_events[s_start:], self.client_events[c_start:]

    def send_login(
        self, agent_id: str, identity: IdentityKeyPair, bundle: bytes = b""
    ) -> list[hp.Event]:
        """Wait for HELLO, send a correctly signed LOGIN; return the hub's events."""
        self.pump()
        signature = identity.sign(self.client.login_challenge(agent_id))
        self.client.login(agent_id, identity.public.signing, signature, bundle)
        server_events, _ = self.pump()
        return server_events

    def login(self, agent_id: str, identity: IdentityKeyPair, bundle: bytes = b"") -> None:
        server_events = self.send_login(agent_id, identity, bundle)
        assert isinstance(server_events[-1], hp.LoginRequested)
        self.server.accept_login(created=True)
        _, client_events = self.pump()
        assert isinstance(client_events[-1], hp.LoginAccepted)


def state(conn: hp.ServerConnection | hp.ClientConnection) -> hp.State:
    """The current state (a call, so type checkers don't narrow across actions)."""
    return conn.state


def bundle_of(agent_id: str, identity: IdentityKeyPair) -> tuple[bytes, list[bytes]]:
    now = int(time.time() * 1000)
    secrets = PrekeySecrets.create(identity, now)
    secrets.top_up(identity, now, pool_size=3)
    prekeys = [p.encode() for p in secrets.unpublished_prekeys()]
    return secrets.bundle(agent_id, identity.public).encode(), prekeys


@pytest.fixture
def alice() -> IdentityKeyPair:
    return IdentityKeyPair.generate()


@pytest.fixture
def link(alice: IdentityKeyPair) -> Link:
    link = Link()
    link.login("alice", alice)
    return link


# --- login -----------------------------------------------------------------


def test_hello_then_login(alice: IdentityKeyPair) -> None:
    link = Link()
    assert state(link.server) is hp.State.AWAIT_LOGIN
    _, client_events = link.pump()
    assert client_events == [
        hp.HelloReceived(hp.PROTOCOL_VERSION, HUB, 4096 + hp.FRAME_OVERHEAD, 4096, (HUB,))
    ]
    bundle, _ = bundle_of("alice", alice)
    challenge = link.client.login_challenge("alice")
    assert challenge == hp.login_message(link.server.nonce, "alice", HUB, b"")
    link.client.login("alice", alice.public.signing, alice.sign(challenge), bundle)
    assert state(link.client) is hp.State.AUTHENTICATING
    server_events, _ = link.pump()
    assert server_events == [
        hp.LoginRequested(1, hp.PROTOCOL_VERSION, "alice", alice.public.signing, bundle)
    ]
    assert state(link.server) is hp.State.AUTHENTICATING
    link.server.accept_login(created=True)
    _, client_events = link.pump()
    assert client_events == [hp.LoginAccepted(1, True)]
    assert state(link.server) is state(link.client) is hp.State.AUTHENTICATED
    assert link.server.agent_id == link.client.agent_id == "alice"
    assert link.server.signing_key == alice.public.signing


@pytest.mark.parametrize(
    "mistake", ["wrong_key", "other_nonce", "other_hub", "other_id", "other_channel"]
)
def test_login_signature_must_cover_this_connection(alice: IdentityKeyPair, mistake: str) -> None:
    link = Link()
    link.pump()
    nonce, hub, agent_id, binding = link.server.nonce, HUB, "alice", b""
    signer = alice
    if mistake == "wrong_key":
        signer = IdentityKeyPair.generate()
    elif mistake == "other_nonce":
        nonce = os.urandom(32)
    elif mistake == "other_hub":
        hub = "evil.example:7700"
    elif mistake == "other_channel":
        binding = os.urandom(32)
    else:
        agent_id = "mallory"
    signature = signer.sign(hp.login_message(nonce, agent_id, hub, binding))
    link.client.login("alice", alice.public.signing, signature)
    server_events, client_events = link.pump()
    assert server_events == [hp.ConnectionFailed("bad_signature", server_events[0].detail, False)]  # type: ignore[attr-defined]
    assert isinstance(client_events[0], hp.ErrorReceived) and client_events[0].fatal
    assert isinstance(client_events[-1], hp.ConnectionFailed) and client_events[-1].sent_by_peer
    assert link.server.closed and link.client.closed


def test_refused_login_closes_both_sides(alice: IdentityKeyPair) -> None:
    link = Link()
    link.send_login("alice", alice)
    link.server.refuse_login("identity_mismatch", "agent id 'alice' is bound to another key")
    _, client_events = link.pump()
    assert client_events[0] == hp.ErrorReceived(
        1, "identity_mismatch", "agent id 'alice' is bound to another key", b"", True
    )
    assert link.client.closed and link.server.closed
    with pytest.raises(LocalProtocolError):
        link.client.list_agents()


def test_login_bundle_must_belong_to_the_login_key(alice: IdentityKeyPair) -> None:
    bundle, _ = bundle_of("alice", IdentityKeyPair.generate())
    server_events = Link().send_login("alice", alice, bundle)
    assert isinstance(server_events[0], hp.ConnectionFailed)
    assert server_events[0].code == "bad_bundle"


def test_small_order_identity_keys_are_refused() -> None:
    # An all-zero key with an all-zero signature "verifies" for some messages.
    for weak in (bytes(32), bytes(31) + b"\x80", b"\x01" + bytes(31), b"\xec" + b"\xff" * 31):
        assert hp.is_weak_signing_key(weak)
        link = Link()
        link.pump()
        login = f.Login(1, hp.PROTOCOL_VERSION, "x", weak, bytes(64), b"", HUB)
        events = link.server.receive_data(f.encode_frame(login))
        assert events == [hp.ConnectionFailed("weak_key", "small-order identity key", False)]
    assert not hp.is_weak_signing_key(IdentityKeyPair.generate().public.signing)


def test_unknown_version_is_refused_by_the_hub(alice: IdentityKeyPair) -> None:
    link = Link()
    link.pump()
    login = f.Login(1, 9, "alice", alice.public.signing, alice.sign(b"x"))
    events = link.server.receive_data(f.encode_frame(login))
    assert [type(e) for e in events] == [hp.ConnectionFailed]
    assert events[0].code == "unsupported_version"  # type: ignore[attr-defined]
    reply = f.FrameDecoder().feed(link.server.data_to_send())
    # The refusal names the LOGIN's request, so a client can tell it from a lost connection.
    assert reply == [f.Error(1, "unsupported_version", "protocol version 9", fatal=True)]


def test_version_1_logins_are_refused_by_the_hub(alice: IdentityKeyPair) -> None:
    # Version 1 signed what the hub announced, so it could be relayed: not spoken.
    link = Link()
    link.pump()
    login = f.Login(1, 1, "alice", alice.public.signing, alice.sign(b"x"))
    assert f.encode_frame(login)[-1:] == b"\x00"  # the version 1 layout: ends with the bundle
    events = link.server.receive_data(f.encode_frame(login))
    assert [e.code for e in events if isinstance(e, hp.ConnectionFailed)] == ["unsupported_version"]


def test_client_refuses_a_hub_speaking_only_newer_versions() -> None:
    link = Link(versions=frozenset({hp.PROTOCOL_VERSION + 1}))
    server_events, client_events = link.pump()
    why = f"hub speaks version {hp.PROTOCOL_VERSION}"
    assert client_events == [hp.ConnectionFailed("unsupported_version", why, False)]
    assert server_events == [hp.ConnectionFailed("unsupported_version", why, True)]


def test_client_refuses_an_unexpected_hub_address() -> None:
    link = Link(expected_hub_address="real.example:7700")
    _, client_events = link.pump()
    assert isinstance(client_events[0], hp.ConnectionFailed)
    assert client_events[0].code == "wrong_hub"


@pytest.mark.parametrize(
    ("options", "signed"),
    [
        ({"dialled_address": HUB}, HUB),
        ({"dialled_address": "HUB.Test.:7700"}, HUB),  # the same name, spelt otherwise
        ({"dialled_address": "[::1]:7700"}, "[::1]:7700"),
        ({"dialled_address": "other:1", "expected_hub_address": "[::1]:7700"}, "[::1]:7700"),
        ({}, HUB),  # sans-IO without a dialled name: the hub's first name
    ],
)
def test_client_signs_the_name_it_dialled(
    alice: IdentityKeyPair, options: dict[str, Any], signed: str
) -> None:
    link = Link(hub_address=f"{HUB},[0:0::1]:7700", **options)
    link.login("alice", alice)
    assert link.client.login_address == signed
    # ... the name, an empty channel binding (plain TCP) and no flags.
    tail = Writer().str8(signed).u8(0).u8(0).getvalue()
    assert link.client.login_challenge("alice").endswith(tail)


def test_client_refuses_a_hub_that_does_not_answer_to_the_dialled_name() -> None:
    link = Link(hub_address="127.0.0.1:7701", dialled_address="127.0.0.1:7700")
    server_events, client_events = link.pump()
    assert [type(e) for e in client_events] == [hp.ConnectionFailed]
    failed = client_events[0]
    assert isinstance(failed, hp.ConnectionFailed) and failed.code == "wrong_hub"
    assert "127.0.0.1:7700" in failed.detail and "127.0.0.1:7701" in failed.detail
    assert [e.code for e in server_events if isinstance(e, hp.ConnectionFailed)] == ["wrong_hub"]
    assert link.client.closed and link.server.closed


@pytest.mark.parametrize("announced", ["", "a b:1", "hub:0", "hub:1,", "hub:1\nFORGED:2"])
def test_client_refuses_a_hello_without_valid_names(announced: str) -> None:
    client = hp.ClientConnection(dialled_address="hub:1")
    hello = f.Hello(hp.PROTOCOL_VERSION, os.urandom(32), announced, 1 << 20, 1 << 16)
    events = client.receive_data(f.encode_frame(hello))
    assert [e.code for e in events if isinstance(e, hp.ConnectionFailed)] == ["wrong_hub"]


def _signed_login(
    nonce: bytes, identity: IdentityKeyPair, hub_address: str, binding: bytes
) -> bytes:
    signature = identity.sign(hp.login_message(nonce, "alice", hub_address, binding))
    login = f.Login(
        1,
        hp.PROTOCOL_VERSION,
        "alice",
        identity.public.signing,
        signature,
        b"",
        hub_address,
        binding,
    )
    return f.encode_frame(login)


@pytest.mark.parametrize("address", ["evil.example:7700", "hub.test:7701", "", "not a name"])
def test_hub_refuses_a_login_signed_for_another_name(alice: IdentityKeyPair, address: str) -> None:
    link = Link()
    link.pump()
    events = link.server.receive_data(_signed_login(link.server.nonce, alice, address, b""))
    assert [type(e) for e in events] == [hp.ConnectionFailed]
    assert events[0].code == "wrong_hub"  # type: ignore[attr-defined]
    assert link.server.closed


@pytest.mark.parametrize(
    ("hub_binding", "login_binding", "accepted"),
    [
        (b"", b"", True),
        (b"\x01" * 32, b"\x01" * 32, True),
        (b"\x01" * 32, b"\x02" * 32, False),  # a relay with its own certificate
        (b"\x01" * 32, b"", False),  # TLS hub, a login made over plain TCP
        (b"", b"\x01" * 32, False),  # plain hub, a login made over TLS to a relay
    ],
)
def test_hub_checks_the_channel_binding(
    alice: IdentityKeyPair, hub_binding: bytes, login_binding: bytes, accepted: bool
) -> None:
    link = Link(hub_binding=hub_binding)
    link.client.set_channel_binding(login_binding)
    events = link.send_login("alice", alice)
    if accepted:
        assert [type(e) for e in events] == [hp.LoginRequested]
    else:
        assert [e.code for e in events] == ["channel_binding_mismatch"]  # type: ignore[attr-defined]
        assert link.server.closed


def test_channel_binding_is_set_before_hello() -> None:
    link = Link()
    link.pump()
    with pytest.raises(LocalProtocolError):
        link.client.set_channel_binding(b"\x01" * 32)


def test_tls_server_end_point_is_the_sha256_of_the_certificate() -> None:
    assert hp.tls_server_end_point(b"cert") == hashlib.sha256(b"cert").digest()


def test_rotation_is_bound_like_the_login(alice: IdentityKeyPair) -> None:
    link = Link(hub_binding=b"\x05" * 32, dialled_address=HUB)
    link.client.set_channel_binding(b"\x05" * 32)
    link.login("alice", alice)
    new = IdentityKeyPair.generate().public.signing
    expected = hp.rotation_message(
        link.server.nonce, "alice", HUB, alice.public.signing, new, b"\x05" * 32
    )
    assert link.client.rotation_challenge(alice.public.signing, new) == expected


def test_hub_names_are_parsed_into_one_spelling() -> None:
    assert hp.parse_hub_names(" A.example.:1, [::1]:2,::1,127.0.0.1,a.example:1", 9) == (
        "a.example:1",
        "[::1]:2",
        "[::1]:9",
        "127.0.0.1:9",
    )
    assert hp.parse_hub_names(["x:1,y:2", "z:3"]) == ("x:1", "y:2", "z:3")
    assert hp.loopback_names(7700) == ("127.0.0.1:7700", "localhost:7700", "[::1]:7700")
    assert hp.format_hub_address("0:0::1", 5) == "[::1]:5"
    for bad in ["", "hub", "hub:0", "hub:65536", "hub:+1", "hub:\uff11", "a b:1", "a,b:1"]:
        with pytest.raises(ValueError):
            hp.parse_hub_names(bad)
    for bad in ["[hub]:1", "[::1]x", "fe80::1%eth0", "hub:1\nFORGED", "-hub:1", "h" * 254 + ":1"]:
        with pytest.raises(ValueError):
            hp.parse_hub_address(bad, 1)
    with pytest.raises(ValueError, match="255"):
        hp.parse_hub_names([f"hub-{i}.example:7700" for i in range(20)])


def test_requests_before_login(alice: IdentityKeyPair) -> None:
    link = Link()
    link.pump()
    with pytest.raises(LocalProtocolError):
        link.client.send(envelope("alice", "bob"))
    # Anonymous directory questions are allowed.
    rid = link.client.list_agents()
    server_events, _ = link.pump()
    assert server_events == [hp.AgentsRequested(rid)]
    link.server.reply_agents(rid, ["alice", "bob"])
    rid2 = link.client.get_stats()
    link.server.receive_data(link.client.data_to_send())
    link.server.reply_stats(rid2, {"queued": 4})
    _, client_events = link.pump()
    assert client_events == [
        hp.AgentsReceived(rid, ("alice", "bob")),
        hp.StatsReceived(rid2, {"queued": 4}),
    ]
    # A SEND on an unauthenticated connection is a protocol violation.
    events = link.server.receive_data(f.encode_frame(f.Send(9, envelope("alice", "bob"))))
    assert events == [
        hp.ConnectionFailed("unexpected_frame", "Send not allowed in state AWAIT_LOGIN", False)
    ]


def test_pipelining_before_the_login_answer_is_a_violation(alice: IdentityKeyPair) -> None:
    link = Link()
    link.send_login("alice", alice)
    events = link.server.receive_data(f.encode_frame(f.ListAgents(2)))
    assert isinstance(events[0], hp.ConnectionFailed)
    link.server.accept_login(created=False)  # late answers are dropped, not raised
    assert link.server.closed


def test_unsolicited_logged_in_is_a_violation() -> None:
    client = hp.ClientConnection()
    hello = f.Hello(hp.PROTOCOL_VERSION, os.urandom(32), HUB, 1 << 20, 1 << 16)
    client.receive_data(f.encode_frame(hello))
    events = client.receive_data(f.encode_frame(f.LoggedIn(1, True)))
    assert events == [
        hp.ConnectionFailed(
            "unexpected_frame", "LoggedIn not allowed in state HELLO_RECEIVED", False
        )
    ]


# --- envelopes -------------------------------------------------------------


def test_send_and_ack(link: Link) -> None:
    data = envelope("alice", "bob")
    rid = link.client.send(data)
    server_events, _ = link.pump()
    assert len(server_events) == 1
    event = server_events[0]
    assert isinstance(event, hp.SendRequested)
    assert (event.request_id, event.sender, event.recipient, event.envelope) == (
        rid,
        "alice",
        "bob",
        data,
    )
    link.server.reply_send_ack(rid, event.message_id, duplicate=False)
    _, client_events = link.pump()
    assert client_events == [hp.SendAcknowledged(rid, event.message_id, False)]


def test_pipelined_sends_keep_their_request_ids(link: Link) -> None:
    rids = [link.client.send(envelope("alice", "bob")) for _ in range(5)]
    server_events, _ = link.pump()
    assert [e.request_id for e in server_events] == rids  # type: ignore[attr-defined]
    for event in reversed(server_events):
        assert isinstance(event, hp.SendRequested)
        link.server.reply_send_ack(event.request_id, event.message_id, duplicate=False)
    _, client_events = link.pump()
    assert [e.request_id for e in client_events] == rids[::-1]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (envelope("mallory", "bob"), "forged_sender"),
        (envelope("alice", "bob", size=5000), "too_large"),
        (b"\x01\x02garbage", "bad_envelope"),
        (envelope("alice", "bob")[:-1], "bad_envelope"),
    ],
)
def test_invalid_envelopes_are_refused_but_the_connection_stays(
    link: Link, data: bytes, code: str
) -> None:
    server_events = link.server.receive_data(f.encode_frame(f.Send(42, data)))
    assert [type(e) for e in server_events] == [hp.RequestRejected]
    _, client_events = link.pump()
    assert len(client_events) == 1
    error = client_events[0]
    assert isinstance(error, hp.ErrorReceived)
    assert (error.request_id, error.code, error.fatal) == (42, code, False)
    if code in ("forged_sender", "too_large"):
        assert error.message_id == data[2:18]
    assert link.server.state is hp.State.AUTHENTICATED


def test_client_refuses_to_send_above_the_hub_limit(link: Link) -> None:
    with pytest.raises(LocalProtocolError):
        link.client.send(envelope("alice", "bob", size=5000))


def test_push_and_batched_ack(link: Link) -> None:
    pushed = [(n, os.urandom(16), envelope("bob", "alice")) for n in (3, 4)]
    for seq, mid, data in pushed:
        link.server.push(seq, mid, data)
    _, client_events = link.pump()
    assert client_events == [hp.EnvelopePushed(*p) for p in pushed]
    link.client.ack([mid for _, mid, _ in pushed])
    link.client.ack([])
    server_events, _ = link.pump()
    assert server_events == [hp.AckReceived("alice", tuple(mid for _, mid, _ in pushed))]


# --- prekeys ---------------------------------------------------------------


def test_publish_upload_fetch(link: Link, alice: IdentityKeyPair) -> None:
    bundle, prekeys = bundle_of("alice", alice)
    rid = link.client.publish_bundle(bundle)
    rid2 = link.client.upload_prekeys(prekeys)
    rid3 = link.client.fetch_bundle("bob")
    server_events, _ = link.pump()
    assert server_events[0] == hp.BundlePublished(rid, "alice", bundle)
    upload = server_events[1]
    assert isinstance(upload, hp.PrekeysUploaded)
    assert upload.encoded == tuple(prekeys) and len(upload.prekeys) == 6
    assert server_events[2] == hp.BundleRequested(rid3, "bob")
    link.server.reply_ok(rid)
    link.server.reply_ok(rid2)
    link.server.reply_error(rid3, "not_found", "no bundle for 'bob'")
    link.server.notify_prekeys_low(3)
    _, client_events = link.pump()
    assert client_events == [
        hp.RequestSucceeded(rid),
        hp.RequestSucceeded(rid2),
        hp.ErrorReceived(rid3, "not_found", "no bundle for 'bob'", b"", False),
        hp.PrekeysLowReceived(3),
    ]


def test_bundles_and_prekeys_of_another_identity_are_refused(link: Link) -> None:
    other = IdentityKeyPair.generate()
    bundle, prekeys = bundle_of("alice", other)
    own_bundle, _ = bundle_of("alice", IdentityKeyPair.generate())
    link.client.publish_bundle(bundle)
    link.client.upload_prekeys(prekeys[:1])
    link.client.publish_bundle(bundle_of("carol", other)[0])
    link.client.publish_bundle(own_bundle[:-1])
    _, client_events = link.pump()
    assert [(e.code, e.fatal) for e in client_events] == [  # type: ignore[attr-defined]
        ("bad_bundle", False),
        ("bad_prekey", False),
        ("bad_bundle", False),
        ("bad_bundle", False),
    ]


def test_key_rotation(link: Link, alice: IdentityKeyPair) -> None:
    new = IdentityKeyPair.generate()
    old_key, new_key = alice.public.signing, new.public.signing
    challenge = link.client.rotation_challenge(old_key, new_key)
    rid = link.client.rotate_key(new_key, alice.sign(challenge), new.sign(challenge))
    server_events, _ = link.pump()
    assert server_events == [hp.KeyRotationRequested(rid, "alice", old_key, new_key)]
    link.server.confirm_rotation(rid, new_key)
    _, client_events = link.pump()
    assert client_events == [hp.RequestSucceeded(rid)]
    assert link.server.signing_key == new_key
    # A rotation not signed by the (now) current key is refused.
    third = IdentityKeyPair.generate()
    challenge = link.client.rotation_challenge(old_key, third.public.signing)
    rid = link.client.rotate_key(third.public.signing, alice.sign(challenge), third.sign(challenge))
    _, client_events = link.pump()
    assert client_events == [
        hp.ErrorReceived(rid, "bad_signature", "rotation signature invalid", b"", False)
    ]


# --- keepalive and failures ------------------------------------------------


def test_ping_pong_both_ways(link: Link) -> None:
    rid = link.client.ping()
    rid2 = link.server.ping()
    server_events, client_events = link.pump()
    assert server_events == [hp.PongReceived(rid2)]
    assert client_events == [hp.PongReceived(rid)]


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"\x00\x00\x00\x02\xee\x00", "bad_frame"),
        (b"\xff\xff\xff\xff", "frame_too_large"),
        (b"\x00\x00\x00\x00", "bad_frame"),
    ],
)
def test_garbage_closes_with_a_fatal_error(link: Link, garbage: bytes, code: str) -> None:
    events = link.server.receive_data(garbage)
    assert [type(e) for e in events] == [hp.ConnectionFailed]
    assert events[0].code == code  # type: ignore[attr-defined]
    _, client_events = link.pump()
    assert isinstance(client_events[-1], hp.ConnectionFailed)
    assert link.server.closed and link.client.closed
    # Late answers on a closed hub connection are dropped; later data is ignored.
    link.server.reply_send_ack(1, bytes(16), duplicate=False)
    link.server.push(1, bytes(16), b"x")
    assert link.server.data_to_send() == b""
    assert link.server.receive_data(f.encode_frame(f.Ping(1))) == []


def test_valid_frames_before_garbage_in_one_chunk_are_not_processed(link: Link) -> None:
    chunk = f.encode_frame(f.Send(1, envelope("alice", "bob"))) + b"\x00\x00\x00\x01\xee"
    events = link.server.receive_data(chunk)
    assert [type(e) for e in events] == [hp.ConnectionFailed]


def test_fail_sends_a_fatal_error(link: Link) -> None:
    link.server.fail("idle_timeout", "no data for 60 s")
    _, client_events = link.pump()
    assert client_events == [
        hp.ErrorReceived(0, "idle_timeout", "no data for 60 s", b"", True),
        hp.ConnectionFailed("idle_timeout", "no data for 60 s", True),
    ]


def test_hub_commands_in_the_wrong_state_raise() -> None:
    server = hp.ServerConnection(nonce=os.urandom(32), hub_address=HUB)
    with pytest.raises(LocalProtocolError):
        server.push(1, bytes(16), b"x")
    with pytest.raises(LocalProtocolError):
        server.accept_login(created=True)


def test_transition_tables_only_name_known_frames() -> None:
    for table in (hp.HUB_RECEIVES, hp.HUB_SENDS, hp.CLIENT_RECEIVES, hp.CLIENT_SENDS):
        for state, frame_type in table:
            assert state is not hp.State.CLOSED
            assert frame_type in f.FRAME_TYPES.values()


def test_oversized_prekey_uploads_are_refused_before_any_signature_check(link: Link) -> None:
    """DoS: one UPLOAD_PREKEYS frame of thousands of prekeys must not make the hub
    verify thousands of signatures; it is refused by count, unverified."""
    junk = [b"\x01" + bytes(4) + (32).to_bytes(2, "big") + bytes(32) + bytes(64)] * (
        hp.MAX_PREKEYS_PER_UPLOAD + 1
    )
    link.client.upload_prekeys(junk)
    _, client_events = link.pump()
    assert [(e.code, e.fatal) for e in client_events] == [("too_many_prekeys", False)]  # type: ignore[attr-defined]
