"""Request/reply and the pull API on the sync Agent (LocalHub and a real hub subprocess)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hubproc import HubProcess

from agentmesh import Agent, LocalHub, Message, RequestTimeoutError
from agentmesh.errors import AgentMeshError, LocalProtocolError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def network_agents(hub_process: HubProcess) -> Iterator[Callable[[str], Agent]]:
    """``network_agents(agent_id)``: an Agent on its own NetworkHub to the hub process."""
    made: list[Agent] = []

    def make(agent_id: str) -> Agent:
        agent = Agent(agent_id, hub=hub_process.client(request_timeout=10.0))
        made.append(agent)
        return agent

    yield make
    for agent in reversed(made):
        agent.close()
        assert agent.hub is not None
        agent.hub.close()  # type: ignore[attr-defined]


def _echo(agent: Agent) -> None:
    """Make ``agent`` answer every message with ``echo: <text>``."""
    agent.on_message(lambda m: m.reply(f"echo: {m.text}", n=m.payload.get("n")))


def test_request_gets_its_reply_not_the_handlers(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    _echo(bob)
    seen: list[Message] = []
    alice.on_message(seen.append)
    reply = alice.request("bob", "ping", n=7)
    assert (reply.text, reply.payload["n"], reply.sender) == ("echo: ping", 7, "bob")
    assert reply.in_reply_to is not None and len(reply.in_reply_to) == 32
    assert seen == []  # the reply went to request(), not to the handler
    assert alice.status()["inbox_pending"] == 0


def test_in_reply_to_is_inside_the_ciphertext_and_none_otherwise(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    got: list[Message] = []
    bob.on_message(got.append)
    first = alice.send("bob", "plain")
    assert got[0].in_reply_to is None and got[0].message_id == first
    answered: list[Message] = []
    alice.on_message(answered.append)
    got[0].reply("answer")
    assert answered[0].in_reply_to == first
    # a reply to a message nobody waits for reaches the handlers, and its proof covers it
    assert answered[0].export_proof()


def test_request_times_out_and_a_late_reply_is_delivered_as_a_message(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    held: list[Message] = []
    bob.on_message(held.append)  # bob does not answer in time
    late: list[Message] = []
    alice.on_message(late.append)
    with pytest.raises(RequestTimeoutError) as caught:
        alice.request("bob", "anyone?", timeout=0.05)
    assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, AgentMeshError)
    held[0].reply("sorry, late")
    assert [(m.text, m.in_reply_to) for m in late] == [("sorry, late", held[0].message_id)]


def test_two_hundred_concurrent_requests_each_get_their_own_reply(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    _echo(bob)
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(lambda i: alice.request("bob", f"q{i}", n=i), range(200)))
    assert [(r.text, r.payload["n"]) for r in replies] == [(f"echo: q{i}", i) for i in range(200)]


def test_request_and_reply_over_a_hub_subprocess(hub_process, network_agents) -> None:
    alice, bob = network_agents("alice"), network_agents("bob")
    _echo(bob)
    assert alice.request("bob", "over tcp", timeout=20).text == "echo: over tcp"
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(lambda i: alice.request("bob", f"q{i}", timeout=30), range(60)))
    assert [r.text for r in replies] == [f"echo: q{i}" for i in range(60)]


# --- the pull API -------------------------------------------------------------


def test_next_message_pulls_in_arrival_order_and_times_out(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    for i in range(3):
        alice.send("bob", f"m{i}")
    assert [bob.next_message(timeout=1).text for _ in range(3)] == ["m0", "m1", "m2"]
    with pytest.raises(TimeoutError):
        bob.next_message(timeout=0.05)
    assert bob.status()["inbox_pending"] == 0


def test_next_message_waits_for_a_message_from_another_thread(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    ready = threading.Event()

    def later() -> None:
        ready.wait(10)
        alice.send("bob", "arrived")

    thread = threading.Thread(target=later)
    thread.start()
    ready.set()
    assert bob.next_message(timeout=30).text == "arrived"
    thread.join()


def test_pulled_messages_survive_a_restart_until_taken(keydir: Path, agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    alice.send("bob", "kept")
    alice.send("bob", "kept too")
    assert bob.next_message(timeout=1).text == "kept"
    bob.close()
    bob = agents("bob", hub=hub, keypair_path=keydir / "bob.json")
    assert bob.next_message(timeout=1).text == "kept too"
    with pytest.raises(TimeoutError):
        bob.next_message(timeout=0.01)


def test_messages_iterates_until_close_and_pulling_refuses_with_handlers(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = Agent("bob", hub=hub)
    texts: list[str] = []

    def consume() -> None:
        for message in bob.messages():
            texts.append(message.text)
            if len(texts) == 2:
                threading.Thread(target=bob.close).start()

    thread = threading.Thread(target=consume)
    thread.start()
    alice.send("bob", "one")
    alice.send("bob", "two")
    thread.join(30)
    assert not thread.is_alive() and texts == ["one", "two"]
    with pytest.raises(LocalProtocolError, match="closed"):
        bob.next_message(timeout=0)
    carol = agents("carol", hub=hub)
    carol.on_message(lambda m: None)
    with pytest.raises(LocalProtocolError, match="handlers"):
        carol.next_message(timeout=0)


def test_a_handler_may_make_a_request_over_a_hub_subprocess(network_agents) -> None:
    """bob answers alice by asking carol first, from inside his handler: the reply to
    bob's request is received while his handler waits for it."""
    alice, bob, carol = network_agents("alice"), network_agents("bob"), network_agents("carol")
    _echo(carol)
    bob.on_message(lambda m: m.reply(bob.request("carol", m.text, timeout=20).text + " (via bob)"))
    assert alice.request("bob", "relay", timeout=30).text == "echo: relay (via bob)"


def test_a_handler_may_make_a_request_on_a_local_hub(agents) -> None:
    hub = LocalHub()
    alice, bob, carol = agents("alice", hub=hub), agents("bob", hub=hub), agents("carol", hub=hub)
    _echo(carol)
    bob.on_message(lambda m: m.reply(bob.request("carol", m.text, timeout=5).text + " (via bob)"))
    assert alice.request("bob", "relay", timeout=10).text == "echo: relay (via bob)"
