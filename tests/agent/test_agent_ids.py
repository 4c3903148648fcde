"""Agent ids end up in file names, SQL, logs and envelopes: only a safe set is allowed."""

from __future__ import annotations

import pytest
from agentkit import Inbox

from agentmesh import Agent, LocalHub

BAD_IDS = [
    "",
    "a/b",
    "/etc/passwd",
    "..",
    "../escape",
    "a b",
    " alice",
    "alice ",
    "a\tb",
    "a\nb",
    "alice\n",
    "a\x00b",
    "'quoted'",
    '"quoted"',
    "a'; DROP TABLE x;--",
    'x" OR 1=1 --',
    "a\\b",
    "é",
    "-leading-dash",
    ".hidden",
    "a" * 65,
]


@pytest.mark.parametrize("agent_id", BAD_IDS, ids=repr)
def test_bad_agent_id_is_refused(agent_id, tmp_path) -> None:
    hub = LocalHub()
    with pytest.raises(ValueError, match="invalid agent id") as info:
        Agent(agent_id, hub=hub)
    message = str(info.value)
    assert "A-Z a-z 0-9" in message  # says what is allowed
    assert "64" in message
    assert hub.list_agents() == []
    with pytest.raises(ValueError, match="invalid agent id"):
        Agent(agent_id, keypair_path=tmp_path / "k.json")
    assert list(tmp_path.iterdir()) == []  # nothing was created


@pytest.mark.parametrize("agent_id", [1, None, b"alice"], ids=repr)
def test_non_string_agent_id(agent_id) -> None:
    with pytest.raises(ValueError, match="must be a str"):
        Agent(agent_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "agent_id", ["a", "A", "0", "agent-1", "agent_1", "svc.worker.7", "a" * 64]
)
def test_good_agent_ids(agent_id) -> None:
    hub = LocalHub()
    agent = Agent(agent_id, hub=hub)
    peer = Agent("peer", hub=hub)
    inbox = Inbox()
    agent.on_message(inbox)
    peer.send(agent_id, "hi")
    assert inbox.texts == ["hi"]
    assert agent.status()["agent_id"] == agent_id
    agent.close()
    peer.close()


@pytest.mark.parametrize("bad", ["a'; DROP TABLE x;--", "../bob", "a b", "", "a" * 65], ids=repr)
def test_bad_peer_ids_are_refused_everywhere(make_agent, hub, bad) -> None:
    alice = make_agent("alice", hub=hub)
    make_agent("bob", hub=hub)
    for call in (
        lambda: alice.send(bad, "x"),
        lambda: alice.send_payload(bad, {"text": "x"}),
        lambda: alice.connect(bad),
        lambda: alice.trust(bad, "0000"),
        lambda: alice.safety_number(bad),
    ):
        with pytest.raises(ValueError, match="invalid agent id"):
            call()
    assert sorted(hub.list_agents()) == ["alice", "bob"]
    assert alice.status()["known_peers"] == []
