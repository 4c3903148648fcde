"""``send(wait=False)`` over a real hub subprocess: order, flush, outages, refusals.

Waits are bounded polls; nothing asserts a timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from agentkit import Inbox, alice_and_bob
from hubproc import HubProcess, wait_until

from agentmesh import Agent

pytestmark = pytest.mark.timeout(120)


def test_pipelined_sends_arrive_in_call_order_with_waited_ones(
    hub_process: HubProcess, tmp_path: Path
) -> None:
    with hub_process.client() as client:
        alice, bob, inbox = alice_and_bob(client, tmp_path)
        expected = []
        for i in range(300):
            text = f"m{i}"
            expected.append(text)
            alice.send("bob", text, wait=(i % 50 == 49))  # every 50th waits for its ack
        assert alice.flush(60)
        assert alice.status()["outbox"] == 0  # every ack was recorded
        wait_until(lambda: len(inbox) == 300, 60)
        assert inbox.texts == expected
        wait_until(lambda: client.queued_count() == 0)
        alice.close()
        bob.close()


def test_a_small_window_blocks_instead_of_dropping(hub_process: HubProcess, tmp_path: Path) -> None:
    with hub_process.client(send_window=2) as client:
        alice, bob, inbox = alice_and_bob(client, tmp_path)
        for i in range(40):
            alice.send("bob", f"w{i}", wait=False)
        assert alice.flush(60)
        wait_until(lambda: len(inbox) == 40, 60)
        assert inbox.texts == [f"w{i}" for i in range(40)]
        alice.close()
        bob.close()


def test_pipelined_sends_while_the_hub_is_down_wait_in_the_outbox(
    hub_process: HubProcess, tmp_path: Path
) -> None:
    with hub_process.client() as client:
        alice, bob, inbox = alice_and_bob(client, tmp_path)
        alice.send("bob", "before")
        wait_until(lambda: inbox.texts == ["before"])
        hub_process.kill()
        for i in range(5):
            alice.send("bob", f"down-{i}", wait=False)  # returns: committed to the outbox
        assert not alice.flush(0.3)  # nobody can acknowledge them now
        assert alice.status()["outbox"] == 5
        hub_process.start()
        assert alice.flush(60)
        wait_until(lambda: len(inbox) == 6, 60)
        assert inbox.texts == ["before"] + [f"down-{i}" for i in range(5)]
        alice.close()
        bob.close()


def test_a_refused_pipelined_send_stays_in_the_outbox_until_the_next_login(
    tmp_path: Path,
) -> None:
    hub = HubProcess(tmp_path, "--mailbox-max-messages", "2").start()
    try:
        with hub.client() as client:
            alice = Agent("alice", hub=client, keypair_path=tmp_path / "alice.json")
            Agent("bob", hub=client, keypair_path=tmp_path / "bob.json").close()  # offline
            for i in range(3):
                alice.send("bob", f"q{i}", wait=False)
            assert not alice.flush(1.0)  # the third one was refused: mailbox_full
            assert alice.status()["outbox"] == 1
            bob = Agent("bob", hub=client, keypair_path=tmp_path / "bob.json")
            inbox = Inbox()
            bob.on_message(inbox)
            wait_until(lambda: inbox.texts == ["q0", "q1"])
            client.register(alice)  # a login re-sends the outbox
            assert alice.flush(30)
            wait_until(lambda: inbox.texts == ["q0", "q1", "q2"])
            alice.close()
            bob.close()
    finally:
        hub.stop()
