"""LocalHub keeps version 1's meanings (issue 12): ``message_count()`` counts messages
routed, ``queued_count()`` is the queue depth, and a recipient's trouble with a message
is never raised to the sender's ``send``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from agentkit import Inbox

from agentmesh import Agent, LocalHub
from agentmesh.errors import CryptoError
from agentmesh.state import state_path_for


def test_message_count_is_messages_routed_and_queued_count_the_depth(keydir: Path) -> None:
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    alice.send("bob", text="one")
    alice.send("bob", text="two")
    assert [m.text for m in inbox] == ["one", "two"]
    assert hub.message_count() == 2  # routed, although nothing is queued any more
    assert hub.queued_count() == 0
    bob.close()
    alice.send("bob", text="three")
    assert (hub.message_count(), hub.queued_count()) == (3, 1)
    alice.close()


class CopyingHub(LocalHub):
    """A LocalHub that keeps a copy of every envelope an agent routes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.routed: list[bytes] = []

    def route(self, envelope: bytes) -> None:
        self.routed.append(bytes(envelope))
        super().route(envelope)


def test_a_recipient_that_cannot_decrypt_does_not_fail_the_sender(keydir: Path) -> None:
    """Bob loses his state file (sessions gone, same key): alice's next message, sealed
    for the old session, is undecryptable for bob. That is bob's problem: alice's
    ``send`` returns (before issue 12 it raised bob's CryptoError)."""
    hub = CopyingHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    alice.send("bob", text="hello")
    bob.close()
    state_path_for(keydir / "bob.json").unlink()
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    bob.on_message(inbox)
    alice.send("bob", text="sealed for a session bob forgot")  # does not raise
    assert [m.text for m in inbox] == ["hello"]
    assert hub.queued_count() == 0  # refused by bob: dropped, not held in front of later mail
    # Code that plays the network still gets the recipient's verdict, as in version 1.
    with pytest.raises(CryptoError):
        hub.deliver(hub.routed[-1])
    alice.close()
    bob.close()


def test_a_version_1_coordinator_and_workers_script_runs_unmodified(tmp_path: Path) -> None:
    script = Path(__file__).parent / "scripts" / "v1_coordinator_workers.py"
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[worker-0] completed: task 0",
        "[worker-1] completed: task 1",
        "[worker-2] completed: task 2",
        "6 messages routed",
    ]
    assert "Traceback" not in result.stderr


class _SyncCounter:
    """Wraps a LocalHub's store: which enqueues waited for the disk, and the syncs."""

    def __init__(self, hub: LocalHub) -> None:
        self.store = hub._store
        self.durable: list[bool] = []
        self.syncs = 0
        real_enqueue, real_sync = self.store.enqueue, self.store.sync

        def enqueue(*args: object, **kwargs: object) -> object:
            self.durable.append(bool(kwargs.get("durable", True)))
            return real_enqueue(*args, **kwargs)  # type: ignore[arg-type]

        def sync() -> None:
            self.syncs += 1
            real_sync()

        self.store.enqueue = enqueue  # type: ignore[method-assign]
        self.store.sync = sync  # type: ignore[method-assign]


def test_a_durable_localhub_fsyncs_only_mail_that_waits(keydir: Path, tmp_path: Path) -> None:
    """LocalHub(db=...): mail its recipient can take at once is handed over without
    being stored (the recipient's own commit is durable before send() returns, and the
    sender's outbox holds it until then); mail stored for an online recipient commits
    without an fsync, synced only if it is not taken; mail that waits, for an offline
    recipient or held back, is durable before send() returns."""
    hub = LocalHub(db=str(tmp_path / "hub.sqlite"))
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    counter = _SyncCounter(hub)
    for text in ("one", "two", "three"):
        alice.send("bob", text=text)
    assert [m.text for m in inbox] == ["one", "two", "three"]
    assert counter.durable == [] and counter.syncs == 0  # never stored
    bob.close()
    alice.send("bob", text="offline")  # waits in the hub: durable at once
    assert counter.durable[-1] is True and hub.queued_count() == 1
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    bob.on_message(inbox)
    assert inbox[-1].text == "offline" and hub.queued_count() == 0
    hub._hand_over_directly = lambda envelope, data: False  # type: ignore[method-assign]
    hub._drain = lambda agent_id, stored=None: None  # type: ignore[method-assign]
    alice.send("bob", text="not taken")  # online, but not handed over: synced
    assert counter.durable[-1] is False and counter.syncs == 1
    alice.close()
    bob.close()
    hub.close()
    reopened = LocalHub(db=str(tmp_path / "hub.sqlite"))
    assert reopened.queued_count() == 1  # "not taken" is still queued
    reopened.close()


def test_mail_a_recipient_fails_to_take_at_once_is_kept(keydir: Path, tmp_path: Path) -> None:
    """A recipient whose commit fails (its disk, say) during a direct hand-over: the
    sender sees the error, the hub has stored the envelope durably, and the recipient
    gets it once it can take it, exactly once."""
    hub = LocalHub(db=str(tmp_path / "hub.sqlite"))
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    alice.send("bob", text="one")
    counter = _SyncCounter(hub)
    real = bob._state.commit_received_batch

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    bob._state.commit_received_batch = failing  # type: ignore[method-assign]
    with pytest.raises(OSError, match="No space left"):
        alice.send("bob", text="two")
    assert counter.durable == [True] and hub.queued_count() == 1
    bob._state.commit_received_batch = real  # type: ignore[method-assign]
    alice.send("bob", text="three")  # the queue is not empty: stored, drained in order
    assert [m.text for m in inbox] == ["one", "two", "three"] and hub.queued_count() == 0
    alice.close()
    bob.close()
    hub.close()


class _ReceiptRecorder:
    """Wraps an agent's state: the ``durable`` of each receipt commit, and the syncs."""

    def __init__(self, agent: Agent) -> None:
        self.durable: list[bool] = []
        self.syncs = 0
        state = agent._state
        real_commit, real_sync = state.commit_received_batch, state.sync

        def commit(*args: object, **kwargs: object) -> None:
            self.durable.append(bool(kwargs.get("durable", True)))
            real_commit(*args, **kwargs)  # type: ignore[arg-type]

        def sync() -> None:
            self.syncs += 1
            real_sync()

        state.commit_received_batch = commit  # type: ignore[method-assign]
        state.sync = sync  # type: ignore[method-assign]


def test_receipts_whose_handlers_ran_commit_without_an_fsync(keydir: Path) -> None:
    """With LocalHub the recipient's handlers run before send() returns, so its commit
    does not wait for the disk (Agent._receive_and_handle), except for the first
    message of a session and every 64th; a message its handlers could not take yet
    is synced before send() returns."""
    from agentmesh.agent import _RELAXED_RECEIPTS_MAX

    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    receipts = _ReceiptRecorder(bob)
    alice.send("bob", text="hello")  # starts the session: durable
    for i in range(_RELAXED_RECEIPTS_MAX):
        alice.send("bob", text=f"n{i}")
    assert len(inbox) == _RELAXED_RECEIPTS_MAX + 1
    # relaxed, but for the session's start and the 64th in a row (bounds a rollback)
    assert receipts.durable == [True] + [False] * (_RELAXED_RECEIPTS_MAX - 1) + [True]
    assert receipts.syncs == 0
    bob._handlers.clear()  # nobody to handle the next one now: synced before send returns
    alice.send("bob", text="waits")
    assert receipts.durable[-1] is False and receipts.syncs == 1
    assert bob.next_message(timeout=5).text == "waits"
    alice.close()
    bob.close()


def test_a_receipt_whose_handler_keeps_failing_is_durable(keydir: Path) -> None:
    """A handler that keeps raising sends the message to the dead letters, durably,
    before send() returns."""
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json", max_handler_attempts=1)
    bob.on_message(lambda msg: None)
    alice.send("bob", text="hello")

    def failing(msg: object) -> None:
        raise RuntimeError("boom")

    bob._handlers[:] = [failing]
    alice.send("bob", text="poison")
    assert not bob._state.unsynced
    assert [d.payload["text"] for d in bob.dead_letters() if d.payload] == ["poison"]
    alice.close()
    bob.close()
