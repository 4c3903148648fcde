"""A message larger than the hub accepts is refused up front, and poisons nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hubproc import HubProcess, wait_until

from agentmesh import Agent, LocalHub, MessageTooLargeError
from agentmesh.crypto.session import SessionRecord

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("sign", [True, False])
def test_predicted_envelope_size_is_exact(agents, sign: bool) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub, sign_messages=sign)
    agents("bob", hub=hub, sign_messages=sign)
    alice.connect("bob")
    for reply in (False, True, False):
        record = alice._core.record("bob")
        assert isinstance(record, SessionRecord) and record.active is not None
        session = record.active.copy()
        payload = os.urandom(123)
        predicted = session.envelope_size(len(payload), reply=reply)
        envelope = session.encrypt(
            alice._core.identity,
            payload,
            message_id=os.urandom(16),
            timestamp_ms=1,
            in_reply_to=os.urandom(16) if reply else None,
        )
        assert predicted == len(envelope.to_bytes())
        alice.send("bob", text="advance")  # the next round: a normal (non-prekey) envelope


def test_oversize_is_refused_before_anything_is_committed(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", "--max-envelope-bytes", "4096", graceful_stop=True).start()
    client_a, client_b = hub.client(request_timeout=10.0), hub.client(request_timeout=10.0)
    got: list[str] = []
    alice = Agent("alice", hub=client_a, keypair_path=tmp_path / "alice.json")
    bob = Agent("bob", hub=client_b)
    bob.on_message(lambda m: got.append(m.text))
    try:
        alice.send("bob", text="small first")
        with pytest.raises(MessageTooLargeError) as caught:
            alice.send("bob", text="x" * 5000)
        err = caught.value
        assert isinstance(err, ValueError) and err.limit == 4096 and err.size > 5000
        assert str(err.size) in str(err) and "4096" in str(err)
        with pytest.raises(MessageTooLargeError):
            alice.send("bob", text="y" * 5000, wait=False)
        assert alice.status()["outbox"] == 0
        assert alice.flush(10) is True
        alice.send("bob", text="small after")
        wait_until(lambda: len(got) == 2, 30, "the two small messages")
        assert got == ["small first", "small after"]
    finally:
        alice.close()
        bob.close()
        client_a.close()
        client_b.close()
        hub.stop()
