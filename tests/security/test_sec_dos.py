"""Resource attacks on the hub: prekey draining, mailbox flooding, oversized and
truncated frames, slowloris and connection floods. Legitimate agents keep working."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from agentkit import Inbox
from hubproc import HubProcess, RawClient, unique
from security_helpers import frames_until_eof, junk_envelope, raw_frame, wait_until

from agentmesh import Agent
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle
from agentmesh.errors import MailboxFullError
from agentmesh.protocol import hub_protocol as hp
from agentmesh.wire import frames as f
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(60)


def _chat(sender: Agent, recipient: Agent, inbox: Inbox, text: str) -> None:
    """``sender`` sends ``text`` and ``recipient``'s handler gets it."""
    sender.send(recipient.agent_id, text)
    wait_until(lambda: text in inbox.texts, what=f"{text!r} delivered")


def test_one_time_prekey_drain_is_rate_limited_then_falls_back__last_resort_prekeys(
    start_hub, net, agents, keydir: Path
) -> None:
    """Prekey exhaustion: a flood of bundle fetches on one connection is cut off by
    the rate limit; the fetches that got through each consumed one one-time prekey;
    once the pool is empty the hub hands out the signed last-resort bundle, on which
    a new session still works both ways; and the owner, told its pool is low, makes
    fresh one-time prekeys (it used to believe the drained ones were still there)."""
    hub = start_hub("--rate-per-s", "1", "--rate-burst", "25")
    bob_id, alice_id = unique("bob"), unique("alice")
    bob = agents(bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=8)
    published = PrekeyBundle.decode(bob.endpoint.prekey_bundle_bytes())
    bob.close()  # offline: no top-up while the attack runs

    def pool() -> int:
        sql = "SELECT COUNT(*) FROM one_time_prekeys WHERE agent_id = ? AND kind = 1"
        return int(hub.query(sql, (bob_id,))[0][0])

    def fetch(client: RawClient, count: int) -> list[hp.Event]:
        requests = [client.conn.fetch_bundle(bob_id) for _ in range(count)]
        return [client.answer(rid) for rid in requests]

    mallory = RawClient(hub.port)
    try:
        assert isinstance(
            mallory.login(unique("mallory"), IdentityKeyPair.generate()), hp.LoginAccepted
        )
        answers = fetch(mallory, 120)
    finally:
        mallory.close()
    bundles = [
        PrekeyBundle.decode(a.bundle).verify() for a in answers if isinstance(a, hp.BundleReceived)
    ]
    limited = [a for a in answers if isinstance(a, hp.ErrorReceived) and a.code == "rate_limited"]
    assert len(bundles) + len(limited) == 120
    assert len(limited) >= 90 and len(bundles) <= 30
    with_one_time = [b for b in bundles if b.one_time_prekey is not None]
    assert len({b.one_time_prekey.prekey_id for b in with_one_time if b.one_time_prekey}) == 8
    for bundle in bundles:
        assert bundle.signed_prekey == published.signed_prekey
        if bundle.one_time_prekey is None:  # the fallback: the last-resort KEM prekey
            assert bundle.kem_prekey == published.kem_prekey
    assert pool() == 0

    alice_hub = net(hub, tap=True)
    alice = agents(alice_id, hub=alice_hub, keypair_path=keydir / "a.json", prekey_pool_size=8)
    alice_inbox, bob_inbox = Inbox(), Inbox()
    alice.on_message(alice_inbox)
    alice.send(bob_id, "on the last resort")
    initial = decode_envelope(alice_hub.captured[0]).prekey
    assert initial is not None and initial.one_time_prekey_id is None
    assert initial.kem_prekey_id == published.kem_prekey.prekey_id
    bob = agents(bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=8)
    bob.on_message(bob_inbox)
    wait_until(lambda: bob_inbox.texts == ["on the last resort"])
    _chat(bob, alice, alice_inbox, "and back")

    # The next fetch while bob is online tells him his pool is low: he refills it.
    carol = RawClient(hub.port)
    try:
        assert isinstance(
            carol.login(unique("carol"), IdentityKeyPair.generate()), hp.LoginAccepted
        )
        [still_empty] = fetch(carol, 1)
        assert isinstance(still_empty, hp.BundleReceived)
        assert PrekeyBundle.decode(still_empty.bundle).one_time_prekey is None
        wait_until(lambda: pool() >= 8, what="bob published fresh one-time prekeys")
        [refilled] = fetch(carol, 1)
        assert isinstance(refilled, hp.BundleReceived)
        fresh = PrekeyBundle.decode(refilled.bundle).verify().one_time_prekey
        drained = {b.one_time_prekey.prekey_id for b in with_one_time if b.one_time_prekey}
        assert fresh is not None and fresh.prekey_id not in drained
    finally:
        carol.close()


def test_mailbox_flood_is_capped_by_quota__mailbox_quota(
    start_hub, net, agents, keydir: Path
) -> None:
    """Mailbox quota: a flood into an offline agent's mailbox stops at the quota
    ("mailbox_full"); an honest sender gets MailboxFullError and keeps its message
    in its outbox; mail queued before the flood is not lost, and the refused message
    arrives once the recipient has drained its mailbox and the sender reconnects."""
    hub = start_hub("--mailbox-max-messages", "5")
    bob_id, carol_id, alice_id = unique("bob"), unique("carol"), unique("alice")
    bob = agents(bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=4)
    bob.close()
    carol = agents(carol_id, hub=net(hub), keypair_path=keydir / "c.json", prekey_pool_size=4)
    carol.send(bob_id, "queued before the flood")

    mallory_id = unique("mallory")
    raw = RawClient(hub.port)
    try:
        assert isinstance(raw.login(mallory_id, IdentityKeyPair.generate()), hp.LoginAccepted)
        answers = [raw.answer(raw.conn.send(junk_envelope(mallory_id, bob_id))) for _ in range(30)]
    finally:
        raw.close()
    accepted = [a for a in answers if isinstance(a, hp.SendAcknowledged)]
    full = [a for a in answers if isinstance(a, hp.ErrorReceived) and a.code == "mailbox_full"]
    assert (len(accepted), len(full)) == (4, 26)
    assert hub.queued_for(bob_id) == 5
    assert "mailbox of" in hub.log()

    alice_hub = net(hub)
    alice = agents(alice_id, hub=alice_hub, keypair_path=keydir / "a.json", prekey_pool_size=4)
    with pytest.raises(MailboxFullError):
        alice.send(bob_id, "refused for now")
    assert alice.status()["outbox"] == 1  # kept for a retry
    assert hub.queued_for(bob_id) == 5

    bob = agents(bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=4)
    inbox = Inbox()
    bob.on_message(inbox)
    # The hub forgets an envelope once bob committed it; bob's handlers run after that,
    # on their own thread, so wait for both before looking.
    wait_until(
        lambda: hub.queued_for(bob_id) == 0 and len(inbox) > 0, what="bob drained his mailbox"
    )
    assert inbox.texts == ["queued before the flood"]  # the junk was dropped
    alice_hub.register(alice)  # reconnect: the outbox is sent again
    wait_until(lambda: inbox.texts == ["queued before the flood", "refused for now"])
    wait_until(lambda: alice.status()["outbox"] == 0)


def test_oversized_frames_are_refused_early__frame_limits(
    shared_hub: HubProcess, net, agents, keydir: Path
) -> None:
    """Frame limits: a length prefix above the hub's frame limit is refused as soon as
    the 4 prefix bytes arrive (nothing is buffered or awaited), an envelope above the
    envelope limit is refused without closing the connection, and agents that play
    by the rules are served throughout."""
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = agents(
        alice_id, hub=net(shared_hub), keypair_path=keydir / "a.json", prekey_pool_size=3
    )
    bob = agents(bob_id, hub=net(shared_hub), keypair_path=keydir / "b.json", prekey_pool_size=3)
    inbox = Inbox()
    bob.on_message(inbox)

    for declared in (2**32 - 1, 2**31, 65536 + 64 * 1024 + 1):
        with socket.create_connection(("127.0.0.1", shared_hub.port), timeout=10) as sock:
            sock.sendall(declared.to_bytes(4, "big"))  # and never a body
            frames = frames_until_eof(sock, timeout=5)
        assert isinstance(frames[0], f.Hello)  # then at once the refusal, no handshake_timeout
        assert isinstance(frames[-1], f.Error) and frames[-1].fatal
        assert frames[-1].code == "frame_too_large"
    # Before and after login alike.
    raw = RawClient(shared_hub.port)
    try:
        assert isinstance(raw.login(unique("big"), IdentityKeyPair.generate()), hp.LoginAccepted)
        big = junk_envelope(raw.conn.agent_id or "", bob_id, size=65536)
        raw.sock.sendall(f.encode_frame(f.Send(7, big)))
        answer = raw.answer(7)
        assert isinstance(answer, hp.ErrorReceived)
        assert (answer.code, answer.fatal) == ("too_large", False)
        assert isinstance(raw.answer(raw.conn.list_agents()), hp.AgentsReceived)  # still open
        raw.sock.sendall((2**30).to_bytes(4, "big"))
        frames = frames_until_eof(raw.sock, timeout=5)
        assert isinstance(frames[-1], f.Error) and frames[-1].code == "frame_too_large"
    finally:
        raw.close()
    _chat(alice, bob, inbox, "still served")
    assert shared_hub.alive


def test_truncated_frames_are_refused__strict_parsing(
    shared_hub: HubProcess, net, agents, keydir: Path
) -> None:
    """Strict parsing: a frame whose body ends before its fields do (LOGIN, SEND,
    ACK, FETCH_BUNDLE) is refused with a fatal bad_frame, an envelope cut short
    inside a well-formed SEND is refused as bad_envelope and not stored, and a frame
    cut off by the end of the stream just ends that connection; the hub stays up."""
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = agents(
        alice_id, hub=net(shared_hub), keypair_path=keydir / "a.json", prekey_pool_size=3
    )
    bob = agents(bob_id, hub=net(shared_hub), keypair_path=keydir / "b.json", prekey_pool_size=3)
    inbox = Inbox()
    bob.on_message(inbox)
    user = unique("user")
    identity = IdentityKeyPair.generate()

    login = f.encode_frame(f.Login(1, 1, user, identity.public.signing, bytes(64)))
    for cut in (login[: 4 + 1 + 6], login[: len(login) - 10]):
        body = cut[5:]
        with socket.create_connection(("127.0.0.1", shared_hub.port), timeout=10) as sock:
            sock.sendall(raw_frame(f.Login.TYPE, body))
            frames = frames_until_eof(sock, timeout=5)
        assert isinstance(frames[-1], f.Error) and frames[-1].fatal
        assert frames[-1].code == "bad_frame"

    genuine = junk_envelope(user, bob_id)
    for after_login in (
        raw_frame(f.Send.TYPE, f.encode_frame(f.Send(5, genuine))[5:-3]),  # SEND cut short
        raw_frame(f.Ack.TYPE, (3).to_bytes(2, "big") + os.urandom(20)),  # 3 ids, 1.25 given
        raw_frame(f.FetchBundle.TYPE, (5).to_bytes(4, "big") + b"\x09bob"),  # id cut short
    ):
        raw = RawClient(shared_hub.port)
        try:
            assert isinstance(raw.login(user, identity), hp.LoginAccepted)
            answer = raw.answer(raw.conn.send(genuine[: len(genuine) - 20]))  # envelope cut
            assert isinstance(answer, hp.ErrorReceived)
            assert (answer.code, answer.fatal) == ("bad_envelope", False)
            raw.sock.sendall(after_login)
            frames = frames_until_eof(raw.sock, timeout=5)
            assert isinstance(frames[-1], f.Error) and frames[-1].fatal
            assert frames[-1].code == "bad_frame"
        finally:
            raw.close()
    assert shared_hub.queued_for(bob_id) == 0

    # Cut off by the end of the stream: the hub closes its side and forgets the rest.
    with socket.create_connection(("127.0.0.1", shared_hub.port), timeout=10) as sock:
        sock.sendall(login[:30])
        sock.shutdown(socket.SHUT_WR)
        frames = frames_until_eof(sock, timeout=5)
    assert [type(fr) for fr in frames] == [f.Hello]  # closed at the EOF, not by a timeout
    _chat(alice, bob, inbox, "still served")
    assert shared_hub.alive


def _trickle(port: int, data: bytes, deadline: float) -> tuple[list[f.Frame], float]:
    """Send ``data`` one byte every 50 ms; return the hub's frames and when it closed."""
    decoder = f.FrameDecoder(max_frame_size=1 << 24)
    frames: list[f.Frame] = []
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(0.05)
        for byte in data:
            if time.monotonic() - started > deadline:
                break
            try:
                sock.sendall(bytes((byte,)))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            frames += decoder.feed(chunk)
        return frames, time.monotonic() - started


def test_slowloris_is_cut_by_the_handshake_timeout__handshake_deadline(
    shared_hub: HubProcess, net, agents, keydir: Path
) -> None:
    """Handshake deadline: a client that trickles a LOGIN byte by byte, or keeps the
    connection busy with anonymous requests and PINGs without ever logging in, is
    closed with handshake_timeout when the (2 s) deadline passes, even though it is
    never silent; logged-in agents are unaffected."""
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = agents(
        alice_id, hub=net(shared_hub), keypair_path=keydir / "a.json", prekey_pool_size=3
    )
    bob = agents(bob_id, hub=net(shared_hub), keypair_path=keydir / "b.json", prekey_pool_size=3)
    inbox = Inbox()
    bob.on_message(inbox)

    identity = IdentityKeyPair.generate()
    login = f.encode_frame(f.Login(1, 1, unique("slow"), identity.public.signing, bytes(64)))
    frames, elapsed = _trickle(shared_hub.port, login[:-1], deadline=6.0)
    assert isinstance(frames[0], f.Hello)
    assert frames[-1] == f.Error(0, "handshake_timeout", "no login in time", fatal=True)
    assert 1.0 < elapsed < 5.0

    busy = b"".join(f.encode_frame(f.ListAgents(i) if i % 2 else f.Ping(i)) for i in range(1, 200))
    raw = RawClient(shared_hub.port)
    try:
        raw.hello()
        started = time.monotonic()
        raw.sock.settimeout(0.1)
        closed = False
        while time.monotonic() - started < 6.0 and not closed:
            try:
                raw.sock.sendall(busy[:9])
                busy = busy[9:] + busy[:9]
                data = raw.sock.recv(65536)
                closed = not data
                raw.events += raw.conn.receive_data(data)
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if any(isinstance(e, hp.ConnectionFailed) for e in raw.events):
                closed = True
        elapsed = time.monotonic() - started
    finally:
        raw.close()
    failed = [e for e in raw.events if isinstance(e, hp.ConnectionFailed)]
    assert [e.code for e in failed] == ["handshake_timeout"]
    assert elapsed < 5.0
    assert any(isinstance(e, hp.AgentsReceived) for e in raw.events)  # it was served meanwhile
    _chat(alice, bob, inbox, "unaffected")


def test_connection_flood_is_capped_and_reaped__connection_limits(
    start_hub, net, agents, keydir: Path
) -> None:
    """Connection limits: a flood of connections beyond --max-connections is refused
    at once (too_many_connections), the accepted ones that never log in are closed
    by the handshake timeout, agents already connected keep exchanging messages
    during the flood, and new agents get in once it is reaped."""
    hub = start_hub("--max-connections", "10", "--handshake-timeout", "1.5")
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = agents(alice_id, hub=net(hub), keypair_path=keydir / "a.json", prekey_pool_size=3)
    bob = agents(bob_id, hub=net(hub), keypair_path=keydir / "b.json", prekey_pool_size=3)
    inbox = Inbox()
    bob.on_message(inbox)

    flood = [socket.create_connection(("127.0.0.1", hub.port), timeout=10) for _ in range(40)]
    try:
        first = []
        for sock in flood:
            frames = frames_until_eof(sock, timeout=0.3)
            first.append(frames[0] if frames else None)
        greeted = [fr for fr in first if isinstance(fr, f.Hello)]
        refused = [fr for fr in first if isinstance(fr, f.Error)]
        assert len(greeted) == 8  # 10 minus alice's and bob's connections
        assert len(refused) == 32
        assert {(e.code, e.fatal) for e in refused} == {("too_many_connections", True)}
        _chat(alice, bob, inbox, "during the flood")
        for sock in flood:
            sock.settimeout(5)
        wait_until(lambda: hub.log().count("no login within") >= 8, what="flood reaped")
    finally:
        for sock in flood:
            sock.close()
    carol = agents(
        unique("carol"), hub=net(hub), keypair_path=keydir / "c.json", prekey_pool_size=3
    )
    _chat(carol, bob, inbox, "after the flood")
    assert hub.alive
