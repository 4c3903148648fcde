"""AsyncNetworkHub drives its connections on the caller's event loop: where they run,
AsyncAgent <-> Agent both ways over a hub subprocess with per-sender order, the
coroutine API, blocking calls on the loop, threads after aclose, and a loop that
ends (or closes) before the hub is closed. Waits are bounded polls; nothing
asserts a timing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from agentkit import Inbox
from hubproc import HubProcess, wait_until

from agentmesh import Agent, AsyncAgent, AsyncNetworkHub, NetworkHub
from agentmesh.async_agent import AsyncMessage
from agentmesh.errors import HubUnavailableError, LocalProtocolError
from agentmesh.protocol.hub_interface import LoopBoundHub, supports

pytestmark = pytest.mark.timeout(120)

#: Threads a hub client starts (the per-link ones end with the link).
HUB_THREADS = ("agentmesh-hub-client", "agentmesh-endpoint-", "agentmesh-dispatch-")
HUB_THREADS += ("agentmesh-handlers-",)


def hub_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(HUB_THREADS))


def async_hub(hub: HubProcess, **options: float) -> AsyncNetworkHub:
    settings = {"connect_timeout": 5.0, "ack_timeout": 10.0, "request_timeout": 10.0}
    settings.update({"reconnect_initial": 0.05, "reconnect_max": 0.3, **options})
    return AsyncNetworkHub("127.0.0.1", hub.port, **settings)  # type: ignore[arg-type]


async def until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll the loop until ``condition()``: a bound on a hang, not a speed test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_the_connection_runs_on_the_callers_loop(hub_process: HubProcess, keydir: Path) -> None:
    before = hub_threads()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with (
            async_hub(hub_process) as hub,
            AsyncAgent("alice", hub=hub, keypair_path=keydir / "alice.json"),
        ):
            link = hub._links["alice"]
            assert link.authenticated
            # The transport's protocol was made, and its loss is awaited, on this loop.
            assert link.transport is not None and link.transport.lost.get_loop() is loop
            names = {task.get_name() for task in asyncio.all_tasks(loop)}
            assert {"agentmesh-link-alice", "agentmesh-effects-alice"} <= names
            assert "agentmesh-hub-client" not in hub_threads()  # no private I/O thread
            assert {"agentmesh-endpoint-alice", "agentmesh-dispatch-alice"} <= set(hub_threads())
            assert "alice" in await hub.alist_agents()
            assert (await hub.astats())["agents"] >= 1

    assert supports(async_hub(hub_process), LoopBoundHub)
    assert not supports(NetworkHub("127.0.0.1", hub_process.port), LoopBoundHub)
    asyncio.run(main())
    assert hub_threads() == before


def test_async_and_sync_agents_both_ways_in_order(hub_process: HubProcess, keydir: Path) -> None:
    count = 200
    with hub_process.client(request_timeout=10.0) as sync_hub:
        bob = Agent("bob", hub=sync_hub, keypair_path=keydir / "bob.json")
        from_alice = Inbox()
        bob.on_message(from_alice)
        bob.on_message(lambda m: m.reply(f"bob: {m.text}") if m.type == "request" else None)

        async def main() -> None:
            async with (
                async_hub(hub_process) as hub,
                AsyncAgent("alice", hub=hub, keypair_path=keydir / "alice.json") as alice,
            ):
                from_bob: list[int] = []

                @alice.on_message
                async def record(msg: AsyncMessage) -> None:
                    if msg.type == "request":
                        await msg.reply(f"alice: {msg.text}")
                    elif "i" in msg.payload:
                        await asyncio.sleep(0)  # other tasks run between messages
                        from_bob.append(msg.payload["i"])

                for i in range(count):  # half pipelined, half waiting for the hub
                    await alice.send("bob", text=str(i), i=i, wait=i % 2 == 0)
                assert await alice.flush(30)
                await until(lambda: len(from_alice) >= count, "bob gets alice's messages")
                loop = asyncio.get_running_loop()

                def bob_sends() -> None:
                    for i in range(count):
                        bob.send("alice", text=str(i), i=i, wait=i % 2 == 1)

                await loop.run_in_executor(None, bob_sends)
                await until(lambda: len(from_bob) >= count, "alice gets bob's messages")
                assert from_bob == list(range(count))  # per-sender order, no duplicates
                # Request/reply both ways: the async side waits on the loop, the sync
                # side in an executor thread.
                reply = await alice.request("bob", "ping", type="request", timeout=20)
                assert reply.text == "bob: ping"
                answer = await loop.run_in_executor(
                    None, lambda: bob.request("alice", "pong", type="request", timeout=20)
                )
                assert answer.text == "alice: pong"

        asyncio.run(main())
        plain = [m for m in from_alice if "i" in m.payload]
        assert [m.payload["i"] for m in plain] == list(range(count))
        bob.close()


def test_coroutines_register_deliver_and_fetch_on_the_loop(
    hub_process: HubProcess, keydir: Path
) -> None:
    with hub_process.client(request_timeout=10.0) as sync_hub:
        bob = Agent("bob", hub=sync_hub, keypair_path=keydir / "bob.json")
        got = Inbox()
        bob.on_message(got)

        async def main() -> None:
            async with async_hub(hub_process) as hub:
                loop = asyncio.get_running_loop()
                # An Agent made in an executor thread registers through the loop.
                alice = await loop.run_in_executor(
                    None, lambda: Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
                )
                bundle = await hub.afetch_prekey_bundle("bob")
                assert bundle and hub.envelope_limit("alice")
                await loop.run_in_executor(None, lambda: alice.send("bob", text="via executor"))
                await until(lambda: got.texts == ["via executor"], "the first message")
                await hub.aunregister("alice")
                assert "alice" not in hub._links
                await hub.aregister(alice)  # back, on the loop this time
                assert hub._links["alice"].authenticated
                await loop.run_in_executor(None, lambda: alice.send("bob", text="again"))
                await until(lambda: got.texts[-1:] == ["again"], "the second message")
                await loop.run_in_executor(None, alice.close)

        asyncio.run(main())
        bob.close()


def test_blocking_calls_on_the_loop_raise(hub_process: HubProcess, keydir: Path) -> None:
    unbound = async_hub(hub_process)
    with pytest.raises(LocalProtocolError, match="not bound to an event loop"):
        unbound.list_agents()
    with pytest.raises(LocalProtocolError, match="running event loop"):
        unbound.bind_running_loop()

    async def main() -> AsyncNetworkHub:
        async with (
            async_hub(hub_process) as hub,
            AsyncAgent("alice", hub=hub, keypair_path=keydir / "alice.json"),
        ):
            for call, instead in [
                (hub.list_agents, "await hub.alist_agents()"),
                (hub.stats, "await hub.astats()"),
                (hub.close, "await hub.aclose()"),
                (lambda: hub.unregister("alice"), "await hub.aunregister"),
                (lambda: hub.fetch_prekey_bundle("alice"), "await hub.afetch_prekey_bundle"),
                (lambda: hub.wait_acked("alice"), "run_in_executor"),
            ]:
                with pytest.raises(LocalProtocolError, match="would deadlock") as raised:
                    call()
                assert instead in str(raised.value)
            assert hub._links["alice"].authenticated  # and nothing was harmed
            # Sync calls from another thread are fine.
            loop = asyncio.get_running_loop()
            assert "alice" in await loop.run_in_executor(None, hub.list_agents)
            hub.bind_running_loop()  # idempotent on its own loop
            return hub

    used = asyncio.run(main())
    with pytest.raises(LocalProtocolError, match="closed"):
        used.list_agents()
    # One hub, one loop: a hub whose loop runs (in another thread) refuses this one.
    other = async_hub(hub_process)

    async def bind() -> None:
        other.bind_running_loop()

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="test-loop")
    runner.start()
    try:
        asyncio.run_coroutine_threadsafe(bind(), loop).result(10)
        with pytest.raises(LocalProtocolError, match="another event loop"):
            asyncio.run(bind())
        asyncio.run_coroutine_threadsafe(other.aclose(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()
    # A hub whose loop has ended is closed with it.
    with pytest.raises(LocalProtocolError, match="closed"):
        asyncio.run(bind())


def test_aclose_leaves_no_hub_thread(hub_process: HubProcess, keydir: Path) -> None:
    before = hub_threads()

    async def main() -> None:
        hub = async_hub(hub_process)
        async with (
            AsyncAgent("alice", hub=hub, keypair_path=keydir / "alice.json") as alice,
            AsyncAgent("bob", hub=hub, keypair_path=keydir / "bob.json") as bob,
        ):
            assert {"agentmesh-endpoint-alice", "agentmesh-handlers-bob"} <= set(hub_threads())
            got: list[str] = []
            bob.on_message(lambda m: got.append(m.text))
            await alice.send("bob", text="one hub, two agents")  # the threads have work
            await until(lambda: got, "bob's message")
            await hub.aclose()  # before the agent: its later unregister is a no-op
            assert hub_threads() == before
            with pytest.raises(LocalProtocolError, match="closed"):
                await hub.alist_agents()
        await hub.aclose()  # idempotent

    asyncio.run(main())
    assert hub_threads() == before


def test_a_loop_that_ends_first_leaves_nothing_waiting(
    hub_process: HubProcess, keydir: Path
) -> None:
    before = hub_threads()
    alice = Agent("alice", keypair_path=keydir / "alice.json")  # registered by hand
    parked = threading.Event()
    outcome: list[BaseException] = []

    async def forgotten() -> AsyncNetworkHub:
        hub = async_hub(hub_process)
        await hub.aregister(alice)
        runner = hub._io
        assert runner is not None

        def caller() -> None:  # a sync caller waiting on the loop as the loop ends
            parked.set()
            try:
                runner.run(asyncio.sleep(3600), None, call="test")
            except BaseException as exc:
                outcome.append(exc)

        threading.Thread(target=caller, name="test-caller").start()
        await asyncio.get_running_loop().run_in_executor(None, parked.wait)
        return hub  # neither closed nor unregistered

    hub = asyncio.run(forgotten())
    wait_until(lambda: outcome, what="the waiting call to fail")
    assert isinstance(outcome[0], HubUnavailableError)
    wait_until(lambda: hub_threads() == before, what="the hub's threads to end")
    with pytest.raises(LocalProtocolError, match="closed"):
        hub.list_agents()
    hub.close()  # returns: nothing to wait for
    alice.close()

    # A loop closed by hand (no task cancelled): calls fail, close() returns, threads end.
    carol = Agent("carol", keypair_path=keydir / "carol.json")
    loop = asyncio.new_event_loop()
    hub = async_hub(hub_process)
    loop.run_until_complete(hub.aregister(carol))
    loop.close()
    with pytest.raises(HubUnavailableError, match="closed"):
        hub.list_agents()
    hub.close()
    assert hub_threads() == before
    carol.close()
