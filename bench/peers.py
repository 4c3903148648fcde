"""The peers measured beside AgentMesh: ``python -m bench.peers ROLE [options]``.

* RabbitMQ (aio-pika): a durable queue, persistent messages (delivery mode 2),
  publisher confirms with at most ``--window`` unconfirmed; consumers with
  manual acks and a prefetch of 256 (AgentMesh's push window).
* NATS JetStream (nats-py): a file-backed stream; ``publish_async`` with at
  most ``--window`` unacknowledged publishes; durable pull consumers fetching
  256 at a time and acking every message.
* SQLite: one process inserting a 200-byte row and committing, in a loop
  (WAL, ``synchronous=FULL``): what one durable commit per message costs.

Same payload (200 bytes), same concurrency as the AgentMesh scenario each is
compared with. Roles: ``probe``, ``prepare``, ``publish``, ``consume``,
``cleanup`` (all take ``--system rabbit|nats``), and ``sqlite``. Line protocol
as in :mod:`bench.worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import PAYLOAD_SIZE, emit, now, run_role, wait_command

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"
PREFETCH = 256


def _payload() -> bytes:
    return os.urandom(PAYLOAD_SIZE // 2).hex().encode()


async def _windowed(count: int, window: int, start: Callable[[int], Awaitable[Any]]) -> None:
    """Run ``start(i)`` for i < count with at most ``window`` unfinished at once."""
    free = asyncio.Semaphore(window)
    pending: set[asyncio.Future[Any]] = set()
    failures: list[BaseException] = []

    def finished(task: asyncio.Future[Any]) -> None:
        pending.discard(task)
        free.release()
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    for i in range(count):
        await free.acquire()
        if failures:
            raise failures[0]
        task = asyncio.ensure_future(start(i))
        pending.add(task)
        task.add_done_callback(finished)
    if pending:
        await asyncio.gather(*pending)
    if failures:
        raise failures[0]


# --- RabbitMQ ------------------------------------------------------------------------------------


async def _rabbit_probe() -> None:
    import aio_pika

    connection = await asyncio.wait_for(aio_pika.connect(RABBIT_URL), 5)
    await connection.close()


async def _rabbit_prepare(queues: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBIT_URL)
    channel = await connection.channel()
    for name in queues:
        queue = await channel.declare_queue(name, durable=True)
        await queue.purge()
    await connection.close()


async def _rabbit_cleanup(queues: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBIT_URL)
    channel = await connection.channel()
    for name in queues:
        await channel.queue_delete(name)
    await connection.close()


async def _rabbit_publish(queues: list[str], count: int, window: int, go: bool) -> dict[str, Any]:
    import aio_pika

    connections = [await aio_pika.connect(RABBIT_URL) for _ in queues]
    channels = [await c.channel(publisher_confirms=True) for c in connections]
    for channel, name in zip(channels, queues, strict=True):
        await channel.declare_queue(name, durable=True)
    body = _payload()
    emit("READY")
    if go:
        await asyncio.get_running_loop().run_in_executor(None, wait_command, "GO")
    t_first = now()

    async def one(channel: Any, name: str) -> float:
        exchange = channel.default_exchange

        def start(_: int) -> Awaitable[Any]:
            return exchange.publish(  # type: ignore[no-any-return]
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=name,
            )

        await _windowed(count, window, start)
        return now()

    ends = await asyncio.gather(*(one(ch, q) for ch, q in zip(channels, queues, strict=True)))
    for connection in connections:
        await connection.close()
    return {"t_first": t_first, "t_last": max(ends), "published": count * len(queues)}


async def _rabbit_consume(queues: list[str], expect: int, timeout: float) -> dict[str, Any]:
    import aio_pika

    start = now()  # like an agent's drain: connecting is part of it
    connections = [await aio_pika.connect(RABBIT_URL) for _ in queues]
    state = {"count": 0, "first": 0.0, "last": 0.0, "start": start}
    finished: list[asyncio.Future[None]] = []
    loop = asyncio.get_running_loop()
    for connection, name in zip(connections, queues, strict=True):
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(name, durable=True)
        done: asyncio.Future[None] = loop.create_future()
        finished.append(done)
        got = [0]

        async def on_message(
            message: Any, got: list[int] = got, done: asyncio.Future[None] = done
        ) -> None:
            await message.ack()
            t = now()
            if not state["count"]:
                state["first"] = t
            state["count"] += 1
            state["last"] = t
            got[0] += 1
            if got[0] >= expect and not done.done():
                done.set_result(None)

        await queue.consume(on_message)
    emit("READY")
    await asyncio.wait_for(asyncio.gather(*finished), timeout)
    for connection in connections:
        await connection.close()
    return {
        "count": state["count"],
        "t_start": state["start"],
        "t_first": state["first"],
        "t_last": state["last"],
    }


# --- NATS JetStream ------------------------------------------------------------------------------


def _stream(tag: str) -> str:
    return f"BENCH_{tag}"


async def _nats_probe() -> None:
    import nats

    nc = await asyncio.wait_for(
        nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0), 5
    )
    await nc.jetstream().account_info()
    await nc.close()


async def _nats_prepare(tag: str) -> None:
    import nats
    from nats.js.api import StorageType

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    try:
        await js.delete_stream(_stream(tag))
    except Exception:
        pass
    await js.add_stream(name=_stream(tag), subjects=[f"bench.{tag}.>"], storage=StorageType.FILE)
    await nc.close()


async def _nats_cleanup(tag: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().delete_stream(_stream(tag))
    finally:
        await nc.close()


async def _nats_publish(
    tag: str, queues: list[str], count: int, window: int, go: bool
) -> dict[str, Any]:
    import nats

    connections = [await nats.connect(NATS_URL) for _ in queues]
    contexts = [nc.jetstream(publish_async_max_pending=window) for nc in connections]
    body = _payload()
    emit("READY")
    if go:
        await asyncio.get_running_loop().run_in_executor(None, wait_command, "GO")
    t_first = now()

    async def one(js: Any, name: str) -> float:
        subject = f"bench.{tag}.{name}"
        futures = [await js.publish_async(subject, body) for _ in range(count)]
        await asyncio.gather(*futures)
        return now()

    ends = await asyncio.gather(*(one(js, q) for js, q in zip(contexts, queues, strict=True)))
    for nc in connections:
        await nc.close()
    return {"t_first": t_first, "t_last": max(ends), "published": count * len(queues)}


async def _nats_consume(tag: str, queues: list[str], expect: int, timeout: float) -> dict[str, Any]:
    import nats

    start = now()  # like an agent's drain: connecting is part of it
    connections = [await nats.connect(NATS_URL) for _ in queues]
    state = {"count": 0, "first": 0.0, "last": 0.0, "start": start}
    subscriptions = []
    for nc, name in zip(connections, queues, strict=True):
        js = nc.jetstream()
        subscriptions.append(
            await js.pull_subscribe(f"bench.{tag}.{name}", durable=f"c_{tag}_{name}")
        )
    emit("READY")

    async def one(subscription: Any) -> None:
        got = 0
        while got < expect:
            try:
                messages = await subscription.fetch(PREFETCH, timeout=1.0)
            except Exception as exc:  # nats.errors.TimeoutError: nothing yet
                if "Timeout" in type(exc).__name__:
                    continue
                raise
            for message in messages:
                await message.ack()
            t = now()
            if not state["count"]:
                state["first"] = t
            state["count"] += len(messages)
            state["last"] = t
            got += len(messages)

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in subscriptions)), timeout)
    for nc in connections:
        await nc.close()
    return {
        "count": state["count"],
        "t_start": state["start"],
        "t_first": state["first"],
        "t_last": state["last"],
    }


# --- SQLite --------------------------------------------------------------------------------------


def sqlite_loop(directory: Path, duration: float) -> dict[str, Any]:
    path = directory / "raw-loop.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS m (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    body = _payload()
    count = 0
    t0 = now()
    deadline = t0 + duration
    while True:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO m (body) VALUES (?)", (body,))
        db.execute("COMMIT")
        count += 1
        if count % 64 == 0 and now() >= deadline:
            break
    seconds = now() - t0
    db.close()
    return {"count": count, "seconds": seconds, "rate": count / seconds}


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("--system", default="rabbit")
    parser.add_argument("--tag", default="x")
    parser.add_argument("--queues", default="q0")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-go", action="store_true", help="publish at once, without GO")
    parser.add_argument("--dir", default=".")
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    queues = [f"bench_{args.tag}_{q}" for q in args.queues.split(",")]
    rabbit = args.system == "rabbit"

    def role() -> None:
        if args.role == "sqlite":
            emit("RESULT", **sqlite_loop(Path(args.dir), args.duration))
        elif args.role == "probe":
            asyncio.run(_rabbit_probe() if rabbit else _nats_probe())
            emit("RESULT", ok=True)
        elif args.role == "prepare":
            asyncio.run(_rabbit_prepare(queues) if rabbit else _nats_prepare(args.tag))
            emit("RESULT", ok=True)
        elif args.role == "cleanup":
            asyncio.run(_rabbit_cleanup(queues) if rabbit else _nats_cleanup(args.tag))
            emit("RESULT", ok=True)
        elif args.role == "publish":
            go = not args.no_go
            result = asyncio.run(
                _rabbit_publish(queues, args.count, args.window, go)
                if rabbit
                else _nats_publish(args.tag, queues, args.count, args.window, go)
            )
            emit("RESULT", **result)
        elif args.role == "consume":
            result = asyncio.run(
                _rabbit_consume(queues, args.expect, args.timeout)
                if rabbit
                else _nats_consume(args.tag, queues, args.expect, args.timeout)
            )
            emit("RESULT", **result)
        else:
            raise ValueError(f"unknown role {args.role!r}")

    return run_role(role)


if __name__ == "__main__":
    sys.exit(main())
