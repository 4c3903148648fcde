"""A handler that raises loses nothing: it is rerun, then the message is dead-lettered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentmesh import Agent, AsyncAgent, DeadLetter, LocalHub, Message
from agentmesh.errors import ConfigurationError, LocalProtocolError

pytestmark = pytest.mark.timeout(120)


class Flaky:
    """A handler that raises its first ``failures`` calls, then records the message."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.handled: list[str] = []

    def __call__(self, msg: Message) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"flaky failure {self.calls}")
        self.handled.append(msg.text)


def test_a_handler_failing_twice_then_succeeding_handles_the_message_once(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub)
    flaky, steady = Flaky(2), Flaky(0)
    bob.on_message(steady)
    bob.on_message(flaky)
    alice.send("bob", text="job")
    assert flaky.handled == ["job"] and flaky.calls == 3
    assert steady.calls == 1  # the handler that succeeded is not rerun
    assert bob.dead_letters() == [] and bob.status()["dead_letters"] == 0
    assert bob.status()["inbox_pending"] == 0


def test_a_handler_that_always_fails_dead_letters_the_message_and_later_ones_go_on(
    agents, keydir: Path
) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json", max_handler_attempts=2)
    seen: list[str] = []

    def handler(msg: Message) -> None:
        if msg.text == "poison":
            raise ValueError("cannot parse this")
        seen.append(msg.text)

    bob.on_message(handler)
    poison_id = alice.send("bob", text="poison", n=1)
    alice.send("bob", text="fine")
    assert seen == ["fine"]
    [letter] = bob.dead_letters()
    assert isinstance(letter, DeadLetter)
    assert (letter.direction, letter.message_id, letter.peer) == ("in", poison_id, "alice")
    assert letter.payload == {"type": "message", "text": "poison", "n": 1}
    assert "ValueError: cannot parse this" in letter.reason
    assert bob.status()["dead_letters"] == 1
    bob.close()

    # it persists, and a retry hands it to the (now fixed) handler again
    bob = agents("bob", hub=hub, keypair_path=keydir / "bob.json")
    assert [d.message_id for d in bob.dead_letters()] == [poison_id]
    fixed: list[str] = []
    bob.on_message(lambda m: fixed.append(m.text))
    bob.retry_dead_letter(poison_id)
    assert fixed == ["poison"] and bob.dead_letters() == []
    with pytest.raises(LocalProtocolError):
        bob.retry_dead_letter(poison_id)


def test_discard_deletes_a_dead_letter(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = agents("bob", hub=hub, max_handler_attempts=1)
    bob.on_message(Flaky(10))
    message_id = alice.send("bob", text="x")
    assert [d.message_id for d in bob.dead_letters()] == [message_id]
    bob.discard_dead_letter(message_id)
    assert bob.dead_letters() == []
    with pytest.raises(LocalProtocolError):
        bob.discard_dead_letter(message_id)
    with pytest.raises(LocalProtocolError, match="message id"):
        bob.discard_dead_letter("not-hex")


def test_async_handlers_are_retried_then_dead_lettered(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)

    async def main() -> None:
        async with AsyncAgent("bob", hub=hub, max_handler_attempts=3) as bob:
            calls: list[str] = []

            @bob.on_message
            async def handle(msg: Message) -> None:
                calls.append(msg.text)
                if msg.text == "poison" or len(calls) < 3:
                    raise RuntimeError("not yet")

            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: alice.send("bob", text="flaky"))
            deadline = loop.time() + 20
            while calls.count("flaky") < 3 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            await loop.run_in_executor(None, lambda: alice.send("bob", text="poison"))
            while not await bob.dead_letters() and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert calls == ["flaky"] * 3 + ["poison"] * 3
            [letter] = await bob.dead_letters()
            assert letter.payload is not None and letter.payload["text"] == "poison"

    asyncio.run(main())


def test_max_handler_attempts_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="max_handler_attempts"):
        Agent("x", max_handler_attempts=0)
