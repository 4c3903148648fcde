"""AsyncAgent: both directions with Agent, on LocalHub and over a hub subprocess;
request/reply, per-sender order, the async pull API and cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hubproc import HubProcess

from agentmesh import (
    Agent,
    AsyncAgent,
    AsyncNetworkHub,
    LocalHub,
    Message,
    RequestTimeoutError,
)
from agentmesh.async_agent import AsyncMessage

pytestmark = pytest.mark.timeout(120)


async def _until(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Wait (polling the loop) until ``condition()``; a bound on a hang, not a speed test."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_async_and_sync_agents_talk_both_ways_on_a_local_hub(agents) -> None:
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    from_bob: list[str] = []
    alice.on_message(lambda m: from_bob.append(m.text))

    async def main() -> None:
        got: list[AsyncMessage] = []
        async with AsyncAgent("bob", hub=hub) as bob:

            @bob.on_message
            async def handle(msg: AsyncMessage) -> None:
                got.append(msg)

            alice.send("bob", text="hello async")  # a sync agent in the loop's thread
            await _until(lambda: got, "bob's handler")
            assert got[0].text == "hello async" and isinstance(got[0], Message)
            message_id = await bob.send("alice", text="hello sync")
            assert from_bob == ["hello sync"] and len(message_id) == 32
            assert bob.status()["agent_id"] == "bob" and bob.fingerprint.count(":") == 7

    asyncio.run(main())


def test_async_request_reply_both_ways_and_two_hundred_at_once(agents) -> None:
    hub = LocalHub()
    sync_echo = agents("sync-echo", hub=hub)
    sync_echo.on_message(lambda m: m.reply(f"sync: {m.text}"))

    async def main() -> None:
        async with AsyncAgent("async-echo", hub=hub) as echo, AsyncAgent("asker", hub=hub) as asker:

            @echo.on_message
            async def answer(msg: AsyncMessage) -> None:
                await msg.reply(f"async: {msg.text}", n=msg.payload.get("n"))

            assert (await asker.request("sync-echo", "hi", timeout=10)).text == "sync: hi"
            assert (await asker.request("async-echo", "hi", timeout=10)).text == "async: hi"
            replies = await asyncio.gather(
                *(asker.request("async-echo", f"q{i}", n=i, timeout=60) for i in range(200))
            )
            assert [(r.text, r.payload["n"]) for r in replies] == [
                (f"async: q{i}", i) for i in range(200)
            ]

    asyncio.run(main())
    # and a sync agent asking an async one from another thread
    caller = agents("caller", hub=hub)

    async def serve_one() -> str:
        async with AsyncAgent("server", hub=hub) as server:
            server.on_message(lambda m: asyncio.ensure_future(m.reply(f"served: {m.text}")))
            reply = await asyncio.get_running_loop().run_in_executor(
                None, lambda: caller.request("server", "x", timeout=10)
            )
            return reply.text

    assert asyncio.run(serve_one()) == "served: x"


def test_async_request_times_out_and_the_late_reply_reaches_the_handler(agents) -> None:
    hub = LocalHub()
    held: list[Message] = []
    slow = agents("slow", hub=hub)
    slow.on_message(held.append)

    async def main() -> None:
        async with AsyncAgent("asker", hub=hub) as asker:
            late: list[AsyncMessage] = []
            asker.on_message(late.append)
            with pytest.raises(RequestTimeoutError):
                await asker.request("slow", "anyone?", timeout=0.05)
            await asyncio.get_running_loop().run_in_executor(None, held[0].reply, "late")
            await _until(lambda: late, "the late reply")
            assert late[0].in_reply_to == held[0].message_id

    asyncio.run(main())


def test_per_sender_order_to_an_async_agent(agents) -> None:
    hub = LocalHub()
    sender = agents("sender", hub=hub)

    async def main() -> None:
        async with AsyncAgent("receiver", hub=hub) as receiver:
            seen: list[int] = []

            @receiver.on_message
            async def record(msg: AsyncMessage) -> None:
                await asyncio.sleep(0)  # let other tasks run between messages
                seen.append(msg.payload["i"])

            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, lambda: [sender.send("receiver", i=i, wait=False) for i in range(300)]
            )
            await _until(lambda: len(seen) == 300, "300 messages")
            assert seen == list(range(300))

    asyncio.run(main())


def test_async_pull_api_and_a_cancelled_wait_loses_nothing(agents, keydir: Path) -> None:
    hub = LocalHub()
    sender = agents("sender", hub=hub)

    async def main() -> None:
        async with AsyncAgent("puller", hub=hub, keypair_path=keydir / "puller.json") as puller:
            waiting = asyncio.ensure_future(puller.next_message())
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: sender.send("puller", text="kept"))
            assert (await puller.next_message(timeout=5)).text == "kept"
            with pytest.raises(TimeoutError):
                await puller.next_message(timeout=0.05)
            await loop.run_in_executor(None, lambda: sender.send("puller", text="iterated"))
            async for message in puller.messages():
                assert message.text == "iterated"
                break

    asyncio.run(main())


def test_async_agent_with_a_sync_handler_and_a_hub_subprocess(hub_process: HubProcess) -> None:
    sync_hub = hub_process.client(request_timeout=10.0)
    echo = Agent("echo", hub=sync_hub)
    echo.on_message(lambda m: m.reply(f"echo: {m.text}"))
    try:

        async def main() -> None:
            async with (
                AsyncNetworkHub("127.0.0.1", hub_process.port, request_timeout=10.0) as hub,
                AsyncAgent("asker", hub=hub) as asker,
            ):
                got: list[str] = []
                asker.on_message(lambda m: got.append(m.text))  # a sync handler, on the loop
                assert (
                    await asker.request("echo", "over tcp", timeout=20)
                ).text == "echo: over tcp"
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: echo.send("asker", text="pushed")
                )
                await _until(lambda: got == ["pushed"], "the pushed message")
                assert "echo" in await asker.list_peers()

        asyncio.run(main())
    finally:
        echo.close()
        sync_hub.close()
