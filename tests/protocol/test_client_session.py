"""The sans-I/O client session against the hub's own connection state machine, over an
in-memory link (h11's tests/helpers.py style): no sockets, no threads, a fake clock.

:class:`Pair` plays both sides: the :class:`ClientSession` under test, and a scripted
hub built on :class:`~agentmesh.protocol.hub_protocol.ServerConnection` that accepts
logins and uploads, and answers SENDs when and how a test says. :class:`Endpoint`
answers the session's endpoint effects the way ``NetworkHub``'s driver does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeySecrets
from agentmesh.errors import (
    CryptoError,
    DecodeError,
    HubError,
    IdentityChangedError,
    LocalProtocolError,
)
from agentmesh.protocol import client_session as cs
from agentmesh.protocol import hub_protocol as hp
from agentmesh.protocol.client_session import ClientSession, Phase, Verdict
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.wire import frames as f
from agentmesh.wire.envelope import RatchetHeader, decode_envelope, encode_header

HUB = "hub.test:7700"


def envelope(sender: str, recipient: str, *, size: int = 32) -> bytes:
    header = encode_header(
        os.urandom(16), 0, sender, recipient, RatchetHeader(os.urandom(32), 0, 0), None
    )
    return header + size.to_bytes(4, "big") + os.urandom(size)


def mid(data: bytes) -> bytes:
    return decode_envelope(data).message_id


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Endpoint:
    """The agent side: keys, an outbox, and a record of what the session told it."""

    agent_id: str = "alice"
    identity: IdentityKeyPair = field(default_factory=IdentityKeyPair.generate)
    outbox: list[bytes] = field(default_factory=list)
    uploaded: list[bytes] = field(default_factory=list)
    acked: list[bytes] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prekeys = PrekeySecrets.create(self.identity, 1_000)
        self.prekeys.top_up(self.identity, 1_000, pool_size=5)

    def bundle(self) -> bytes:
        return self.prekeys.bundle(self.agent_id, self.identity.public).encode()

    def one_time(self) -> list[bytes]:
        return [k.encode() for k in self.prekeys.unpublished_prekeys()]


class Pair:
    """A client session and a scripted hub, back to back."""

    def __init__(
        self,
        *,
        hub_names: str = HUB,
        auto_ack: bool = True,
        endpoint: Endpoint | None = None,
        stored_prekeys: set[bytes] | None = None,
        **options: object,
    ) -> None:
        self.clock = Clock()
        self.endpoint = endpoint or Endpoint()
        self.session = ClientSession(
            self.endpoint.agent_id,
            self.endpoint.identity.public.signing,
            dialled_address=HUB,
            clock=self.clock,
            rng=lambda: 0.5,
            retry_delays=lambda: cs.backoff(0.1, 1.0, rng=lambda: 0.5),
            stored_prekeys=stored_prekeys,
            **options,  # type: ignore[arg-type]
        )
        self.hub_names = hub_names
        self.auto_ack = auto_ack
        self.effects: list[cs.Effect] = []
        self.hub_events: list[hp.Event] = []
        self.hub_frames: list[str] = []  # what the client sent, by frame type, in order
        self.sends: list[hp.SendRequested] = []  # unanswered SENDs (auto_ack=False)
        self.refuse_uploads: str | None = None
        self.server: hp.ServerConnection | None = None
        self.answer_endpoint = True

    def connect(self) -> None:
        self.server = hp.ServerConnection(nonce=os.urandom(32), hub_address=self.hub_names)
        self.session.connected()

    def lose(self) -> None:
        self.session.connection_lost()
        self.server = None

    def pump(self) -> list[cs.Effect]:
        """Move bytes both ways until quiet, answering endpoint effects like the driver
        does (when ``answer_endpoint``); return the session's effects seen."""
        start = len(self.effects)
        while True:
            assert self.server is not None
            moved = False
            to_client = self.server.data_to_send()
            if to_client:
                moved = True
                self._effects(self.session.receive_data(to_client))
            to_server = self.session.data_to_send()
            if to_server:
                moved = True
                self.hub_frames += [type(fr).__name__ for fr in f.FrameDecoder().feed(to_server)]
                for event in self.server.receive_data(to_server):
                    self.hub_events.append(event)
                    self._hub(event)
            if not moved:
                return self.effects[start:]

    def _effects(self, effects: list[cs.Effect]) -> None:
        self.effects += effects
        if self.answer_endpoint:
            for effect in effects:
                self._effects(self.answer(effect))

    def answer(self, effect: cs.Effect) -> list[cs.Effect]:
        """What the driver does with one endpoint effect."""
        e, s = self.endpoint, self.session
        if isinstance(effect, cs.NeedLoginSignature):
            e.calls.append("sign_login")
            return s.login(effect.generation, e.identity.sign(effect.challenge), e.bundle())
        if isinstance(effect, cs.NeedPrekeys):
            e.calls.append("one_time_prekeys")
            return s.upload_prekeys(effect.generation, e.one_time())
        if isinstance(effect, cs.PrekeysStored):
            e.calls.append("one_time_prekeys_uploaded")
            e.uploaded += effect.encoded
            return []
        if isinstance(effect, cs.NeedOutbox):
            e.calls.append("unacked_envelopes")
            return s.outbox(effect.generation, list(e.outbox))
        if isinstance(effect, cs.OutboxFlushed):
            e.calls.append("envelopes_acked")
            e.acked += effect.acked
            return s.outbox_recorded(effect.generation)
        return []

    def _hub(self, event: hp.Event) -> None:
        server = self.server
        assert server is not None
        if isinstance(event, hp.LoginRequested):
            server.accept_login(created=True)
        elif isinstance(event, hp.PrekeysUploaded):
            if self.refuse_uploads:
                server.reply_error(event.request_id, self.refuse_uploads, "no")
            else:
                server.reply_ok(event.request_id)
        elif isinstance(event, hp.BundlePublished):
            server.reply_ok(event.request_id)
        elif isinstance(event, hp.SendRequested):
            if self.auto_ack:
                server.reply_send_ack(event.request_id, event.message_id, False)
            else:
                self.sends.append(event)
        elif isinstance(event, hp.AgentsRequested):
            server.reply_agents(event.request_id, ["alice", "bob"])

    def ready(self) -> None:
        self.connect()
        self.pump()
        assert self.session.ready

    def of(self, kind: type[cs.Effect]) -> list[cs.Effect]:
        return [e for e in self.effects if isinstance(e, kind)]


def kinds(effects: list[cs.Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


# --- the login order ----------------------------------------------------------


def test_login_then_prekey_upload_then_outbox_flush_then_resume() -> None:
    pair = Pair()
    old = [envelope("alice", "bob") for _ in range(2)]
    pair.endpoint.outbox = list(old)
    pair.connect()
    assert pair.session.phase is Phase.AWAIT_HELLO
    pair.pump()
    assert kinds(pair.effects) == [
        "Greeted",
        "NeedLoginSignature",
        "NeedPrekeys",
        "PrekeysStored",
        "NeedOutbox",
        "OutboxFlushed",
        "SessionReady",
    ]
    assert pair.endpoint.calls == [
        "sign_login",
        "one_time_prekeys",
        "one_time_prekeys_uploaded",
        "unacked_envelopes",
        "envelopes_acked",
    ]
    # The hub saw the same order: LOGIN, then every upload, then the re-sent outbox.
    assert pair.hub_frames == ["Login", "UploadPrekeys", "Send", "Send"]
    flushed = pair.of(cs.OutboxFlushed)[0]
    assert isinstance(flushed, cs.OutboxFlushed)
    assert (set(flushed.acked), flushed.sent) == ({mid(d) for d in old}, 2)
    assert sorted(pair.endpoint.uploaded) == sorted(pair.endpoint.one_time())
    assert pair.session.ready and pair.session.outstanding == 0
    assert pair.session.envelope_limit == hp.DEFAULT_MAX_ENVELOPE_BYTES


def test_ready_waits_for_the_outbox_acks_to_be_recorded() -> None:
    pair = Pair()
    pair.endpoint.outbox = [envelope("alice", "bob")]
    pair.answer_endpoint = False
    pair.connect()
    for step in (cs.NeedLoginSignature, cs.NeedPrekeys, cs.NeedOutbox):
        effect = next(e for e in pair.pump() if isinstance(e, step))
        pair._effects(pair.answer(effect))
    flushed = next(e for e in pair.pump() if isinstance(e, cs.OutboxFlushed))
    assert pair.session.phase is Phase.FLUSHING and pair.session.flushing
    assert isinstance(flushed, cs.OutboxFlushed)
    assert pair.session.outbox_recorded(flushed.generation + 1) == []  # another connection's
    assert kinds(pair.session.outbox_recorded(flushed.generation)) == ["SessionReady"]


def test_an_empty_outbox_and_no_new_prekeys_go_straight_to_ready() -> None:
    stored: set[bytes] = set()
    first = Pair(stored_prekeys=stored)
    first.ready()
    # The agent registers again (a new session) before marking its prekeys uploaded:
    # the hub's acknowledged set is shared, so nothing is uploaded twice.
    second = Pair(endpoint=Endpoint(identity=first.endpoint.identity), stored_prekeys=stored)
    second.endpoint.prekeys = first.endpoint.prekeys
    second.ready()
    assert second.hub_frames == ["Login"]
    assert kinds(second.effects) == [
        "Greeted",
        "NeedLoginSignature",
        "NeedPrekeys",
        "PrekeysStored",  # the known ones, reported at once
        "NeedOutbox",
        "SessionReady",
    ]


@pytest.mark.parametrize(
    "code", ["identity_mismatch", "bad_signature", "unknown_agent", "shutting_down"]
)
def test_a_refused_login_fails_the_session_and_closes(code: str) -> None:
    pair = Pair()
    pair.connect()
    original = pair._hub

    def refusing(event: hp.Event) -> None:
        if isinstance(event, hp.LoginRequested):
            assert pair.server is not None
            pair.server.refuse_login(code, "refused")
        else:
            original(event)

    pair._hub = refusing  # type: ignore[method-assign]
    pair.pump()
    failed = pair.of(cs.LoginFailed)
    assert [(e.code, e.text) for e in failed if isinstance(e, cs.LoginFailed)] == [
        (code, "refused")
    ]
    closed = pair.of(cs.ConnectionClosed)
    assert isinstance(closed[0], cs.ConnectionClosed) and closed[0].sent_by_peer
    assert not closed[0].hello_refused
    assert pair.session.closed_by_protocol and not pair.session.ready
    assert "NeedPrekeys" not in kinds(pair.effects)


def test_a_hub_that_does_not_answer_to_the_dialled_name_is_refused_before_signing() -> None:
    pair = Pair(hub_names="other.test:7700")
    pair.connect()
    pair.pump()
    assert kinds(pair.effects) == ["ConnectionClosed"]
    closed = pair.effects[0]
    assert isinstance(closed, cs.ConnectionClosed)
    assert (closed.code, closed.hello_refused) == ("wrong_hub", True)
    assert pair.endpoint.calls == []  # nothing was signed


def test_a_refused_login_upload_fails_the_login() -> None:
    pair = Pair()
    pair.refuse_uploads = "bad_prekey"
    pair.connect()
    pair.pump()
    assert [e.code for e in pair.of(cs.LoginFailed) if isinstance(e, cs.LoginFailed)] == [
        "bad_prekey"
    ]
    assert not pair.session.ready and pair.endpoint.uploaded == []


def test_a_stale_endpoint_answer_is_ignored() -> None:
    pair = Pair()
    pair.answer_endpoint = False
    pair.connect()
    need = next(e for e in pair.pump() if isinstance(e, cs.NeedLoginSignature))
    assert isinstance(need, cs.NeedLoginSignature)
    pair.lose()
    pair.connect()  # a new connection, with a new challenge
    pair.pump()
    signature = pair.endpoint.identity.sign(need.challenge)
    assert pair.session.login(need.generation, signature) == []
    assert pair.session.phase is Phase.SIGNING  # still waiting for its own signature
    assert pair.session.data_to_send() == b""


# --- the send window ----------------------------------------------------------


def test_the_window_fills_and_frees_only_when_acks_are_recorded() -> None:
    pair = Pair(send_window=3, auto_ack=False)
    pair.ready()
    s = pair.session
    for _ in range(3):
        assert s.has_room
        data = envelope("alice", "bob")
        assert s.submit(data, mid(data)) == []
    assert not s.has_room and s.in_flight == 3
    pair.pump()
    assert len(pair.sends) == 3
    assert pair.server is not None
    for send in pair.sends:
        pair.server.reply_send_ack(send.request_id, send.message_id, False)
    effects = pair.pump()
    assert kinds(effects) == ["AckResolved"]  # one batch for the three
    resolved = effects[0]
    assert isinstance(resolved, cs.AckResolved)
    assert resolved.window_slots == 3 and len(resolved.message_ids) == 3
    assert not s.has_room  # not yet: the endpoint has not recorded them
    s.acks_recorded(resolved.window_slots)
    assert s.has_room and s.in_flight == 0


def test_a_refused_submission_frees_its_slot_and_is_reported() -> None:
    pair = Pair(auto_ack=False)
    pair.ready()
    data = envelope("alice", "bob")
    pair.session.submit(data, mid(data))
    pair.pump()
    assert pair.server is not None
    pair.server.reply_error(pair.sends[0].request_id, "mailbox_full", "full")
    effects = pair.pump()
    assert effects == [
        cs.Refused("envelope", "mailbox_full", "full", mid(data), "bob", report=True)
    ]
    assert pair.session.in_flight == 0


def test_too_large_a_submission_is_refused_without_counting() -> None:
    pair = Pair()
    pair.ready()
    data = envelope("alice", "bob", size=hp.DEFAULT_MAX_ENVELOPE_BYTES)
    [refused] = pair.session.submit(data, mid(data))
    assert isinstance(refused, cs.Refused) and refused.code == "too_large"
    assert pair.session.in_flight == 0
    with pytest.raises(HubError, match="exceeds"):
        pair.session.send(data, mid(data))


def test_submissions_while_flushing_are_held_and_sent_after_the_outbox() -> None:
    pair = Pair()
    pair.endpoint.outbox = [envelope("alice", "bob")]
    pair.answer_endpoint = False
    pair.connect()
    for step in (cs.NeedLoginSignature, cs.NeedPrekeys):
        pair._effects(pair.answer(next(e for e in pair.pump() if isinstance(e, step))))
    need_outbox = next(e for e in pair.pump() if isinstance(e, cs.NeedOutbox))
    late = envelope("alice", "bob")
    pair.session.submit(late, mid(late))  # after the outbox was asked for
    assert pair.session.in_flight == 1
    pair._effects(pair.answer(need_outbox))
    flushed = next(e for e in pair.pump() if isinstance(e, cs.OutboxFlushed))
    assert pair.hub_frames.count("Send") == 1  # held: not yet on the wire
    pair._effects(pair.answer(flushed))
    pair.pump()
    assert pair.session.ready and pair.hub_frames.count("Send") == 2
    sent = [e.message_id for e in pair.hub_events if isinstance(e, hp.SendRequested)]
    assert sent[-1] == mid(late)


def test_submissions_while_disconnected_are_left_to_the_outbox() -> None:
    pair = Pair()
    data = envelope("alice", "bob")
    assert pair.session.submit(data, mid(data)) == []
    assert pair.session.in_flight == 0


def test_rate_limited_submissions_are_retried_after_a_delay() -> None:
    pair = Pair(auto_ack=False)
    pair.ready()
    data = envelope("alice", "bob")
    pair.session.submit(data, mid(data))
    pair.pump()
    assert pair.server is not None
    pair.server.reply_error(pair.sends.pop().request_id, "rate_limited", "slow down")
    assert pair.pump() == []
    due = pair.session.next_timer()
    assert due is not None and due == pytest.approx(pair.clock.now + 0.15)
    pair.clock.now = due
    pair.session.handle_timer()
    pair.pump()
    assert [s.message_id for s in pair.sends] == [mid(data)]  # sent again
    assert pair.session.in_flight == 1


def test_an_awaited_send_is_retried_until_its_deadline_then_answered() -> None:
    pair = Pair(auto_ack=False)
    pair.ready()
    data = envelope("alice", "bob")
    token = pair.session.send(data, mid(data), deadline=pair.clock.now + 0.1)
    pair.pump()
    assert pair.server is not None
    pair.server.reply_error(pair.sends.pop().request_id, "rate_limited", "slow down")
    assert pair.pump() == []  # the first delay (0.05 s) fits before the deadline
    due = pair.session.next_timer()
    assert due == pytest.approx(pair.clock.now + 0.05)
    pair.clock.now = due
    pair.session.handle_timer()
    pair.pump()
    pair.server.reply_error(pair.sends.pop().request_id, "rate_limited", "slow down")
    [answer] = pair.pump()  # the next delay (0.1 s) does not: the caller gets the refusal
    assert isinstance(answer, cs.Answer) and answer.token == token
    assert isinstance(answer.event, hp.ErrorReceived) and answer.event.code == "rate_limited"
    assert pair.session.outstanding == 0


def test_an_abandoned_send_acked_later_still_leaves_the_outbox() -> None:
    pair = Pair(auto_ack=False)
    pair.ready()
    data = envelope("alice", "bob")
    token = pair.session.send(data, mid(data))
    pair.pump()
    pair.session.abandon(token)  # the caller timed out
    assert pair.server is not None
    send = pair.sends.pop()
    pair.server.reply_send_ack(send.request_id, send.message_id, False)
    assert pair.pump() == [cs.AckResolved((mid(data),), 0)]


# --- receiving ------------------------------------------------------------------


def push(pair: Pair, *items: bytes, seq: int = 1) -> None:
    assert pair.server is not None
    for i, data in enumerate(items):
        pair.server.push(seq + i, mid(data), data)


def test_pushes_are_delivered_once_and_acked_in_one_batch_by_verdict() -> None:
    pair = Pair()
    pair.ready()
    items = [envelope("bob", "alice") for _ in range(5)]
    push(pair, *items)
    push(pair, items[0], seq=9)  # a redelivery while the first is still being handled
    effects = pair.pump()
    assert kinds(effects) == ["DeliverEnvelopes"]
    deliver = effects[0]
    assert isinstance(deliver, cs.DeliverEnvelopes)
    assert [e.message_id for e in deliver.items] == [mid(d) for d in items]
    outcomes: list[object] = [
        DeliveryReport(True),
        DeliveryReport(True, duplicate=True),
        CryptoError("tampered"),
        IdentityChangedError("bob", "old", "new"),
        OSError("disk full"),
    ]
    verdicts = pair.session.envelopes_handled(
        [(mid(d), o) for d, o in zip(items, outcomes, strict=True)]
    )
    assert verdicts == [Verdict.ACK, Verdict.ACK, Verdict.DROP, Verdict.HOLD, Verdict.RETRY]
    pair.pump()
    acks = [e for e in pair.hub_events if isinstance(e, hp.AckReceived)]
    assert len(acks) == 1  # batched into one frame
    assert acks[0].message_ids == tuple(mid(d) for d in items[:3])
    push(pair, items[3], seq=20)  # handled now: a new push of it is delivered again
    assert kinds(pair.pump()) == ["DeliverEnvelopes"]


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (DeliveryReport(True), Verdict.ACK),
        (DeliveryReport(True, duplicate=True), Verdict.ACK),
        (CryptoError("forged"), Verdict.DROP),
        (DecodeError("garbage"), Verdict.DROP),
        (IdentityChangedError("bob", "old", "new"), Verdict.HOLD),
        (RuntimeError("bug"), Verdict.RETRY),
        (OSError("disk"), Verdict.RETRY),
    ],
)
def test_verdict(outcome: object, expected: Verdict) -> None:
    assert cs.verdict(outcome) is expected
    assert expected.acks == (expected in (Verdict.ACK, Verdict.DROP))


def test_acks_wait_for_a_login_and_are_dropped_with_the_connection() -> None:
    pair = Pair()
    pair.ready()
    data = envelope("bob", "alice")
    push(pair, data)
    pair.pump()
    pair.lose()
    pair.session.envelopes_handled([(mid(data), DeliveryReport(True))])
    pair.connect()
    pair.pump()  # the new login: the ack was handled after it began, so it goes out
    assert [e.message_ids for e in pair.hub_events if isinstance(e, hp.AckReceived)] == [
        (mid(data),)
    ]
    push(pair, data, seq=3)
    pair.pump()
    pair.session.envelopes_handled([(mid(data), DeliveryReport(True))])
    pair.lose()  # before it was written: the hub redelivers, nothing is sent
    assert pair.session.data_to_send() == b""


def test_prekeys_low_asks_the_endpoint_and_publish_uploads_only_new_keys() -> None:
    pair = Pair()
    pair.ready()
    assert pair.server is not None
    pair.server.notify_prekeys_low(3)
    assert pair.pump() == [cs.PrekeysLow(3)]
    known = list(pair.endpoint.uploaded)
    pair.endpoint.prekeys.top_up(pair.endpoint.identity, 2_000, pool_size=8)
    fresh = [k for k in pair.endpoint.one_time() if k not in known]
    assert fresh
    before = pair.hub_frames.count("UploadPrekeys")
    effects = pair.session.publish(pair.endpoint.bundle(), known + fresh + fresh)
    assert effects == [cs.PrekeysStored(tuple(known))]
    pair.pump()
    assert pair.hub_frames.count("UploadPrekeys") == before + 1
    uploads = [e for e in pair.hub_events if isinstance(e, hp.PrekeysUploaded)]
    assert list(uploads[-1].encoded) == fresh  # each new key once
    assert pair.session.publish(pair.endpoint.bundle(), fresh) == [cs.PrekeysStored(tuple(fresh))]


def test_a_top_up_racing_the_login_upload_sends_no_key_twice() -> None:
    pair = Pair()
    pair.answer_endpoint = False
    pair.connect()
    pair._effects(pair.answer(next(e for e in pair.pump() if isinstance(e, cs.NeedLoginSignature))))
    need = next(e for e in pair.pump() if isinstance(e, cs.NeedPrekeys))
    keys = pair.endpoint.one_time()
    assert isinstance(need, cs.NeedPrekeys)
    pair.session.upload_prekeys(need.generation, keys)  # in flight
    assert pair.session.publish(pair.endpoint.bundle(), keys) == []  # the same keys again
    pair.pump()
    uploaded = [k for e in pair.hub_events if isinstance(e, hp.PrekeysUploaded) for k in e.encoded]
    assert sorted(uploaded) == sorted(keys)


# --- connection loss, timers, anonymous use -------------------------------------


def test_connection_loss_resets_everything_tied_to_the_connection() -> None:
    pair = Pair(auto_ack=False, send_window=8)
    pair.ready()
    s = pair.session
    for _ in range(4):
        data = envelope("alice", "bob")
        s.submit(data, mid(data))
    pair.pump()
    assert pair.server is not None
    first = pair.sends.pop(0)
    pair.server.reply_send_ack(first.request_id, first.message_id, False)
    resolved = pair.pump()[0]
    assert isinstance(resolved, cs.AckResolved)
    second = pair.sends.pop(0)
    pair.server.reply_error(second.request_id, "rate_limited", "")
    pair.pump()
    token = s.send(envelope("alice", "bob"), b"x" * 16)
    assert s.in_flight == 4 and s.outstanding > 0 and s.next_timer() is not None
    generation = s.generation
    pair.lose()
    # Unanswered and retrying sends are given back (they stay in the outbox); the one
    # acknowledged but not yet recorded still holds its slot until it is recorded.
    assert s.in_flight == 1 and s.outstanding == 0
    assert s.phase is Phase.DISCONNECTED and not s.authenticated
    s.acks_recorded(resolved.window_slots)
    assert s.in_flight == 0
    s.abandon(token)  # harmless after the loss
    pair.sends.clear()
    pair.connect()
    assert s.generation == generation + 1
    pair.pump()
    assert s.ready and s.next_timer() is not None  # only the keepalive now


def test_keepalive_pings_when_silent_and_gives_up_after_three_intervals() -> None:
    pair = Pair(ping_interval=10.0)
    pair.ready()
    s = pair.session
    assert s.next_timer() == pytest.approx(pair.clock.now + 10.0)
    pair.clock.now += 10.0
    assert s.handle_timer() == []
    assert f.FrameDecoder().feed(s.data_to_send())[0].__class__ is f.Ping
    pair.clock.now += 10.0
    s.handle_timer()
    pair.clock.now += 10.0
    [effect] = s.handle_timer()
    assert isinstance(effect, cs.Unresponsive) and effect.silent == pytest.approx(30.0)
    assert s.next_timer() is None


def test_an_anonymous_session_asks_directory_questions_only() -> None:
    clock = Clock()
    session = ClientSession(dialled_address=HUB, clock=clock)
    server = hp.ServerConnection(nonce=os.urandom(32), hub_address=HUB)
    session.connected()
    effects = session.receive_data(server.data_to_send())
    assert kinds(effects) == ["Greeted", "SessionReady"]
    with pytest.raises(LocalProtocolError):
        session.fetch_bundle("bob")
    token = session.list_agents()
    [asked] = server.receive_data(session.data_to_send())
    assert isinstance(asked, hp.AgentsRequested)
    server.reply_agents(asked.request_id, ["bob"])
    [answer] = session.receive_data(server.data_to_send())
    assert isinstance(answer, cs.Answer) and answer.token == token
    assert isinstance(answer.event, hp.AgentsReceived) and answer.event.agent_ids == ("bob",)


def test_an_unsolicited_error_is_reported_not_raised() -> None:
    pair = Pair()
    pair.ready()
    assert pair.server is not None
    pair.server.reply_error(999, "internal", "busy")
    assert pair.pump() == [cs.Refused("unsolicited", "internal", "busy")]


def test_backoff_and_chunks() -> None:
    delays = cs.backoff(0.1, 1.0, rng=lambda: 0.5)
    assert [round(next(delays), 3) for _ in range(5)] == [0.05, 0.1, 0.2, 0.4, 0.5]
    keys = [bytes(100) for _ in range(600)]
    chunks = cs.chunk_prekeys(keys, 1 << 20)
    assert [len(c) for c in chunks] == [256, 256, 88]


# --- a state machine over random interleavings ----------------------------------


class WindowMachine(RuleBasedStateMachine):
    """Submissions, answers, recordings and connection losses in any order: the window
    count always equals what the model says is unresolved, never exceeds the window,
    and every submission ends acknowledged, refused or given back to the outbox."""

    WINDOW = 4

    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(auto_ack=False, send_window=self.WINDOW)
        self.pair.ready()
        self.unrecorded: list[cs.AckResolved] = []
        self.sent_ids: set[bytes] = set()
        self.acked: list[bytes] = []
        self.given_back = 0
        self.refused = 0
        self.retrying = 0

    def _collect(self) -> None:
        for effect in self.pair.pump():
            if isinstance(effect, cs.AckResolved):
                self.unrecorded.append(effect)
                self.acked += effect.message_ids
            elif isinstance(effect, cs.Refused):
                self.refused += 1

    @precondition(lambda self: self.pair.session.has_room)
    @rule()
    def submit(self) -> None:
        data = envelope("alice", "bob")
        self.sent_ids.add(mid(data))
        self.pair.session.submit(data, mid(data))
        self._collect()

    @precondition(lambda self: bool(self.pair.sends))
    @rule(answer=st.sampled_from(["ack", "mailbox_full", "rate_limited"]), index=st.integers(0, 3))
    def hub_answers(self, answer: str, index: int) -> None:
        send = self.pair.sends.pop(index % len(self.pair.sends))
        assert self.pair.server is not None
        if answer == "ack":
            self.pair.server.reply_send_ack(send.request_id, send.message_id, False)
        else:
            self.pair.server.reply_error(send.request_id, answer, "")
            self.retrying += answer == "rate_limited"
        self._collect()

    @precondition(lambda self: self.retrying > 0)
    @rule()
    def retry_timer_fires(self) -> None:
        self.pair.clock.now += 1.0  # past every retry delay (at most 0.25 s)
        assert self.pair.session.handle_timer() == []
        self.retrying = 0
        self._collect()

    @precondition(lambda self: bool(self.unrecorded))
    @rule()
    def endpoint_records(self) -> None:
        self.pair.session.acks_recorded(self.unrecorded.pop(0).window_slots)

    @rule()
    def connection_drops_and_comes_back(self) -> None:
        self.given_back += len(self.pair.sends) + self.retrying
        self.pair.sends.clear()
        self.retrying = 0
        self.pair.lose()
        self.pair.connect()
        self._collect()
        assert self.pair.session.ready

    @invariant()
    def window_is_the_unresolved_count(self) -> None:
        s = self.pair.session
        unrecorded = sum(e.window_slots for e in self.unrecorded)
        assert s.in_flight == len(self.pair.sends) + unrecorded + self.retrying
        assert 0 <= s.in_flight <= self.WINDOW

    @invariant()
    def every_submission_is_accounted_for(self) -> None:
        assert len(self.acked) == len(set(self.acked))  # never acknowledged twice
        resolved = len(self.acked) + self.refused + self.given_back
        assert resolved + len(self.pair.sends) + self.retrying == len(self.sent_ids)


TestWindowMachine = WindowMachine.TestCase
TestWindowMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
