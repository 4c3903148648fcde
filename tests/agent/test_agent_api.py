"""The version 1 surface of Agent, Message and LocalHub (docs: /work/shared/seed-api.md)."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import re
import time

import pytest
from agent_helpers import RecordingHub
from agentkit import Inbox
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agentmesh import (
    Agent,
    AuthenticationError,
    CryptoError,
    LocalHub,
    Message,
    ReplayError,
)
from agentmesh.wire.envelope import decode_envelope

FINGERPRINT_RE = re.compile(r"^[0-9a-f]{4}(:[0-9a-f]{4}){7}$")


def expected_fingerprint(ed25519_public_raw: bytes) -> str:
    digest = hashlib.sha256(ed25519_public_raw).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


def identity_public_raw(agent: Agent) -> bytes:
    return base64.urlsafe_b64decode(agent.public_bundle["identity_public"])


def stable_status(agent: Agent) -> dict[str, object]:
    """status() minus nothing: every key must be unchanged by a rejected envelope."""
    return dict(agent.status())


# --------------------------------------------------------------------------- constructor


def test_constructor_signature_and_defaults() -> None:
    params = list(inspect.signature(Agent.__init__).parameters.values())
    names = [p.name for p in params[1:5]]
    assert names == ["agent_id", "hub", "keypair_path", "log_level"]
    for param in params[1:5]:
        assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    defaults = {p.name: p.default for p in params[2:5]}
    assert defaults == {"hub": None, "keypair_path": None, "log_level": logging.WARNING}
    # Everything added after version 1 is keyword-only, so positional calls keep working.
    for param in params[5:]:
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, param.name


def test_positional_arguments_like_version_1(make_agent, hub, keydir) -> None:
    agent = make_agent("alice", hub, keydir / "alice.json", logging.DEBUG)
    assert agent.agent_id == "alice"
    assert agent.hub is hub
    assert (keydir / "alice.json").exists()
    assert "alice" in hub.list_agents()


def test_agent_without_hub(make_agent) -> None:
    agent = make_agent("solo")
    assert agent.hub is None
    assert agent.status()["agent_id"] == "solo"
    with pytest.raises(RuntimeError, match="No hub configured"):
        agent.send("bob", "hi")
    with pytest.raises(RuntimeError, match="No hub configured"):
        agent.send_payload("bob", {"type": "message"})


def test_two_agents_have_distinct_identities(make_agent, hub) -> None:
    a = make_agent("alice", hub=hub)
    b = make_agent("bob", hub=hub)
    assert a.fingerprint != b.fingerprint


# --------------------------------------------------------------------------- key files


def test_keypair_path_created_then_reloaded(tmp_path) -> None:
    path = tmp_path / "sub" / "alice.json"
    first = Agent("alice", keypair_path=path)
    fingerprint = first.fingerprint
    bundle_key = first.public_bundle["identity_public"]
    first.close()
    assert path.exists()
    doc = json.loads(path.read_text())
    assert set(doc) == {"identity_private", "exchange_private"}

    second = Agent("alice", keypair_path=path)
    try:
        assert second.fingerprint == fingerprint
        assert second.public_bundle["identity_public"] == bundle_key
    finally:
        second.close()


def test_version_1_key_file_loads(tmp_path, make_agent) -> None:
    identity = Ed25519PrivateKey.generate()
    exchange = X25519PrivateKey.generate()
    doc = {
        "identity_private": base64.urlsafe_b64encode(identity.private_bytes_raw()).decode(),
        "exchange_private": base64.urlsafe_b64encode(exchange.private_bytes_raw()).decode(),
    }
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)

    agent = make_agent("legacy", keypair_path=path)
    public_raw = identity.public_key().public_bytes_raw()
    assert agent.fingerprint == expected_fingerprint(public_raw)
    assert identity_public_raw(agent) == public_raw
    assert base64.urlsafe_b64decode(agent.public_bundle["exchange_public"]) == (
        exchange.public_key().public_bytes_raw()
    )
    # The file is the same identity afterwards (still a loadable version 1 file).
    assert json.loads(path.read_text()) == doc


# --------------------------------------------------------------------------- send


def test_send_payload_shape(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)

    alice.send("bob", "hello")
    alice.send("bob", "typed", type="task", priority=3, tags=["x", "y"], nested={"k": None})
    alice.send("bob")

    assert [m.payload for m in inbox] == [
        {"type": "message", "text": "hello"},
        {"type": "task", "text": "typed", "priority": 3, "tags": ["x", "y"], "nested": {"k": None}},
        {"type": "message", "text": ""},
    ]
    assert [m.type for m in inbox] == ["message", "task", "message"]
    assert [m.text for m in inbox] == ["hello", "typed", ""]


def test_send_payload_low_level(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)

    alice.send_payload("bob", {"type": "result", "text": "42", "value": 42})
    alice.send_payload("bob", {"value": [1, 2, 3]})

    assert inbox[0].payload == {"type": "result", "text": "42", "value": 42}
    assert (inbox[0].type, inbox[0].text) == ("result", "42")
    assert inbox[1].payload == {"value": [1, 2, 3]}
    assert (inbox[1].type, inbox[1].text) == ("message", "")  # the defaults


def test_message_fields(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)

    before = int(time.time() * 1000)
    alice.send("bob", "hi", type="greeting", mood="ok")
    after = int(time.time() * 1000)

    [msg] = inbox
    assert isinstance(msg, Message)
    assert msg.sender == "alice"
    assert msg.recipient == "bob"
    assert msg.text == "hi"
    assert msg.type == "greeting"
    assert msg.payload == {"type": "greeting", "text": "hi", "mood": "ok"}
    assert isinstance(msg.timestamp, int) and not isinstance(msg.timestamp, bool)
    assert before <= msg.timestamp <= after  # milliseconds since the epoch


def test_delivery_is_synchronous_and_bidirectional(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    got_bob, got_alice = Inbox(), Inbox()
    bob.on_message(got_bob)
    alice.on_message(got_alice)

    for i in range(5):
        alice.send("bob", f"a{i}")
        assert got_bob.texts[-1] == f"a{i}"  # handlers ran before send returned
        bob.send("alice", f"b{i}")
        assert got_alice.texts[-1] == f"b{i}"
    assert hub.queued_count() == 0


def test_reply_from_inside_a_handler(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    got = Inbox()
    alice.on_message(got)

    @bob.on_message
    def echo(msg: Message) -> None:
        bob.send(msg.sender, "echo: " + msg.text)

    alice.send("bob", "ping")
    assert got.texts == ["echo: ping"]


# --------------------------------------------------------------------------- handlers


def test_on_message_decorator_and_plain_call_in_order(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    calls: list[str] = []

    @bob.on_message
    def first(msg: Message) -> None:
        calls.append("first:" + msg.text)

    assert callable(first)  # the decorator returns the function
    returned = bob.on_message(lambda m: calls.append("second:" + m.text))
    assert callable(returned)

    @bob.on_message
    def third(msg: Message) -> None:
        calls.append("third:" + msg.text)

    assert bob.status()["handlers"] == 3
    alice.send("bob", "x")
    assert calls == ["first:x", "second:x", "third:x"]


def test_raising_handler_is_logged_and_others_run(make_agent, hub, caplog) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    calls: list[str] = []

    @bob.on_message
    def before(msg: Message) -> None:
        calls.append("before")

    @bob.on_message
    def boom(msg: Message) -> None:
        raise RuntimeError("handler exploded")

    @bob.on_message
    def after(msg: Message) -> None:
        calls.append("after")

    with caplog.at_level(logging.ERROR):
        alice.send("bob", "x")  # does not raise in the sender
    assert calls == ["before", "after"]
    records = [r for r in caplog.records if r.exc_info and "handler exploded" in str(r.exc_info[1])]
    assert records, caplog.text

    alice.send("bob", "y")  # and delivery goes on
    assert calls == ["before", "after", "before", "after"]


def test_on_message_rejects_non_callable(make_agent) -> None:
    agent = make_agent("alice")
    with pytest.raises(TypeError):
        agent.on_message("not callable")  # type: ignore[arg-type]


def test_messages_before_first_handler_are_kept(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    alice.send("bob", "early 1")
    alice.send("bob", "early 2")
    inbox = Inbox()
    bob.on_message(inbox)
    assert inbox.texts == ["early 1", "early 2"]
    alice.send("bob", "late")
    assert inbox.texts == ["early 1", "early 2", "late"]


# --------------------------------------------------------------------------- sessions


def test_connect_sets_up_a_session(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    assert alice.status()["active_sessions"] == []
    alice.connect("bob")
    assert alice.status()["active_sessions"] == ["bob"]
    assert "bob" in alice.status()["known_peers"]
    inbox = Inbox()
    bob.on_message(inbox)
    alice.send("bob", "after connect")
    assert inbox.texts == ["after connect"]
    assert bob.status()["active_sessions"] == ["alice"]


def test_connect_unknown_peer(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    with pytest.raises(ValueError, match=r"^Peer 'ghost' not found on hub$"):
        alice.connect("ghost")


def test_connect_without_hub(make_agent) -> None:
    with pytest.raises(RuntimeError, match="No hub configured"):
        make_agent("alice").connect("bob")


class CountingHub(RecordingHub):
    def __init__(self) -> None:
        super().__init__()
        self.fetches: list[str] = []

    def fetch_prekey_bundle(self, agent_id: str) -> bytes:
        self.fetches.append(agent_id)
        return super().fetch_prekey_bundle(agent_id)


def test_connect_with_bundle_peer_to_peer(make_agent) -> None:
    hub = CountingHub()
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)

    handed_over = json.loads(json.dumps(bob.public_bundle))  # e.g. pasted as JSON
    alice.connect_with_bundle(handed_over)
    assert alice.status()["active_sessions"] == ["bob"]
    assert alice.status()["known_peers"] == ["bob"]

    alice.send("bob", "p2p")
    assert hub.fetches == []  # the session came from the bundle, not the hub
    assert inbox.texts == ["p2p"]
    assert inbox[0].sender == "alice"


def test_connect_with_bundle_without_a_hub(make_agent) -> None:
    alice = make_agent("alice")
    bob = make_agent("bob")
    alice.connect_with_bundle(bob.public_bundle)
    assert alice.status()["active_sessions"] == ["bob"]
    with pytest.raises(RuntimeError, match="No hub configured"):
        alice.send("bob", "x")


def test_connect_with_bundle_rejects_a_forged_bundle(make_agent) -> None:
    alice = make_agent("alice")
    bundle = dict(make_agent("bob").public_bundle)
    blob = bytearray(base64.urlsafe_b64decode(bundle["bundle"]))
    blob[-10] ^= 0x01  # inside the last signature: the bundle no longer verifies
    bundle["bundle"] = base64.urlsafe_b64encode(bytes(blob)).decode()
    with pytest.raises(CryptoError):
        alice.connect_with_bundle(bundle)
    assert alice.status()["active_sessions"] == []
    assert alice.status()["known_peers"] == []


@pytest.mark.parametrize("field", ["identity_public", "fingerprint", "agent_id"])
def test_connect_with_bundle_rejects_inconsistent_fields(make_agent, field) -> None:
    """What a user checks (the fingerprint, the id) must be what the session uses."""
    alice = make_agent("alice")
    bundle = dict(make_agent("bob").public_bundle)
    mallory = make_agent("mallory").public_bundle
    bundle["bundle"] = mallory["bundle"]  # the keys actually used are mallory's...
    if field != "agent_id":
        # ...while the fields shown to the user are bob's, except the one under test.
        bundle[field] = mallory[field]
        bundle["agent_id"] = "mallory"
    with pytest.raises(CryptoError):
        alice.connect_with_bundle(bundle)
    assert alice.status()["active_sessions"] == []


def test_list_peers_excludes_self(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    assert alice.list_peers() == []
    make_agent("bob", hub=hub)
    make_agent("carol", hub=hub)
    assert sorted(alice.list_peers()) == ["bob", "carol"]
    assert "alice" not in alice.list_peers()


# --------------------------------------------------------------------------- status, identity


def test_status_keys(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    bob.on_message(lambda m: None)
    alice.send("bob", "x")

    status = alice.status()
    assert {"agent_id", "fingerprint", "active_sessions", "known_peers", "handlers"} <= set(status)
    assert status["agent_id"] == "alice"
    assert status["fingerprint"] == alice.fingerprint
    assert status["active_sessions"] == ["bob"]
    assert status["known_peers"] == ["bob"]
    assert status["handlers"] == 0
    assert bob.status()["handlers"] == 1
    json.dumps(status)  # printable / loggable


def test_fingerprint_format(make_agent) -> None:
    agent = make_agent("alice")
    assert FINGERPRINT_RE.match(agent.fingerprint), agent.fingerprint
    assert len(agent.fingerprint.split(":")) == 8
    assert agent.fingerprint == expected_fingerprint(identity_public_raw(agent))
    assert agent.keypair.fingerprint == agent.fingerprint


def test_public_bundle_json_safe(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bundle = alice.public_bundle
    assert bundle["agent_id"] == "alice"
    assert json.loads(json.dumps(bundle)) == bundle
    assert "identity_private" not in json.dumps(bundle)
    assert "exchange_private" not in json.dumps(bundle)


# --------------------------------------------------------------------------- LocalHub


def test_local_hub_basics(make_agent) -> None:
    hub = LocalHub()
    assert hub.list_agents() == []
    assert hub.queued_count() == 0
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    assert sorted(hub.list_agents()) == ["alice", "bob"]

    bundle = hub.get_bundle("bob")
    assert bundle["agent_id"] == "bob"
    assert bundle["identity_public"] == bob.public_bundle["identity_public"]
    json.dumps(bundle)
    with pytest.raises(ValueError, match=r"^Peer 'ghost' not found on hub$"):
        hub.get_bundle("ghost")

    # bob is registered: the message goes straight into his inbox.
    alice.send("bob", "1")
    assert hub.queued_count() == 0
    bob.close()
    alice.send("bob", "2")
    assert hub.queued_count() == 1  # queued for the closed bob
    hub.close()


def test_register_is_automatic_and_explicit_register_is_idempotent(make_agent) -> None:
    hub = LocalHub()
    alice = make_agent("alice", hub=hub)
    hub.register(alice)
    hub.register(alice)
    assert hub.list_agents() == ["alice"]
    bob = make_agent("bob")  # no hub
    hub.register(bob)
    assert sorted(hub.list_agents()) == ["alice", "bob"]


def test_hub_deliver_envelope_explicitly(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)
    hub.hold = True
    alice.send("bob", "held")
    assert inbox == []
    hub.hold = False
    LocalHub.deliver(hub, hub.envelopes[-1])
    assert inbox.texts == ["held"]


def test_send_to_unknown_peer(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    with pytest.raises(ValueError, match=r"^Peer 'xxx' not found on hub$"):
        alice.send("xxx", "hello")
    assert alice.status()["active_sessions"] == []
    assert alice.status()["outbox"] == 0


def test_send_to_self_is_refused(make_agent, hub) -> None:
    alice = make_agent("alice", hub=hub)
    with pytest.raises(ValueError):
        alice.send("alice", "me")


# --------------------------------------------------------------------------- replay / tamper


def _conversation(make_agent, hub):
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)
    alice_inbox = Inbox()
    alice.on_message(alice_inbox)
    return alice, bob, inbox, alice_inbox


@pytest.mark.parametrize("which", ["first (prekey) message", "later message"])
def test_replay_through_hub_is_rejected(make_agent, hub, which) -> None:
    alice, bob, inbox, alice_inbox = _conversation(make_agent, hub)
    alice.send("bob", "one")
    bob.send("alice", "reply")
    alice.send("bob", "two")
    to_bob = hub.to("bob")
    assert len(to_bob) == 2
    envelope = to_bob[0] if which.startswith("first") else to_bob[1]
    before = stable_status(bob)

    with pytest.raises(CryptoError, match="Replay attack detected") as info:
        LocalHub.deliver(hub, envelope)
    assert isinstance(info.value, ReplayError)
    assert str(info.value).startswith("Replay attack detected")

    assert inbox.texts == ["one", "two"]  # no second delivery
    assert stable_status(bob) == before
    assert hub.queued_count() == 0
    # The conversation continues in both directions.
    alice.send("bob", "three")
    bob.send("alice", "reply 2")
    assert inbox.texts == ["one", "two", "three"]
    assert alice_inbox.texts == ["reply", "reply 2"]


def test_replay_directly_to_receive_envelope_is_a_duplicate(make_agent, hub) -> None:
    alice, bob, inbox, _ = _conversation(make_agent, hub)
    alice.send("bob", "one")
    report = bob.endpoint.receive_envelope(hub.envelopes[0])
    assert report.accepted and report.duplicate
    bob.endpoint.dispatch_pending()
    assert inbox.texts == ["one"]


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("first", [True, False], ids=["prekey-message", "normal-message"])
@pytest.mark.parametrize("where", ["tag", "ciphertext", "timestamp", "message_id"])
def test_tampered_envelope_is_rejected(make_agent, hub, first, where) -> None:
    alice, bob, inbox, alice_inbox = _conversation(make_agent, hub)
    if not first:
        alice.send("bob", "warm-up")
        bob.send("alice", "ack")
    hub.hold = True
    alice.send("bob", "secret")
    hub.hold = False
    original = hub.envelopes[-1]
    parsed = decode_envelope(original)
    assert parsed.recipient == "bob"
    index = {
        "tag": len(original) - 1,
        "ciphertext": len(original) - 20,
        "timestamp": 2 + 16 + 7,  # low byte of the u64 after version, kind, message id
        "message_id": 2,
    }[where]
    tampered = _flip(original, index)
    before = stable_status(bob)
    before_texts = list(inbox.texts)

    with pytest.raises(CryptoError) as info:
        LocalHub.deliver(hub, tampered)
    assert isinstance(info.value, AuthenticationError)
    assert str(info.value).startswith("Authentication tag mismatch")
    assert stable_status(bob) == before
    assert inbox.texts == before_texts

    # The untouched envelope still goes through, and so does everything after it.
    LocalHub.deliver(hub, original)
    assert inbox.texts == [*before_texts, "secret"]
    alice.send("bob", "next")
    bob.send("alice", "bye")
    assert inbox.texts[-1] == "next"
    assert alice_inbox.texts[-1] == "bye"


def test_envelope_for_someone_else_is_rejected(make_agent, hub) -> None:
    alice, _bob, _inbox, _ = _conversation(make_agent, hub)
    carol = make_agent("carol", hub=hub)
    alice.send("bob", "for bob")
    before = stable_status(carol)
    with pytest.raises(CryptoError):
        carol.endpoint.receive_envelope(hub.envelopes[0])
    assert stable_status(carol) == before


def test_close_is_idempotent_and_context_manager(hub, tmp_path) -> None:
    with Agent("alice", hub=hub, keypair_path=tmp_path / "a.json") as alice:
        assert alice.agent_id == "alice"
    alice.close()
    # The identity is free again.
    Agent("alice", hub=hub, keypair_path=tmp_path / "a.json").close()


def test_sign_login_refuses_bytes_that_are_not_a_login_challenge():
    """The login-signing callback cannot be abused as a general signing oracle."""
    import pytest

    from agentmesh import Agent
    from agentmesh.errors import LocalProtocolError
    from agentmesh.protocol.hub_protocol import LOGIN_CONTEXT

    agent = Agent("signer")
    with pytest.raises(LocalProtocolError):
        agent.endpoint.sign_login(b"pay mallory 100 coins")
    assert len(agent.endpoint.sign_login(LOGIN_CONTEXT + bytes(32))) == 64


def test_small_order_ed25519_identity_keys_are_rejected():
    """An identity built on a small-order Ed25519 point never verifies."""
    import pytest

    from agentmesh.crypto import primitives
    from agentmesh.errors import InvalidKeyError

    for weak in (bytes(32), b"\x01" + bytes(31), bytes.fromhex("ec" + "ff" * 30 + "7f")):
        with pytest.raises(InvalidKeyError):
            primitives.ed25519_public_from_bytes(weak)
