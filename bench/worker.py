"""Benchmark worker processes: ``python -m bench.worker ROLE [options]``.

Roles (see ``bench.scenarios`` for how they are combined):

``receiver``  a real :class:`~agentmesh.Agent` on a :class:`~agentmesh.NetworkHub`;
              answers "warmup" messages, counts stamped messages, measures latency.
``sender``    a real Agent sending stamped 200-byte messages (pipelined, default or paced).
``loader``    fills an offline agent's mailbox: real envelopes from a real session,
              pushed over a raw connection (scenarios 5 and 9).
``ingest``    raw SEND load from many connections, no client crypto (scenario 6).
``sink``      raw recipients that ACK every PUSH (scenario 6, online).
``fleet``     several Agents sending to random peers (scenario 7).
``idle``      many idle authenticated connections (scenario 8).
``localpair`` two Agents on a LocalHub in one process (scenario 2).
``asyncpair`` two AsyncAgents on AsyncNetworkHub clients in one asyncio program
              (scenario 10: pair rate, request/reply round trips, loop stalls).

Every role prints ``READY`` once set up, waits for ``GO`` where it has a timed
part, prints ``RESULT {json}`` and exits on ``STOP`` (or when its work is done).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    emit,
    now,
    parse_stamp,
    percentile,
    raise_fd_limit,
    run_role,
    stamped_text,
    text_payload,
    wait_command,
)

WARMUP = "warmup"


def _supports_pipelining() -> bool:
    from agentmesh import Agent

    return "wait" in inspect.signature(Agent.send).parameters


def _send(agent: Any, peer: str, text: str, pipelined: bool) -> None:
    if pipelined:
        agent.send(peer, text, wait=False)
    else:
        agent.send(peer, text)


def _flush(agent: Any, timeout: float) -> None:
    flush = getattr(agent, "flush", None)
    if flush is not None:
        flush(timeout)


# --- receiver / sender ---------------------------------------------------------------------------


def receiver(args: argparse.Namespace) -> None:
    from agentmesh import Agent, Message
    from agentmesh.hub.client import NetworkHub

    expect = args.expect
    latencies: list[int] = []
    state = {"count": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()
    if expect == 0:
        done.set()
    agent_box: list[Any] = []

    def handle(msg: Message) -> None:
        t = now()
        if msg.type == WARMUP:
            agent_box[0].send(msg.sender, "warmup-reply", type=WARMUP)
            return
        stamp = parse_stamp(msg.text)
        if stamp is not None:
            latencies.append(time.monotonic_ns() - stamp[1])
        if not state["count"]:
            state["first"] = t
        state["count"] += 1
        state["last"] = t
        if state["count"] >= expect:
            done.set()

    if args.mode == "drain":
        emit("READY")
        if wait_command("GO") != "GO":
            return
    t0 = now()
    hub = NetworkHub("127.0.0.1", args.port, ack_timeout=120.0)
    agent = Agent(
        args.id,
        hub=hub,
        keypair_path=Path(args.dir) / f"{args.id}.json",
        sign_messages=not args.unsigned,
    )
    agent_box.append(agent)
    t_connected = now()
    agent.on_message(handle)
    if args.mode != "drain":
        emit("READY")
    if args.mode == "warm":
        wait_command("STOP")
    else:
        while not done.wait(0.5):
            if args.deadline and now() - t0 > args.deadline:
                break
    latencies.sort()
    ms = [v / 1e6 for v in latencies]
    emit(
        "RESULT",
        count=state["count"],
        t_start=t0,
        t_connected=t_connected,
        t_first=state["first"],
        t_last=state["last"],
        latency_ms={
            "samples": len(ms),
            "p50": percentile(ms, 50),
            "p99": percentile(ms, 99),
            "p99.9": percentile(ms, 99.9),
            "max": ms[-1] if ms else 0.0,
            "mean": sum(ms) / len(ms) if ms else 0.0,
        },
    )
    if args.mode != "warm":
        wait_command("STOP")
    agent.close()
    hub.close()


def sender(args: argparse.Namespace) -> None:
    from agentmesh import Agent, Message
    from agentmesh.hub.client import NetworkHub

    replied = threading.Event()

    def handle(msg: Message) -> None:
        if msg.type == WARMUP:
            replied.set()

    hub = NetworkHub("127.0.0.1", args.port, ack_timeout=120.0)
    agent = Agent(
        args.id,
        hub=hub,
        keypair_path=Path(args.dir) / f"{args.id}.json",
        sign_messages=not args.unsigned,
    )
    agent.on_message(handle)
    pipelined = args.mode == "pipelined" and _supports_pipelining()
    emit("READY", pipelined=pipelined)
    if wait_command("GO") != "GO":
        return
    # One round trip first: both sides then hold an established session (normal
    # envelopes, no PQXDH header), as in any conversation after its first message.
    agent.send(args.peer, WARMUP, type=WARMUP)
    if not replied.wait(60):
        raise RuntimeError("no warmup reply")
    count, rate = args.count, args.rate
    t_first = now()
    for i in range(count):
        if rate:
            due = t_first + i / rate
            delay = due - now()
            if delay > 0:
                time.sleep(delay)
        _send(agent, args.peer, stamped_text(i), pipelined)
    t_sent = now()
    _flush(agent, 300.0)
    t_acked = now()
    emit("RESULT", t_first=t_first, t_sent=t_sent, t_acked=t_acked, pipelined=pipelined)
    wait_command("STOP")
    agent.close()
    hub.close()


# --- loader: fill an offline mailbox -------------------------------------------------------------


def loader(args: argparse.Namespace) -> None:
    from agentmesh import Agent, Message
    from agentmesh.crypto.session import SessionRecord
    from agentmesh.hub.client import NetworkHub
    from agentmesh.keyfile import load_or_create_key_file
    from agentmesh.state import AgentState, state_path_for
    from agentmesh.wire.payload import encode_payload
    from bench import rawclient

    key_path = Path(args.dir) / f"{args.id}.json"
    replied = threading.Event()

    def handle(msg: Message) -> None:
        if msg.type == WARMUP:
            replied.set()

    hub = NetworkHub("127.0.0.1", args.port)
    agent = Agent(args.id, hub=hub, keypair_path=key_path)
    agent.on_message(handle)
    agent.send(args.peer, WARMUP, type=WARMUP)
    if not replied.wait(60):
        raise RuntimeError("no warmup reply")
    agent.close()
    hub.close()
    emit("WARM")
    if wait_command("GO") != "GO":
        return
    identity = load_or_create_key_file(key_path).identity
    state = AgentState(state_path_for(key_path))
    raw = state.session_record(args.peer)
    state.close()
    assert raw is not None
    session = SessionRecord.from_bytes(raw).active
    assert session is not None and session.ratchet.can_send
    t0 = now()
    frames = []
    for i in range(args.count):
        payload = encode_payload({"type": "message", "text": stamped_text(i)})
        data = session.encrypt(
            identity, payload, message_id=os.urandom(16), timestamp_ms=int(time.time() * 1000)
        ).to_bytes()
        frames.append(rawclient.send_frame(i + 1, data))
    t_built = now()

    async def push() -> tuple[float, float]:
        client = await rawclient.connect(args.port, identity, args.id)
        await client.login()
        start = now()
        end = await client.push(frames, args.window)
        assert client.transport is not None
        client.transport.close()
        if client.errors:
            raise RuntimeError(f"{client.errors} refused, e.g. {client.last_error}")
        return start, end

    start, end = asyncio.run(push())
    emit(
        "RESULT",
        built=args.count,
        build_s=t_built - t0,
        push_s=end - start,
        envelope_bytes=len(frames[0]) - 9 if frames else 0,
    )


# --- raw ingest and sinks ------------------------------------------------------------------------


def _identities(prefix: str, count: int) -> list[tuple[str, Any]]:
    from agentmesh.crypto.identity import IdentityKeyPair

    return [(f"{prefix}{i}", IdentityKeyPair.generate()) for i in range(count)]


def ingest(args: argparse.Namespace) -> None:
    from bench import rawclient

    senders = _identities(args.prefix, args.connections)
    recipients = [f"{args.recipient_prefix}{i}" for i in range(args.connections)]

    async def run() -> None:
        clients = []
        for agent_id, identity in senders:
            client = await rawclient.connect(args.port, identity, agent_id)
            await client.login()
            clients.append(client)
        plans = []
        for index, (agent_id, _) in enumerate(senders):
            plans.append(
                [
                    rawclient.send_frame(
                        n + 1,
                        rawclient.dummy_envelope(
                            agent_id, recipients[index], n, args.ciphertext_len
                        ),
                    )
                    for n in range(args.count)
                ]
            )
        emit("READY", envelope_bytes=len(plans[0][0]) - 9)
        await asyncio.get_running_loop().run_in_executor(None, wait_command, "GO")
        t_first = now()
        ends = await asyncio.gather(
            *(c.push(plan, args.window) for c, plan in zip(clients, plans, strict=True))
        )
        errors = sum(c.errors for c in clients)
        emit(
            "RESULT",
            t_first=t_first,
            t_last=max(ends),
            sent=args.count * len(clients),
            errors=errors,
            last_error=next((c.last_error for c in clients if c.last_error), ""),
        )
        for client in clients:
            assert client.transport is not None
            client.transport.close()

    asyncio.run(run())


def sink(args: argparse.Namespace) -> None:
    """Log in recipients (binding them), ACK every push; with --expect 0 just bind and exit."""
    from bench import rawclient

    recipients = _identities(args.prefix, args.connections)

    async def run() -> None:
        clients = []
        for agent_id, identity in recipients:
            client = await rawclient.connect(args.port, identity, agent_id)
            client.acking = True
            await client.login()
            clients.append(client)
        if not args.expect:
            for client in clients:
                assert client.transport is not None
                client.transport.close()
            emit("READY")
            emit("RESULT", count=0)
            return
        emit("READY")
        await asyncio.gather(*(c.drain(args.expect, args.timeout) for c in clients))
        emit(
            "RESULT",
            count=sum(c.pushed for c in clients),
            t_first=min(c.first_push for c in clients),
            t_last=max(c.last_push for c in clients),
        )
        await asyncio.get_running_loop().run_in_executor(None, wait_command, "STOP")
        for client in clients:
            assert client.transport is not None
            client.transport.close()

    asyncio.run(run())


# --- fleet ---------------------------------------------------------------------------------------


def fleet(args: argparse.Namespace) -> None:
    from agentmesh import Agent, Message
    from agentmesh.hub.client import NetworkHub

    mine = args.ids.split(",")
    everyone = [f"fleet{i:03d}" for i in range(args.total)]
    hub = NetworkHub("127.0.0.1", args.port, ack_timeout=120.0, request_timeout=120.0)
    received: dict[str, int] = {agent_id: 0 for agent_id in mine}
    sent: dict[str, int] = {agent_id: 0 for agent_id in mine}
    failed: dict[str, int] = {agent_id: 0 for agent_id in mine}
    agents: list[Any] = []
    for agent_id in mine:

        def handle(msg: Message, me: str = agent_id) -> None:
            received[me] += 1

        agent = Agent(agent_id, hub=hub, keypair_path=Path(args.dir) / f"{agent_id}.json")
        agent.on_message(handle)
        agents.append(agent)
    emit("READY")
    if wait_command("GO") != "GO":
        return
    stop_at = now() + args.duration
    text = text_payload()

    def run(agent: Any, seed: int) -> None:
        rng = random.Random(seed)
        me = agent.agent_id
        peers = [a for a in everyone if a != me]
        while now() < stop_at:
            try:
                agent.send(rng.choice(peers), text)
            except Exception as exc:  # keep going; count it
                failed[me] += 1
                logging.getLogger("bench.fleet").warning("%s: %s", me, exc)
                time.sleep(0.01)
                continue
            sent[me] += 1

    threads = [
        threading.Thread(target=run, args=(agent, args.seed * 1000 + i), daemon=True)
        for i, agent in enumerate(agents)
    ]
    t_start = now()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    t_end = now()
    emit("SENT", sent=sent, failed=failed, t_start=t_start, t_end=t_end)
    wait_command("REPORT")
    emit("RESULT", sent=sent, received=dict(received), failed=failed)
    wait_command("STOP")
    for agent in agents:
        agent.close()
    hub.close()


# --- idle connections ----------------------------------------------------------------------------


def idle(args: argparse.Namespace) -> None:
    from bench import rawclient

    raise_fd_limit(args.count + 1024)
    identities = _identities(args.prefix, args.count)

    async def run() -> None:
        limit = asyncio.Semaphore(args.concurrency)
        clients: list[Any] = []
        failures: list[str] = []

        async def one(agent_id: str, identity: Any) -> None:
            async with limit:
                try:
                    client = await rawclient.connect(args.port, identity, agent_id)
                    await client.login(timeout=300)
                    clients.append(client)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        emit("READY")
        await asyncio.get_running_loop().run_in_executor(None, wait_command, "GO")
        t_first = now()
        await asyncio.gather(*(one(a, i) for a, i in identities))
        t_last = now()
        emit(
            "RESULT",
            t_first=t_first,
            t_last=t_last,
            ok=len(clients),
            failed=len(failures),
            failure=failures[0] if failures else "",
        )
        await asyncio.get_running_loop().run_in_executor(None, wait_command, "STOP")
        for client in clients:
            client.transport.close()

    asyncio.run(run())


# --- LocalHub pair -------------------------------------------------------------------------------


def localpair(args: argparse.Namespace) -> None:
    from agentmesh import Agent, LocalHub, Message

    count = [0]

    def handle(msg: Message) -> None:
        count[0] += 1

    directory = Path(args.dir)
    hub = LocalHub(db=str(directory / "local-hub.sqlite"))
    alice = Agent("alice", hub=hub, keypair_path=directory / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=directory / "bob.json")
    bob.on_message(handle)
    alice.on_message(lambda _m: None)
    alice.send("bob", WARMUP)
    bob.send("alice", WARMUP)
    count[0] = 0
    text = text_payload()
    emit("READY")
    t0 = now()
    for _ in range(args.count):
        alice.send("bob", text)
    t1 = now()
    emit("RESULT", count=count[0], seconds=t1 - t0)
    alice.close()
    bob.close()
    hub.close()


def asyncpair(args: argparse.Namespace) -> None:
    asyncio.run(_asyncpair(args))


async def _asyncpair(args: argparse.Namespace) -> None:
    from agentmesh import AsyncAgent, AsyncNetworkHub
    from agentmesh.async_agent import AsyncMessage

    loop = asyncio.get_running_loop()
    handled = [0]
    last = [0.0]

    async def bob_handle(msg: AsyncMessage) -> None:
        if msg.type == "request":
            await msg.reply(msg.text)
        else:
            handled[0] += 1
            last[0] = now()

    stalls: list[float] = []
    ticking = [True]

    async def ticker() -> None:
        """The loop's longest stall: how late a 1 ms sleep wakes up, at worst."""
        while ticking[0]:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            stalls.append(loop.time() - t0 - 0.001)

    directory = Path(args.dir)
    options = {"request_timeout": 30.0}
    async with (
        AsyncNetworkHub("127.0.0.1", args.port, **options) as hub_a,
        AsyncNetworkHub("127.0.0.1", args.port, **options) as hub_b,
        AsyncAgent("alice", hub=hub_a, keypair_path=directory / "alice.json") as alice,
        AsyncAgent("bob", hub=hub_b, keypair_path=directory / "bob.json") as bob,
    ):
        bob.on_message(bob_handle)
        await alice.request("bob", WARMUP, type="request", timeout=60)
        text = text_payload()
        emit("READY")
        tick = asyncio.ensure_future(ticker())
        t0 = now()
        for _ in range(args.count):
            await alice.send("bob", text, wait=False)
        while handled[0] < args.count:
            await asyncio.sleep(0.005)
        ticking[0] = False
        await tick
        pair_seconds = last[0] - t0
        round_trips = []
        for _ in range(args.total):
            r0 = now()
            await alice.request("bob", "ping", type="request", timeout=60)
            round_trips.append((now() - r0) * 1000)
        round_trips.sort()
        stalls.sort()
        emit(
            "RESULT",
            count=handled[0],
            seconds=pair_seconds,
            rate=handled[0] / pair_seconds if pair_seconds > 0 else 0.0,
            rtt_p50_ms=percentile(round_trips, 50),
            rtt_p99_ms=percentile(round_trips, 99),
            round_trips=len(round_trips),
            loop_stall_max_ms=(stalls[-1] * 1000) if stalls else 0.0,
            loop_stall_p99_ms=percentile(stalls, 99) * 1000,
        )


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", default=".")
    parser.add_argument("--id", default="alice")
    parser.add_argument("--peer", default="bob")
    parser.add_argument("--mode", default="online")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--prefix", default="x")
    parser.add_argument("--recipient-prefix", default="r")
    parser.add_argument("--ciphertext-len", type=int, default=320)
    parser.add_argument("--ids", default="")
    parser.add_argument("--total", type=int, default=0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--deadline", type=float, default=0.0)
    parser.add_argument("--unsigned", action="store_true", help="Agent(sign_messages=False)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    roles = {
        "receiver": receiver,
        "sender": sender,
        "loader": loader,
        "ingest": ingest,
        "sink": sink,
        "fleet": fleet,
        "idle": idle,
        "localpair": localpair,
        "asyncpair": asyncpair,
    }
    return run_role(lambda: roles[args.role](args))


if __name__ == "__main__":
    sys.exit(main())
