"""The network hub end to end: a real ``agentmesh.hub_server`` subprocess on a temp SQLite file.

Clients are :class:`NetworkHub` objects driving fake endpoints (real Ed25519
identities and signed prekeys, envelopes with random ciphertext), raw sockets
speaking the frame protocol, and, for the plaintext check, real Agents.
Waits are bounded polls, never timing assertions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hubproc import HubProcess, RawClient, self_signed_pem, unique, wait_until
from sqlalchemy.exc import OperationalError

from agentmesh import Agent
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle, PrekeySecrets, SignedPrekey
from agentmesh.errors import (
    AuthFailedError,
    ConfigurationError,
    HubError,
    HubUnavailableError,
    MailboxFullError,
)
from agentmesh.hub.client import NetworkHub, _chunk_prekeys, backoff, is_retryable
from agentmesh.hub.server import (
    EarlierSendFailed,
    HubOptions,
    NetworkHubServer,
    StoreWorker,
    TokenBucket,
)
from agentmesh.hub.store import EnqueueResult, EnqueueStatus, HubStore, NewEnvelope
from agentmesh.protocol import hub_protocol as hp
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.wire import frames as f
from agentmesh.wire.envelope import RatchetHeader, decode_envelope, encode_header

pytestmark = pytest.mark.timeout(60)


KEY = IdentityKeyPair.generate().public.signing


@pytest.fixture
def start_hub(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    hubs: list[HubProcess] = []

    def start(*args: str, **kwargs: Any) -> HubProcess:
        hub = HubProcess(tmp_path, *args, **kwargs).start()
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.stop()


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path_factory.mktemp("shared")).start()
    yield hub
    hub.stop()


@pytest.fixture
def clients() -> Iterator[Callable[[HubProcess], NetworkHub]]:
    made: list[NetworkHub] = []

    def make(hub: HubProcess, **options: Any) -> NetworkHub:
        client = hub.client(**options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# --- a fake agent --------------------------------------------------------------


class FakeEndpoint:
    """A HubEndpoint with real keys; envelopes carry random ciphertext."""

    def __init__(self, agent_id: str, *, pool: int = 30, identity: IdentityKeyPair | None = None):
        self._agent_id = agent_id
        self.identity = identity or IdentityKeyPair.generate()
        now = int(time.time() * 1000)
        self.prekeys = PrekeySecrets.create(self.identity, now)
        self.prekeys.top_up(self.identity, now, pool_size=pool)
        self.pool = pool
        self.received: list[bytes] = []
        self.outbox: dict[bytes, bytes] = {}
        self.low: list[int] = []
        self.lock = threading.Lock()

    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def signing_public_key(self) -> bytes:
        return self.identity.public.signing

    def sign_login(self, challenge: bytes) -> bytes:
        assert challenge.startswith(hp.LOGIN_CONTEXT)
        return self.identity.sign(challenge)

    def prekey_bundle_bytes(self) -> bytes:
        return self.prekeys.bundle(self._agent_id, self.identity.public).encode()

    def one_time_prekeys(self) -> list[bytes]:
        with self.lock:
            return [key.encode() for key in self.prekeys.unpublished_prekeys()]

    def one_time_prekeys_uploaded(self, encoded: list[bytes]) -> None:
        with self.lock:
            self.prekeys.mark_published([SignedPrekey.decode(e).prekey_id for e in encoded])

    def prekeys_low(self, remaining: int) -> None:
        with self.lock:
            self.low.append(remaining)
            self.prekeys.one_time.clear()
            self.prekeys.one_time_kem.clear()
            self.prekeys.top_up(self.identity, int(time.time() * 1000), pool_size=self.pool)

    def receive_envelope(self, data: bytes) -> DeliveryReport:
        envelope = decode_envelope(data)
        assert envelope.recipient == self._agent_id
        with self.lock:
            duplicate = envelope.message_id in self.received
            self.received.append(envelope.message_id)
        return DeliveryReport(accepted=True, duplicate=duplicate)

    def unacked_envelopes(self) -> list[bytes]:
        with self.lock:
            return list(self.outbox.values())

    def envelope_acked(self, message_id: bytes) -> None:
        with self.lock:
            self.outbox.pop(message_id, None)

    def envelope(self, recipient: str, *, sender: str | None = None, size: int = 64) -> bytes:
        """A new envelope, put in the outbox (as an Agent does before delivering)."""
        message_id = os.urandom(16)
        ratchet = RatchetHeader(os.urandom(32), 0, 0)
        header = encode_header(
            message_id, int(time.time() * 1000), sender or self._agent_id, recipient, ratchet, None
        )
        data = header + size.to_bytes(4, "big") + os.urandom(size)
        with self.lock:
            self.outbox[message_id] = data
        return data

    def send(self, hub: NetworkHub, recipient: str, **kwargs: Any) -> bytes:
        data = self.envelope(recipient, **kwargs)
        hub.deliver(data)
        return decode_envelope(data).message_id

    def got(self, count: int) -> Callable[[], bool]:
        return lambda: len(self.received) >= count


# --- raw sockets (hubproc.RawClient drives the protocol) ----------------------


def frames_until_eof(sock: socket.socket) -> list[f.Frame]:
    decoder = f.FrameDecoder(max_frame_size=1 << 24)
    out: list[f.Frame] = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += decoder.feed(data)
    return out


# --- unit tests of the client's pure helpers ----------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert [round(d, 3) for d in _take(backoff(0.1, 1.0, rng=lambda: 0.5), 6)] == [
        0.05,
        0.1,
        0.2,
        0.4,
        0.5,
        0.5,
    ]
    assert all(0 <= d < 1.0 for d in _take(backoff(0.1, 1.0), 50))


def _take(it: Iterator[float], n: int) -> list[float]:
    return [next(it) for _ in range(n)]


def test_is_retryable() -> None:
    assert is_retryable(HubUnavailableError("down"))
    assert is_retryable(ConnectionRefusedError())
    assert is_retryable(HubError("shutting_down", ""))
    assert not is_retryable(AuthFailedError("identity_mismatch", ""))
    assert not is_retryable(HubError("bad_bundle", ""))


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.1) and not bucket.take(0.1)


def test_prekey_chunks_fit_the_frame_limit() -> None:
    prekeys = [b"x" * 1255] * 100
    chunks = _chunk_prekeys(prekeys, 16 * 1024)
    assert [prekey for chunk in chunks for prekey in chunk] == prekeys
    for chunk in chunks:
        frame = f.encode_frame(f.UploadPrekeys(1, tuple(chunk)))
        assert len(frame) - 4 <= 16 * 1024


# --- delivery --------------------------------------------------------------------


def test_online_delivery_in_order(shared_hub: HubProcess, clients: Any) -> None:
    hub = clients(shared_hub)
    alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
    hub.register(alice)
    hub.register(bob)
    sent = [alice.send(hub, bob.agent_id) for _ in range(50)]
    assert not alice.outbox
    wait_until(bob.got(50))
    assert bob.received == sent
    assert {alice.agent_id, bob.agent_id} <= set(hub.list_agents())
    bundle = PrekeyBundle.decode(hub.fetch_prekey_bundle(bob.agent_id)).verify()
    assert bundle.identity.signing == bob.signing_public_key
    assert bundle.one_time_prekey is not None
    as_dict = hub.get_bundle(alice.agent_id)
    assert as_dict["agent_id"] == alice.agent_id and "bundle" in as_dict
    with pytest.raises(ValueError, match=r"Peer 'nobody-x' not found on hub"):
        hub.fetch_prekey_bundle("nobody-x")
    with pytest.raises(ValueError, match=r"Peer 'nobody-x' not found on hub"):
        alice.send(hub, "nobody-x")
    # Anonymous questions work without a registered agent.
    anonymous = clients(shared_hub)
    assert bob.agent_id in anonymous.list_agents()
    assert anonymous.stats()["online"] >= 2
    assert isinstance(anonymous.queued_count(), int)


def fan_in(hub: NetworkHub, senders: int, each: int) -> None:
    """``senders`` agents send ``each`` envelopes to one online recipient, concurrently;
    check every one arrives once and FIFO per sender."""
    bob = FakeEndpoint(unique("bob"))
    hub.register(bob)
    agents = [FakeEndpoint(unique("s")) for _ in range(senders)]
    for agent in agents:
        hub.register(agent)
    sent: dict[str, list[bytes]] = {}

    def run(agent: FakeEndpoint) -> None:
        sent[agent.agent_id] = [agent.send(hub, bob.agent_id) for _ in range(each)]

    threads = [threading.Thread(target=run, args=(agent,)) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(bob.got(senders * each))
    assert len(set(bob.received)) == senders * each
    for ids in sent.values():
        assert [m for m in bob.received if m in set(ids)] == ids


def test_concurrent_senders_are_group_committed(shared_hub: HubProcess, clients: Any) -> None:
    fan_in(clients(shared_hub), senders=8, each=25)


def test_tiny_push_window_under_concurrent_load(tmp_path: Path) -> None:
    # In-process hub: with a window of 2, commits keep arriving while pages are read.
    server = NetworkHubServer("127.0.0.1", 0, str(tmp_path / "w.sqlite"), push_window=2)
    server.start(block=False)
    try:
        with NetworkHub("127.0.0.1", server.port) as hub:
            fan_in(hub, senders=4, each=50)
    finally:
        server.stop()


def test_store_and_forward_across_a_hub_kill(start_hub: Any, clients: Any) -> None:
    hub_proc = start_hub()
    alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
    bob_hub = clients(hub_proc)
    bob_hub.register(bob)
    bob_hub.close()  # bob is bound, then offline
    hub = clients(hub_proc, ack_timeout=1.0)
    hub.register(alice)
    sent = [alice.send(hub, bob.agent_id) for _ in range(30)]

    hub_proc.kill()  # SIGKILL: acked envelopes must survive
    while_down = alice.envelope(bob.agent_id)
    with pytest.raises(HubUnavailableError):
        hub.deliver(while_down)
    assert decode_envelope(while_down).message_id in alice.outbox
    sent.append(decode_envelope(while_down).message_id)

    hub_proc.start()  # same port, same database
    wait_until(lambda: not alice.outbox)  # re-sent from the outbox after reconnecting
    sent += [alice.send(hub, bob.agent_id) for _ in range(10)]

    bob_again = clients(hub_proc)
    bob_again.register(bob)
    wait_until(bob.got(len(sent)))
    wait_until(lambda: bob_again.queued_count() == 0)  # all acknowledged and deleted
    assert bob.received == sent  # every message once, FIFO


def test_unacked_pushes_are_redelivered_on_the_next_login(
    shared_hub: HubProcess, clients: Any
) -> None:
    hub = clients(shared_hub)
    alice = FakeEndpoint(unique("alice"))
    hub.register(alice)
    bob = FakeEndpoint(unique("bob"))
    failing = threading.Event()
    failing.set()
    attempts: list[bytes] = []
    original = bob.receive_envelope

    def flaky(data: bytes) -> DeliveryReport:
        attempts.append(data)
        if failing.is_set():
            raise OSError("disk full")  # not poison: must stay on the hub
        return original(data)

    bob.receive_envelope = flaky  # type: ignore[method-assign]
    bob_hub = clients(shared_hub)
    bob_hub.register(bob)
    mid = alice.send(hub, bob.agent_id)
    wait_until(lambda: attempts)
    bob_hub.unregister(bob.agent_id)
    failing.clear()
    bob_hub.register(bob)
    wait_until(bob.got(1))
    assert bob.received == [mid]


# --- identity ------------------------------------------------------------------


def test_takeover_is_refused(shared_hub: HubProcess, clients: Any) -> None:
    hub = clients(shared_hub)
    victim = FakeEndpoint(unique("victim"))
    hub.register(victim)
    thief_hub = clients(shared_hub)
    thief = FakeEndpoint(victim.agent_id)  # same id, another key
    with pytest.raises(AuthFailedError) as info:
        thief_hub.register(thief)
    assert info.value.code == "identity_mismatch"
    # The victim is undisturbed and still receives its mail.
    sender = FakeEndpoint(unique("sender"))
    hub.register(sender)
    mid = sender.send(hub, victim.agent_id)
    wait_until(victim.got(1))
    assert victim.received == [mid]
    assert thief.received == []


def test_key_rotation(shared_hub: HubProcess, clients: Any) -> None:
    hub = clients(shared_hub)
    old = FakeEndpoint(unique("rot"))
    hub.register(old)
    new_identity = IdentityKeyPair.generate()
    hub.rotate_key(old.agent_id, new_identity.public.signing, old.identity.sign, new_identity.sign)
    hub.unregister(old.agent_id)
    with pytest.raises(AuthFailedError):
        clients(shared_hub).register(FakeEndpoint(old.agent_id, identity=old.identity))
    clients(shared_hub).register(FakeEndpoint(old.agent_id, identity=new_identity))


def test_forged_sender_is_refused(shared_hub: HubProcess) -> None:
    mallory, victim = unique("mallory"), unique("victim")
    identity = IdentityKeyPair.generate()
    raw = RawClient(shared_hub.port, timeout=15)
    try:
        assert isinstance(raw.login(mallory, identity), hp.LoginAccepted)
        forged = FakeEndpoint(victim).envelope(mallory)  # claims to come from the victim
        answer = raw.answer(raw.conn.send(forged))
        assert isinstance(answer, hp.ErrorReceived)
        assert (answer.code, answer.fatal) == ("forged_sender", False)
        assert answer.message_id == decode_envelope(forged).message_id
        # The connection stays usable.
        assert isinstance(raw.answer(raw.conn.list_agents()), hp.AgentsReceived)
    finally:
        raw.close()


def test_duplicate_message_id_is_stored_once(shared_hub: HubProcess, clients: Any) -> None:
    hub = clients(shared_hub)
    alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
    hub.register(alice)
    bob_hub = clients(shared_hub)
    bob_hub.register(bob)
    bob_hub.close()
    data = alice.envelope(bob.agent_id)
    before = hub.stats()["queued"]
    hub.deliver(data)
    hub.deliver(data)  # the retry after a lost ack: acknowledged, not stored again
    assert hub.stats()["queued"] == before + 1
    clients(shared_hub).register(bob)
    wait_until(bob.got(1))
    wait_until(lambda: hub.stats()["queued"] == before)
    assert bob.received == [decode_envelope(data).message_id]


def test_prekeys_low_reaches_the_owner(shared_hub: HubProcess, clients: Any) -> None:
    hub = clients(shared_hub)
    owner = FakeEndpoint(unique("owner"), pool=20)
    hub.register(owner)
    asker = FakeEndpoint(unique("asker"))
    hub.register(asker)
    hub.fetch_prekey_bundle(owner.agent_id)  # 19 left of each kind: below the mark of 20
    wait_until(lambda: owner.low == [19])
    wait_until(lambda: not owner.one_time_prekeys())  # the top-up was uploaded
    ids = set()
    for _ in range(25):
        bundle = PrekeyBundle.decode(hub.fetch_prekey_bundle(owner.agent_id))
        assert bundle.one_time_prekey is not None
        ids.add(bundle.one_time_prekey.prekey_id)
    assert len(ids) == 25  # each one-time prekey handed out once


# --- abuse and limits ------------------------------------------------------------


def _login(key: bytes, hub_address: str, binding: bytes = b"") -> Callable[[int], bytes]:
    """A LOGIN with a zero signature, for the hub on a port; ``{port}`` names that port."""
    return lambda port: f.encode_frame(
        f.Login(
            1,
            hp.PROTOCOL_VERSION,
            "x",
            key,
            bytes(64),
            b"",
            hub_address.format(port=port),
            binding,
        )
    )


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"\x00\x00\x00\x05\xee1234", "bad_frame"),
        (b"\x7f\xff\xff\xff", "frame_too_large"),
        (b"\x00\x00\x00\x00", "bad_frame"),
        (f.encode_frame(f.Send(1, b"early")), "unexpected_frame"),
        (_login(bytes(32), "127.0.0.1:{port}"), "weak_key"),
        (_login(KEY, "127.0.0.1:{port}"), "bad_signature"),
        (_login(KEY, "127.0.0.1:1"), "wrong_hub"),
        (_login(KEY, "localhost:{port}", b"\x01" * 32), "channel_binding_mismatch"),
        (f.encode_frame(f.Login(1, 7, "x", bytes(32), bytes(64))), "unsupported_version"),
        (f.encode_frame(f.Login(1, 1, "x", KEY, bytes(64))), "unsupported_version"),
    ],
)
def test_malformed_frames_get_an_error_then_close(
    shared_hub: HubProcess, garbage: bytes | Callable[[int], bytes], code: str
) -> None:
    data = garbage(shared_hub.port) if callable(garbage) else garbage
    with socket.create_connection(("127.0.0.1", shared_hub.port), timeout=15) as sock:
        sock.sendall(data)
        frames = frames_until_eof(sock)
    assert isinstance(frames[0], f.Hello)
    last = frames[-1]
    assert isinstance(last, f.Error) and last.fatal and last.code == code
    assert last.request_id == (
        1 if data[4:5] == bytes([f.Login.TYPE]) else 0
    )  # LOGIN refusals name it


def test_abuse_does_not_disturb_legitimate_agents(shared_hub: HubProcess, clients: Any) -> None:
    idle = [
        socket.create_connection(("127.0.0.1", shared_hub.port), timeout=15) for _ in range(300)
    ]
    try:
        hub = clients(shared_hub)
        alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
        hub.register(alice)
        hub.register(bob)
        assert hub.stats()["connections"] >= 302
        for _ in range(3):  # garbage, truncated frames and random bytes on other connections
            for junk in (b"\xff" * 64, b"\x00\x00\x00\x40\x20abc", os.urandom(4096)):
                with socket.create_connection(("127.0.0.1", shared_hub.port), timeout=15) as s:
                    s.sendall(junk)
                    s.shutdown(socket.SHUT_WR)
                    frames_until_eof(s)
        sent = [alice.send(hub, bob.agent_id) for _ in range(20)]
        wait_until(bob.got(20))
        assert bob.received == sent
    finally:
        for sock in idle:
            sock.close()
    assert shared_hub.alive
    assert "frame_too_large" in shared_hub.log() or "bad_frame" in shared_hub.log()


def test_handshake_timeout_closes_silent_connections(start_hub: Any) -> None:
    hub_proc = start_hub("--handshake-timeout", "0.3")
    with socket.create_connection(("127.0.0.1", hub_proc.port), timeout=15) as sock:
        frames = frames_until_eof(sock)
    assert isinstance(frames[0], f.Hello)
    assert frames[-1] == f.Error(0, "handshake_timeout", "no login in time", fatal=True)
    assert "no login within" in hub_proc.log()


def test_idle_connections_are_pinged_then_closed(start_hub: Any, clients: Any) -> None:
    hub_proc = start_hub("--idle-timeout", "0.6", "--ping-interval", "0.2")
    hub = clients(hub_proc, ping_interval=60.0)  # only the hub pings
    alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
    hub.register(alice)
    hub.register(bob)
    silent = RawClient(hub_proc.port, timeout=15)
    try:
        assert isinstance(
            silent.login(unique("mute"), IdentityKeyPair.generate()), hp.LoginAccepted
        )
        frames = frames_until_eof(silent.sock)  # never answers the PINGs
    finally:
        silent.close()
    assert isinstance(frames[0], f.Ping)
    assert frames[-1] == f.Error(0, "idle_timeout", "no data received in time", fatal=True)
    # The NetworkHub answered every PING, so its connections are still the same ones.
    mid = alice.send(hub, bob.agent_id)
    wait_until(bob.got(1))
    assert bob.received == [mid]
    assert hub_proc.log().count("logged in from") == 3


def test_rate_limit_refuses_excess_requests(tmp_path: Path) -> None:
    server = NetworkHubServer(
        "127.0.0.1", 0, str(tmp_path / "r.sqlite"), rate_per_s=0.001, rate_burst=3
    )
    server.start(block=False)
    raw = RawClient(server.port, timeout=15)
    try:
        raw.pump_until(lambda events: bool(events))  # HELLO
        answers = [raw.answer(raw.conn.list_agents()) for _ in range(6)]
    finally:
        raw.close()
        server.stop()
    assert [type(a) for a in answers[:3]] == [hp.AgentsReceived] * 3
    for answer in answers[3:]:
        assert isinstance(answer, hp.ErrorReceived)
        assert (answer.code, answer.fatal) == ("rate_limited", False)


def test_max_connections(start_hub: Any, clients: Any) -> None:
    hub_proc = start_hub("--max-connections", "2")
    first = [socket.create_connection(("127.0.0.1", hub_proc.port), timeout=15) for _ in range(2)]
    try:
        for sock in first:
            assert isinstance(f.FrameDecoder().feed(sock.recv(65536))[0], f.Hello)
        with socket.create_connection(("127.0.0.1", hub_proc.port), timeout=15) as extra:
            assert frames_until_eof(extra) == [
                f.Error(0, "too_many_connections", "try again later", fatal=True)
            ]
        with pytest.raises(HubUnavailableError):
            clients(hub_proc).register(FakeEndpoint(unique("late")))
    finally:
        for sock in first:
            sock.close()
    wait_until(lambda: _registers(clients(hub_proc)))
    assert "too_many_connections" in hub_proc.log()


def _registers(hub: NetworkHub) -> bool:
    try:
        hub.register(FakeEndpoint(unique("later")))
    except HubUnavailableError:
        return False
    return True


def test_quota_and_envelope_size(start_hub: Any, clients: Any) -> None:
    hub_proc = start_hub("--mailbox-max-messages", "3", "--max-envelope-bytes", "2048")
    hub = clients(hub_proc)
    alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
    hub.register(alice)
    bob_hub = clients(hub_proc)
    bob_hub.register(bob)
    bob_hub.close()
    sent = [alice.send(hub, bob.agent_id) for _ in range(3)]
    with pytest.raises(MailboxFullError):
        alice.send(hub, bob.agent_id)
    assert len(alice.outbox) == 1  # kept by the agent for a later retry
    alice.outbox.clear()
    with pytest.raises(HubError) as info:
        alice.send(hub, bob.agent_id, size=4096)
    assert info.value.code == "too_large"
    # The hub enforces the limit too (a client that skips the check).
    carol = FakeEndpoint(unique("carol"))
    raw = RawClient(hub_proc.port, timeout=15)
    try:
        assert isinstance(raw.login(carol.agent_id, carol.identity), hp.LoginAccepted)
        answer = raw.answer(raw.conn.send(b"\x01"))
        assert isinstance(answer, hp.ErrorReceived) and answer.code == "bad_envelope"
        big = carol.envelope(bob.agent_id, size=4096)
        raw.sock.sendall(f.encode_frame(f.Send(77, big)))
        answer = raw.answer(77)
        assert isinstance(answer, hp.ErrorReceived) and answer.code == "too_large"
    finally:
        raw.close()
    assert "mailbox of" in hub_proc.log() and "too_large" in hub_proc.log()
    clients(hub_proc).register(bob)
    wait_until(bob.got(3))
    assert bob.received == sent


def test_expired_envelopes_are_not_delivered(start_hub: Any, clients: Any) -> None:
    hub_proc = start_hub("--ttl", "0.5", "--purge-interval", "0.1")
    hub = clients(hub_proc)
    alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
    hub.register(alice)
    bob_hub = clients(hub_proc)
    bob_hub.register(bob)
    bob_hub.close()
    alice.send(hub, bob.agent_id)
    wait_until(lambda: "purged 1 expired envelopes" in hub_proc.log())
    assert hub.queued_count() == 0
    clients(hub_proc).register(bob)
    fresh = alice.send(hub, bob.agent_id)
    wait_until(bob.got(1))
    assert bob.received == [fresh]  # FIFO: the expired one would have come first


# --- transport and operations ----------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_pem(tmp_path)


def test_tls_round_trip(start_hub: Any, clients: Any, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    hub_proc = start_hub("--tls-cert", str(cert), "--tls-key", str(key))
    context = ssl.create_default_context(cafile=str(cert))
    hub = clients(hub_proc, tls=context, server_hostname="localhost")
    alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
    hub.register(alice)
    hub.register(bob)
    mid = alice.send(hub, bob.agent_id)
    wait_until(bob.got(1))
    assert bob.received == [mid]
    # Without trusting the certificate the client refuses to talk.
    with pytest.raises(HubUnavailableError):
        clients(hub_proc, tls=True, connect_timeout=2.0).register(FakeEndpoint(unique("x")))


def test_tls_ca_file_path_between_real_agents(
    start_hub: Any, tmp_path: Path, keydir: Path, agents: Any
) -> None:
    """README's self-signed deployment: ``NetworkHub(..., tls="hub.crt")`` trusts that file."""
    cert, key = _self_signed(tmp_path)
    hub_proc = start_hub("--tls-cert", str(cert), "--tls-key", str(key))
    with (
        NetworkHub("localhost", hub_proc.port, tls=str(cert)) as hub_a,
        NetworkHub("localhost", hub_proc.port, tls=cert) as hub_b,
    ):
        got: list[str] = []
        bob = agents("bob", hub=hub_b, keypair_path=keydir / "bob.json")
        bob.on_message(lambda m: got.append(m.text))
        alice = agents("alice", hub=hub_a, keypair_path=keydir / "alice.json")
        alice.send("bob", text="over TLS")
        wait_until(lambda: got == ["over TLS"])


def test_tls_ca_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(ConfigurationError, match=r"nope\.crt"):
        NetworkHub("localhost", 7700, tls=str(missing))
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match=r"garbage\.crt"):
        NetworkHub("localhost", 7700, tls=garbage)


def test_wildcard_hub_without_a_name_derives_names_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Version 1's NetworkHubServer("0.0.0.0") keeps working: it guesses its names.
    server = NetworkHubServer("0.0.0.0", 0, str(tmp_path / "w.sqlite"))
    with caplog.at_level(logging.INFO, logger="agentmesh.hub.server"):
        server.start(block=False)
    port = server.port
    try:
        assert any("pass hub_address" in r.getMessage() for r in caplog.records)
        for host in ("127.0.0.1", "localhost"):
            with NetworkHub(host, port, connect_timeout=5.0) as hub:
                hub.register(FakeEndpoint(unique("alice")))
    finally:
        server.stop()
    [announced] = [
        r.getMessage().removeprefix("hub names: ")
        for r in caplog.records
        if r.getMessage().startswith("hub names: ")
    ]
    names = hp.parse_hub_names(announced.replace(" ", ""))
    assert set(hp.loopback_names(port)) <= set(names)


def test_hub_address_names_the_hub_and_expected_hub_address_overrides(tmp_path: Path) -> None:
    server = NetworkHubServer(
        "127.0.0.1", 0, str(tmp_path / "n.sqlite"), hub_address="hub.example,other.example:1"
    )
    server.start(block=False)
    try:
        port = server.port
        with NetworkHub("127.0.0.1", port, connect_timeout=5.0) as hub:
            with pytest.raises(AuthFailedError, match=r"hub\.example:"):
                hub.register(FakeEndpoint(unique("alice")))
        expected = f"HUB.example:{port}"
        with NetworkHub("127.0.0.1", port, expected_hub_address=expected) as hub:
            hub.register(FakeEndpoint(unique("alice")))
    finally:
        server.stop()
    with pytest.raises(ConfigurationError):
        NetworkHubServer("127.0.0.1", 0, hub_address="bad name:1")
    with pytest.raises(ConfigurationError, match="tls_cert"):
        NetworkHubServer("127.0.0.1", 0, ssl_context=ssl.create_default_context())
    with pytest.raises(ValueError):
        NetworkHub("127.0.0.1", 1, expected_hub_address="no port")


def test_database_holds_no_plaintext(start_hub: Any, tmp_path: Path) -> None:
    hub_proc = start_hub()
    marker = "PLAINTEXT-MARKER-" + uuid.uuid4().hex
    keys = tmp_path / "keys"
    with hub_proc.client() as alice_hub, hub_proc.client() as bob_hub:
        bob = Agent("bob", hub=bob_hub, keypair_path=keys / "bob.key")
        bob.close()
        alice = Agent("alice", hub=alice_hub)
        alice.send("bob", marker, note=marker)
        assert alice_hub.queued_count() == 1
        # While stored (bob offline) and after delivery, no trace of the plaintext.
        assert hub_proc.db is not None
        stored = b"".join(p.read_bytes() for p in hub_proc.db.parent.glob(hub_proc.db.name + "*"))
        assert b"alice" in stored and marker.encode() not in stored
        got: list[str] = []
        bob = Agent("bob", hub=bob_hub, keypair_path=keys / "bob.key")
        bob.on_message(lambda m: got.append(m.text))
        wait_until(lambda: got == [marker])
        alice.close()
        bob.close()
    stored = b"".join(p.read_bytes() for p in hub_proc.db.parent.glob(hub_proc.db.name + "*"))
    assert marker.encode() not in stored
    assert marker not in hub_proc.log()


def test_database_from_environment(start_hub: Any, clients: Any, tmp_path: Path) -> None:
    db = tmp_path / "from-env.sqlite"
    hub_proc = start_hub(db=None, AGENTMESH_DB=str(db))
    clients(hub_proc).register(FakeEndpoint(unique("env")))
    assert db.exists() and not (tmp_path / "hub.sqlite").exists()


def test_newer_database_revision_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "newer.sqlite"
    store = HubStore(str(db))
    store.ensure_schema()
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    hub_proc = HubProcess(tmp_path, db="newer.sqlite")
    assert hub_proc.run_to_exit() == 2
    assert "newer AgentMesh" in hub_proc.log()


def test_sigterm_stops_cleanly(start_hub: Any, clients: Any) -> None:
    hub_proc = start_hub()
    hub = clients(hub_proc)
    alice, bob = FakeEndpoint(unique("alice")), FakeEndpoint(unique("bob"))
    hub.register(alice)
    hub.register(bob)
    alice.send(hub, bob.agent_id)
    wait_until(bob.got(1))
    assert hub_proc.terminate() == 0
    assert "hub stopped" in hub_proc.log()


# --- a SEND that fails to commit is not overtaken (issue 13) -----------------


def test_a_send_the_hub_failed_to_store_is_not_overtaken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The two-hub crash matrix's order violations: a group commit failed (there, a
    # deadlock between two hubs), the hub refused alice's message 1 with `internal`
    # and kept her connection; message 2 was stored at once, and message 1 (in her
    # outbox) was re-sent only at her next login, after it. Now the hub closes the
    # connection whose SEND failed: alice logs in again and re-sends 1 before 2.
    real = HubStore.enqueue
    armed = threading.Event()

    def flaky(self: HubStore, batch: list[Any], **kw: Any) -> Any:
        if armed.is_set() and any(item.sender == "alice" for item in batch):
            raise OperationalError("INSERT INTO envelopes ...", {}, Exception("disk I/O error"))
        return real(self, batch, **kw)

    monkeypatch.setattr(HubStore, "enqueue", flaky)
    server = NetworkHubServer("127.0.0.1", 0, str(tmp_path / "h.sqlite"))
    server.start(block=False)
    got: list[int] = []
    bob_hub = NetworkHub("127.0.0.1", server.port)
    alice_hub = NetworkHub("127.0.0.1", server.port, reconnect_initial=0.05, reconnect_max=0.2)
    try:
        bob = Agent("bob", hub=bob_hub, keypair_path=tmp_path / "bob.json")
        bob.on_message(lambda msg: got.append(int(msg.payload["n"])))
        alice = Agent("alice", hub=alice_hub, keypair_path=tmp_path / "alice.json")
        alice.send("bob", "m0", n=0)
        armed.set()
        with pytest.raises(HubError) as refused:
            alice.send("bob", "m1", n=1)
        assert refused.value.code == "internal"
        armed.clear()  # the database is well again
        alice.send("bob", "m2", n=2)  # acknowledged, or in the outbox while alice logs in
        wait_until(lambda: 2 in got, 20, what="bob to receive message 2")
        assert got == [0, 1, 2]
        wait_until(lambda: alice.status()["outbox"] == 0, 20, what="alice's outbox to empty")
        alice.close()
        bob.close()
    finally:
        alice_hub.close()
        bob_hub.close()
        server.stop()


def test_the_writer_refuses_a_connections_sends_after_one_failed_to_commit() -> None:
    # Pipelined SENDs already queued behind the failed one must not be stored
    # ahead of it either; other connections are not affected, and once the
    # connection is gone (forget_source) its id is forgotten.
    class Store:
        calls: list[list[bytes]] = []

        def enqueue(self, batch: list[NewEnvelope], **_kw: Any) -> list[EnqueueResult]:
            self.calls.append([item.message_id for item in batch])
            if len(self.calls) == 1:
                raise OperationalError("INSERT", {}, Exception("deadlock detected"))
            return [EnqueueResult(EnqueueStatus.STORED, n, None) for n, _ in enumerate(batch)]

    loop = asyncio.new_event_loop()
    store = Store()
    worker = StoreWorker(cast(HubStore, store), loop, HubOptions())
    worker.start()

    def send(n: int, source: int) -> asyncio.Future[EnqueueResult | BaseException]:
        future: asyncio.Future[EnqueueResult | BaseException] = loop.create_future()
        item = NewEnvelope(n.to_bytes(16, "big"), "alice", "bob", b"x", 10**15)
        worker.submit_send(item, future.set_result, source=source)
        return future

    def settle(*futures: asyncio.Future[Any]) -> list[Any]:
        return list(loop.run_until_complete(asyncio.gather(*futures)))

    try:
        [first] = settle(send(1, source=7))
        assert isinstance(first, OperationalError)
        later, other = settle(send(2, source=7), send(3, source=8))
        assert isinstance(later, EarlierSendFailed)
        assert isinstance(other, EnqueueResult) and other.status is EnqueueStatus.STORED
        worker.forget_source(7)
        [again] = settle(send(4, source=7))
        assert isinstance(again, EnqueueResult) and again.status is EnqueueStatus.STORED
        stored = [mid for batch in store.calls for mid in batch]
        assert (2).to_bytes(16, "big") not in stored  # refused without reaching the store
    finally:
        worker.stop()
        loop.close()
