"""The agent state's batching, and that it keeps crash consistency.

* acknowledged outbox rows are deleted with the next write, not on their own;
* handled inbox rows are logged (``<state>-handled``) and deleted with the
  next page of messages; a ``kill -9`` in between must not run them again;
* ``send(wait=False)`` commits without waiting for the disk and fsyncs once per
  group before transmitting; a ``kill -9`` right after it returned must not
  lose the envelope;
* ``receive_envelopes`` decrypts several envelopes and commits them together,
  with one outcome per envelope.

Crashes are real SIGKILLs of a child process. Nothing here measures time.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from agent_helpers import RecordingHub
from agentkit import Inbox, flip

import agentmesh
from agentmesh import Agent, CryptoError
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.state import AgentState, InboxRow

ROOT = Path(agentmesh.__file__).resolve().parents[1]


def _run_and_kill(code: str, *args: str) -> None:
    """Run ``code`` in a child Python that ends by SIGKILLing itself."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = textwrap.dedent(code) + "\nos.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def _rows(count: int) -> list[InboxRow]:
    return [InboxRow(0, bytes([i]) * 16, "bob", b"{}", 1, None) for i in range(count)]


def test_acknowledged_outbox_rows_go_with_the_next_write(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "a.state.sqlite")
    for i in range(3):
        state.commit_sent("bob", b"record", bytes([i]) * 16, b"envelope", 1)
    state.defer_outbox_removal([bytes([0]) * 16, bytes([1]) * 16])
    # Nothing written yet: a raw reader still sees three rows ...
    raw = sqlite3.connect(tmp_path / "a.state.sqlite")
    assert raw.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 3
    # ... and the next transaction deletes them with its own change.
    state.commit_sent("bob", b"record", bytes([9]) * 16, b"envelope", 1)
    assert raw.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 2
    assert [m for m, _ in state.outbox()] == [bytes([2]) * 16, bytes([9]) * 16]
    raw.close()
    state.close()


def test_deferred_outbox_deletes_lost_in_a_kill_only_mean_a_resend(tmp_path: Path) -> None:
    path = tmp_path / "a.state.sqlite"
    _run_and_kill(
        """
        import os, signal, sys
        from pathlib import Path
        from agentmesh.state import AgentState
        state = AgentState(Path(sys.argv[1]))
        for i in range(3):
            state.commit_sent("bob", b"record", bytes([i]) * 16, b"envelope", 1)
        state.defer_outbox_removal([bytes([0]) * 16])
        """,
        str(path),
    )
    state = AgentState(path)
    assert len(state.outbox()) == 3  # the ack was not recorded: the envelope is resent
    state.close()


def test_handled_rows_never_run_again_after_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "b.state.sqlite"
    _run_and_kill(
        """
        import os, signal, sys
        from pathlib import Path
        from agentmesh.state import AgentState, InboxRow
        state = AgentState(Path(sys.argv[1]))
        rows = [InboxRow(0, bytes([i]) * 16, "bob", b"{}", 1, None) for i in range(10)]
        state.commit_received_batch({"bob": b"record"}, {}, None, rows, 1)
        for row in state.unhandled()[:6]:
            state.mark_handled(row.seq)  # logged; the rows are still in the inbox
        """,
        str(path),
    )
    assert (tmp_path / "b.state.sqlite-handled").stat().st_size == 6 * 8
    state = AgentState(path)  # opening deletes what the log names
    assert [row.message_id for row in state.unhandled()] == [bytes([i]) * 16 for i in range(6, 10)]
    assert state.inbox_pending() == 4
    assert not (tmp_path / "b.state.sqlite-handled").exists()
    state.close()


def test_handled_rows_are_deleted_before_the_next_page(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "c.state.sqlite")
    state.commit_received_batch({"bob": b"record"}, {}, None, _rows(5), 1)
    first = state.unhandled(limit=2)
    for row in first:
        state.mark_handled(row.seq)
    assert [row.seq for row in state.unhandled(limit=2)] == [first[-1].seq + 1, first[-1].seq + 2]
    assert state.inbox_pending() == 3
    state.close()
    assert not (tmp_path / "c.state.sqlite-handled").exists()


def test_a_relaxed_commit_survives_a_kill_and_sync_makes_it_durable(tmp_path: Path) -> None:
    path = tmp_path / "d.state.sqlite"
    _run_and_kill(
        """
        import os, signal, sys
        from pathlib import Path
        from agentmesh.state import AgentState
        state = AgentState(Path(sys.argv[1]))
        state.commit_sent("bob", b"record", b"m" * 16, b"envelope", 1, durable=False)
        assert state.unsynced
        state.commit_sent("bob", b"record", b"n" * 16, b"envelope", 1, durable=False)
        state.sync()
        assert not state.unsynced
        state.commit_sent("bob", b"record", b"o" * 16, b"envelope", 1, durable=False)
        """,
        str(path),
    )
    state = AgentState(path)
    assert [m for m, _ in state.outbox()] == [b"m" * 16, b"n" * 16, b"o" * 16]
    state.close()


def test_pipelined_send_survives_a_kill_right_after_it_returned(tmp_path: Path) -> None:
    """send(wait=False) returns before the disk; a kill then must not lose the envelope."""
    from hubproc import HubProcess, wait_until

    hub = HubProcess(tmp_path).start()
    try:
        with hub.client() as client:
            bob = Agent("bob", hub=client, keypair_path=tmp_path / "bob.json")
            inbox = Inbox()
            bob.on_message(inbox)
            _run_and_kill(
                """
                import os, signal, sys
                from pathlib import Path
                from agentmesh import Agent, NetworkHub
                hub = NetworkHub("127.0.0.1", int(sys.argv[1]))
                alice = Agent("alice", hub=hub, keypair_path=Path(sys.argv[2]))
                alice.send("bob", "first")  # a session, acknowledged
                for i in range(20):
                    alice.send("bob", f"p{i}", wait=False)
                """,
                str(hub.port),
                str(tmp_path / "alice.json"),
            )
            # Whatever was not transmitted before the kill is in alice's outbox:
            # her next login sends it, and bob handles each message exactly once.
            alice = Agent("alice", hub=client, keypair_path=tmp_path / "alice.json")
            wait_until(lambda: len(inbox.texts) >= 21, 60)
            assert alice.flush(60)
            wait_until(lambda: client.queued_count() == 0, 60)
            assert inbox.texts == ["first"] + [f"p{i}" for i in range(20)]
            alice.close()
            bob.close()
    finally:
        hub.stop()


def test_receive_envelopes_commits_a_batch_with_one_outcome_each(
    make_agent, hub: RecordingHub
) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)
    alice.send("bob", "hello")  # a session both ways, so later envelopes are normal ones
    bob.send("alice", "hi")
    hub.hold = True
    for text in ("one", "two", "three"):
        alice.send("bob", text)
    one, two, three = hub.to("bob")[-3:]
    outcomes = bob.endpoint.receive_envelopes([one, one, flip(two, len(two) - 1), two, three])
    assert isinstance(outcomes[2], CryptoError)  # the tampered copy changed nothing
    reports = [o for o in outcomes if isinstance(o, DeliveryReport)]
    assert [r.duplicate for r in reports] == [False, True, False, False]
    [again] = bob.endpoint.receive_envelopes([three])
    assert again == DeliveryReport(accepted=True, duplicate=True)
    bob.endpoint.dispatch_pending()
    assert inbox.texts == ["hello", "one", "two", "three"]


def test_wait_false_on_a_local_hub_is_the_same_as_wait_true(make_agent, hub: RecordingHub) -> None:
    alice = make_agent("alice", hub=hub)
    bob = make_agent("bob", hub=hub)
    inbox = Inbox()
    bob.on_message(inbox)
    alice.send("bob", "a", wait=False)
    alice.send("bob", "b")
    assert inbox.texts == ["a", "b"]  # LocalHub delivers synchronously either way
    assert alice.flush(1.0)
    with pytest.raises(TypeError):
        alice.send("bob", "c", True)  # type: ignore[misc]  # wait is keyword-only
