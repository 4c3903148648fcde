"""Agents that start in any order (wait_for_peer), and a wait=False send in a script
that just exits (flushed at interpreter exit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hubproc import ROOT, HubProcess, wait_until

from agentmesh import Agent, LocalHub, PeerNotFoundError

pytestmark = pytest.mark.timeout(120)


def test_wait_for_peer_returns_once_the_peer_registers(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    later = threading.Timer(0.2, lambda: agents("carol", hub=hub))
    later.start()
    alice.wait_for_peer("carol", timeout=30)
    later.join()
    alice.send("carol", text="hi")  # registered, so this works
    with pytest.raises(TimeoutError, match="'nobody' did not register"):
        alice.wait_for_peer("nobody", timeout=0.1)
    with pytest.raises(PeerNotFoundError, match="Peer 'nobody' not found on hub"):
        alice.send("nobody", text="x")


_SCRIPT = textwrap.dedent(
    """
    import sys
    from agentmesh import Agent, NetworkHub

    port, key, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    alice = Agent("alice", hub=NetworkHub("127.0.0.1", port), keypair_path=key)
    alice.wait_for_peer("bob", timeout=60)
    for i in range(count):
        alice.send("bob", text=f"m{i}", wait=False)
    # no flush(), no close(): the script just ends
    """
)


def test_a_script_that_sends_with_wait_false_and_exits_still_delivers(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", graceful_stop=True).start()
    client = hub.client(request_timeout=10.0)
    got: list[str] = []
    bob = Agent("bob", hub=client)
    bob.on_message(lambda m: got.append(m.text))
    try:
        script = tmp_path / "sender.py"
        script.write_text(_SCRIPT)
        count = 300
        done = subprocess.run(
            [sys.executable, str(script), str(hub.port), str(tmp_path / "alice.json"), str(count)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stderr
        wait_until(lambda: len(got) == count, 60, "every message of the exited script")
        assert got == [f"m{i}" for i in range(count)]
    finally:
        bob.close()
        client.close()
        hub.stop()


def test_an_agent_with_a_key_file_starts_while_the_hub_is_down(tmp_path: Path) -> None:
    """It starts, its send to a peer it has a session with waits in the outbox, and it
    registers and delivers once the hub is back; one without a key file still raises."""
    from agentmesh import HubUnavailableError, NetworkHub

    hub = HubProcess(tmp_path / "hub", graceful_stop=True).start()
    options = {"connect_timeout": 1.0, "request_timeout": 10.0, "reconnect_max": 0.5}
    client_b = hub.client(**options)
    got: list[str] = []
    bob = Agent("bob", hub=client_b)
    bob.on_message(lambda m: got.append(m.text))
    client_a = hub.client(**options)
    alice = Agent("alice", hub=client_a, keypair_path=tmp_path / "alice.json")
    clients = [client_b, client_a]
    try:
        alice.send("bob", text="first")
        wait_until(lambda: got == ["first"], 30, "the first message")
        alice.close()
        hub.stop()

        client_a = NetworkHub("127.0.0.1", hub.port, **options)  # type: ignore[arg-type]
        clients.append(client_a)
        alice = Agent("alice", hub=client_a, keypair_path=tmp_path / "alice.json")
        alice.send("bob", text="while the hub was down")
        assert alice.status()["outbox"] == 1
        assert alice.flush(0.2) is False
        carol_hub = NetworkHub("127.0.0.1", hub.port, **options)  # type: ignore[arg-type]
        clients.append(carol_hub)
        with pytest.raises(HubUnavailableError):
            Agent("carol", hub=carol_hub)  # no key file: nothing to queue in

        hub.start()
        assert alice.flush(60) is True
        wait_until(lambda: got == ["first", "while the hub was down"], 60, "the queued message")
    finally:
        alice.close()
        bob.close()
        for client in clients:
            client.close()
        hub.stop()
