"""One process (and one Agent) per identity: a clear StateLockedError otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from agentmesh import Agent, AgentMeshError, LocalHub, StateLockedError

HOLDER = textwrap.dedent(
    """
    import sys
    from agentmesh import Agent
    agent = Agent("alice", keypair_path=sys.argv[1])
    print(agent.fingerprint, flush=True)
    sys.stdin.read()  # hold the identity until the test closes our stdin
    agent.close()
    """
)


def test_second_process_gets_state_locked_error(keydir) -> None:
    path = keydir / "alice.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = holder.stdout.readline()  # the holder has the lock once it printed
        assert line.strip(), holder.stderr.read()
        holder_fingerprint = line.strip()

        with pytest.raises(StateLockedError) as info:
            Agent("alice", keypair_path=path)
        assert isinstance(info.value, AgentMeshError)
        assert "alice.state.lock" in str(info.value)
        assert "already uses this identity" in str(info.value)
        # Also with a hub: nothing is registered under the locked identity.
        hub = LocalHub()
        with pytest.raises(StateLockedError):
            Agent("alice", hub=hub, keypair_path=path)
        assert hub.list_agents() == []
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0, holder.stderr.read()
        holder.stdout.close()
        holder.stderr.close()

    # The holder is gone: the identity (the same one) is free again.
    agent = Agent("alice", keypair_path=path)
    assert agent.fingerprint == holder_fingerprint
    agent.close()


def test_lock_released_when_holder_is_killed(keydir) -> None:
    path = keydir / "alice.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip()
        with pytest.raises(StateLockedError):
            Agent("alice", keypair_path=path)
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdin.close()
        holder.stdout.close()
    Agent("alice", keypair_path=path).close()  # the kernel dropped the lock


def test_two_agents_in_one_process(keydir) -> None:
    path = keydir / "alice.json"
    first = Agent("alice", keypair_path=path)
    try:
        with pytest.raises(StateLockedError):
            Agent("alice", keypair_path=path)
        # A different id does not matter: the lock belongs to the files.
        with pytest.raises(StateLockedError):
            Agent("alice2", keypair_path=path)
    finally:
        first.close()
    second = Agent("alice", keypair_path=path)
    assert second.fingerprint == first.fingerprint
    second.close()


def test_in_memory_agents_do_not_lock() -> None:
    Agent("alice").close()
    a, b = Agent("alice"), Agent("alice")
    assert a.fingerprint != b.fingerprint
    a.close()
    b.close()
