"""Integrity of envelopes: tampering, reflection, swapping between sessions, version
downgrades and a header that claims a huge message counter."""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from agentkit import Inbox, flip
from hubproc import HubProcess, RawClient, unique
from security_helpers import InterceptHub, field_spans, frames_until_eof, reheader, state_dump

from agentmesh import Agent
from agentmesh.crypto import primitives as prim
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.errors import AuthenticationError, CryptoError, DecodeError
from agentmesh.protocol import hub_protocol as hp
from agentmesh.wire import frames as f
from agentmesh.wire.codec import Writer
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(60)

REFUSED = (CryptoError, DecodeError)


def _pair(keydir: Path, agents, *, sign: bool = True) -> tuple[InterceptHub, Agent, Agent]:
    """alice and bob (file-backed) on an intercepting LocalHub, with a session both ways."""
    hub = InterceptHub()
    alice = agents(
        "alice",
        hub=hub,
        keypair_path=keydir / f"alice{sign}.json",
        sign_messages=sign,
        prekey_pool_size=3,
    )
    bob = agents(
        "bob",
        hub=hub,
        keypair_path=keydir / f"bob{sign}.json",
        sign_messages=sign,
        prekey_pool_size=3,
    )
    return hub, alice, bob


def _tampered_variants(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Every header field changed (and, where a flip can land on a valid value, a
    second change), plus the ciphertext, its length and the tag."""
    spans = field_spans(data)
    env = decode_envelope(data)
    for name, (start, end) in spans.items():
        yield name, flip(data, end - 1)
        if name in ("version", "kind"):
            for value in (0, 1, 2, 3):
                if value != data[start]:
                    yield f"{name}={value}", data[:start] + bytes((value,)) + data[end:]
        elif name in ("sender", "recipient"):
            other = {"alice": "carol", "bob": "bot"}[getattr(env, name)]
            yield f"{name}={other}", reheader(data, **{name: other})
        elif name == "timestamp":
            yield "timestamp=0", reheader(data, timestamp=0)
            yield "timestamp=max", reheader(data, timestamp=2**64 - 1)
        elif name in ("pn", "n"):
            yield f"{name}+1", reheader(data, **{name: getattr(env.ratchet, name) + 1})
        elif name == "message_id":
            yield "message_id=random", reheader(data, message_id=os.urandom(16))
        elif name == "ciphertext_length":
            yield "truncated", data[:-1]
            yield "trailing", data + b"\x00"


def _attack(bob: Agent, bob_key: Path, genuine: bytes) -> list[str]:
    """Hand bob every tampered variant of ``genuine``; each must be refused without
    changing his state. Returns the names of the variants tried."""
    tried = []
    before = state_dump(bob_key)
    for name, forged in _tampered_variants(genuine):
        assert forged != genuine
        with pytest.raises(REFUSED):
            bob.endpoint.receive_envelope(forged)
        assert state_dump(bob_key) == before, f"{name} changed bob's state"
        tried.append(name)
    return tried


def test_tampering_with_any_envelope_field_is_detected__header_authentication(
    agents, keydir: Path
) -> None:
    """Integrity: changing any single field of an envelope (version, kind, message id,
    timestamp, sender, recipient, ratchet key, PN, N, every PQXDH initial-message
    field, ciphertext length, ciphertext, tag) makes the recipient refuse it, with
    and without inner signatures, leaving every byte of its state as it was; the
    genuine envelope is accepted afterwards."""
    for sign in (True, False):
        hub, alice, bob = _pair(keydir, agents, sign=sign)
        bob_key = keydir / f"bob{sign}.json"
        got = Inbox()
        bob.on_message(got)
        alice.on_message(lambda m: None)
        checked: list[str] = []

        initial = hub.capture(lambda alice=alice: alice.send("bob", "initial"))
        assert decode_envelope(initial).prekey is not None
        assert decode_envelope(initial).prekey.one_time_prekey_id is not None  # type: ignore[union-attr]
        checked += _attack(bob, bob_key, initial)
        hub.inject(initial)
        bob.send("alice", "reply")
        normal = hub.capture(lambda alice=alice: alice.send("bob", "normal"))
        assert decode_envelope(normal).prekey is None
        checked += _attack(bob, bob_key, normal)
        hub.inject(normal)
        assert got.texts == ["initial", "normal"]
        assert {
            "identity_signing",
            "identity_exchange",
            "identity_binding",
            "ephemeral",
            "signed_prekey_id",
            "kem_prekey_id",
            "kem_ciphertext",
            "one_time_prekey_flag",
            "one_time_prekey_id",
            "version",
            "kind",
            "message_id",
            "timestamp",
            "sender",
            "recipient",
            "ratchet_key",
            "pn",
            "n",
            "ciphertext_length",
            "ciphertext",
            "tag",
        } <= set(checked)
        alice.close()
        bob.close()


def test_reflected_envelope_is_refused__direction_binding(agents, keydir: Path) -> None:
    """Direction binding: an envelope alice sent to bob, pushed back to alice (as is,
    or with sender and recipient swapped so that it looks like bob's), is refused
    before it can touch alice's state; the same holds for bob's envelopes."""
    hub, alice, bob = _pair(keydir, agents)
    bob_got, alice_got = Inbox(), Inbox()
    bob.on_message(bob_got)
    alice.on_message(alice_got)
    first = hub.capture(lambda: alice.send("bob", "hello"))
    hub.inject(first)
    to_alice = hub.capture(lambda: bob.send("alice", "hi"))
    hub.inject(to_alice)
    to_bob = hub.capture(lambda: alice.send("bob", "again"))

    for owner, key, data in (
        (alice, keydir / "aliceTrue.json", first),
        (alice, keydir / "aliceTrue.json", to_bob),
        (bob, keydir / "bobTrue.json", to_alice),
    ):
        env = decode_envelope(data)
        before = state_dump(key)
        with pytest.raises(AuthenticationError):
            owner.endpoint.receive_envelope(data)  # as is: addressed to the other party
        swapped = reheader(data, sender=env.recipient, recipient=env.sender)
        with pytest.raises(AuthenticationError):
            owner.endpoint.receive_envelope(swapped)  # relabelled as coming from the peer
        assert state_dump(key) == before
    hub.inject(to_bob)
    assert bob_got.texts == ["hello", "again"] and alice_got.texts == ["hi"]


def test_envelopes_swapped_between_sessions_are_refused__session_binding(
    agents, keydir: Path
) -> None:
    """Session binding: an envelope of alice->bob relabelled as carol->bob (and the
    reverse) is refused; of two sessions of the same pair, an envelope of the older
    one is decrypted by the older one only, a splice of one session's initial-message
    header with the other's ciphertext is refused, and neither session is disturbed."""
    hub = InterceptHub()
    bob_key = keydir / "bob.json"
    bob = agents("bob", hub=hub, keypair_path=bob_key, prekey_pool_size=4)
    alice = agents("alice", hub=hub, keypair_path=keydir / "alice.json", prekey_pool_size=4)
    carol = agents("carol", hub=hub, keypair_path=keydir / "carol.json", prekey_pool_size=4)
    got = Inbox()
    bob.on_message(got)
    for peer in (alice, carol):
        peer.on_message(lambda m: None)
        peer.send("bob", f"hi from {peer.agent_id}")
        bob.send(peer.agent_id, "hi")

    # Across peers: "alice" and "carol" have the same length, so only the label moves.
    from_alice = hub.capture(lambda: alice.send("bob", "a1"))
    from_carol = hub.capture(lambda: carol.send("bob", "c1"))
    before = state_dump(bob_key)
    with pytest.raises(AuthenticationError):
        bob.endpoint.receive_envelope(reheader(from_alice, sender="carol"))
    with pytest.raises(AuthenticationError):
        bob.endpoint.receive_envelope(reheader(from_carol, sender="alice"))
    assert state_dump(bob_key) == before

    # Same pair, two sessions: s1 (established) and s2 (alice starts afresh).
    old_session = hub.capture(lambda: alice.send("bob", "on s1"))
    alice.connect_with_bundle(hub.get_bundle("bob"))
    s2_first = hub.capture(lambda: alice.send("bob", "s2 opens"))
    s2_second = hub.capture(lambda: alice.send("bob", "s2 goes on"))
    s2_prekey = decode_envelope(s2_first).prekey
    assert s2_prekey is not None and decode_envelope(old_session).prekey is None
    spliced = [
        reheader(old_session, prekey=s2_prekey),  # s2's initial-message fields, s1's body
        reheader(s2_first, prekey=None),  # s2's first body as a normal (s1) message
        reheader(s2_first, ciphertext=decode_envelope(s2_second).ciphertext),  # s2, body of N=1
        reheader(old_session, dh=decode_envelope(s2_second).ratchet.dh),  # s1 body, s2 ratchet
    ]
    before = state_dump(bob_key)
    for forged in spliced:
        with pytest.raises(REFUSED):
            bob.endpoint.receive_envelope(forged)
    assert state_dump(bob_key) == before

    for genuine in (from_alice, from_carol, s2_first, old_session, s2_second):
        hub.inject(genuine)  # s1's envelope arrives while s2 is active, then s2 again
    assert got.texts[-5:] == ["a1", "c1", "s2 opens", "on s1", "s2 goes on"]
    alice.send("bob", "still s2")
    assert got.texts[-1] == "still s2"


def test_version_downgrade_is_refused__version_pinning(
    shared_hub: HubProcess, agents, keydir: Path
) -> None:
    """Version pinning: envelopes with another version byte are refused by the hub
    (not stored) and by the agent; a LOGIN with another protocol version is refused
    fatally; a client refuses a hub whose HELLO offers another version and never
    logs in to it."""
    user = unique("user")
    identity = IdentityKeyPair.generate()
    hub = InterceptHub()
    alice = agents("alice", hub=hub, keypair_path=keydir / "alice.json", prekey_pool_size=3)
    bob = agents("bob", hub=hub, keypair_path=keydir / "bob.json", prekey_pool_size=3)
    genuine = hub.capture(lambda: alice.send("bob", "v2 only"))
    for version in (0, 1, 3, 255):  # 1: protocol 1's envelopes
        downgraded = bytes((version,)) + genuine[1:]
        with pytest.raises(DecodeError, match="version"):
            bob.endpoint.receive_envelope(downgraded)

    for version in (hp.PROTOCOL_VERSION - 1, hp.PROTOCOL_VERSION + 1):
        raw = RawClient(shared_hub.port)
        try:
            raw.hello()
            challenge = raw.conn.login_challenge(user)
            frame = f.Login(1, version, user, identity.public.signing, identity.sign(challenge))
            raw.sock.sendall(f.encode_frame(frame))
            frames = frames_until_eof(raw.sock, timeout=4)
            assert isinstance(frames[-1], f.Error) and frames[-1].fatal
            assert frames[-1].code == "unsupported_version"
        finally:
            raw.close()
    assert shared_hub.query("SELECT COUNT(*) FROM agents WHERE agent_id = ?", (user,)) == [(0,)]

    raw = RawClient(shared_hub.port)
    try:
        assert isinstance(raw.login(user, identity), hp.LoginAccepted)
        # An envelope from this user, then the same with its version byte changed.
        body = Writer().u8(2).u8(2).raw(os.urandom(16)).u64(1).str8(user).str8(user)
        body.raw(os.urandom(32)).u32(0).u32(0).bytes32(os.urandom(40))
        envelope = body.getvalue()
        for version in (0, 1, 3):
            answer = raw.answer(raw.conn.send(bytes((version,)) + envelope[1:]))
            assert isinstance(answer, hp.ErrorReceived) and answer.code == "bad_envelope"
    finally:
        raw.close()
    assert shared_hub.queued_for(user) == 0

    for offered in (hp.PROTOCOL_VERSION - 1, hp.PROTOCOL_VERSION + 1):
        client = hp.ClientConnection()
        hello = f.Hello(offered, os.urandom(32), "hub:1", 1 << 20, 1 << 20)
        events = client.receive_data(f.encode_frame(hello))
        if offered < hp.PROTOCOL_VERSION:
            assert [type(e) for e in events] == [hp.ConnectionFailed]
            assert events[0].code == "unsupported_version"  # type: ignore[attr-defined]
            assert client.closed
        else:  # a newer hub: the client speaks its own version, never another
            assert client.version == hp.PROTOCOL_VERSION
            client.login(user, identity.public.signing, bytes(64))
            sent = f.FrameDecoder().feed(client.data_to_send())
            assert [fr.version for fr in sent if isinstance(fr, f.Login)] == [hp.PROTOCOL_VERSION]


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    outer_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # e.g. pytest-timeout's
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            left = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


def test_skipped_message_key_flood_is_refused__bounded_skip(agents, keydir: Path) -> None:
    """Bounded skipping: a header claiming N = 10**9 on the current chain, or PN = 10**9
    with a new ratchet key, is refused at once (no 10**9 key derivations, no memory
    growth, no state change), and the genuine message still decrypts."""
    hub, alice, bob = _pair(keydir, agents)
    bob_key = keydir / "bobTrue.json"
    got = Inbox()
    bob.on_message(got)
    alice.on_message(lambda m: None)
    alice.send("bob", "hello")
    bob.send("alice", "hi")
    genuine = hub.capture(lambda: alice.send("bob", "after the flood"))
    fresh_key = prim.x25519_public_bytes(prim.x25519_generate())
    floods = [
        reheader(genuine, n=10**9),
        reheader(genuine, dh=fresh_key, pn=10**9),
        reheader(genuine, dh=fresh_key, pn=0, n=10**9),
    ]
    before = state_dump(bob_key)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for flood in floods:
        started = time.monotonic()
        with _deadline(3.0), pytest.raises(CryptoError, match="too many skipped messages"):
            bob.endpoint.receive_envelope(flood)
        assert time.monotonic() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024  # KiB
    assert state_dump(bob_key) == before
    hub.inject(genuine)
    assert got.texts == ["hello", "after the flood"]
