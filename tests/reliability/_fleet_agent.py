"""One agent of the crash-matrix fleet, in its own process (not a test module).

Usage::

    python _fleet_agent.py --id a3 --dir DIR --port PORT --peers a0,a1,... \
        --count 250 --seed 1 --incarnation 4 [--handler-delay 0.002] [--async]

(``--servers 127.0.0.1:P1,127.0.0.1:P2`` instead of ``--port``: several hubs on
one PostgreSQL, ``NetworkHub(servers=[...])``.)

Runs ``Agent(ID, hub=NetworkHub("127.0.0.1", PORT), keypair_path=DIR/ID.json)``
(with ``--async``, an ``AsyncAgent`` with an async handler, on an event loop thread)
and sends ``--count`` messages, message ``n`` to a peer picked by a
:class:`random.Random` seeded with ``(seed, id)``, so every incarnation
computes the same schedule. It records, durably (append, flush, fsync), one
line per event in ``DIR/ID.log``:

``boot INC``                  the process started (incarnation INC)
``ready INC``                 the agent is registered and its handler installed
``attempt PEER N``            about to call ``send()`` for message N (before it)
``sent PEER N``               ``send()`` for message N returned (only after it)
``failed PEER N ERROR``       ``send()`` raised; N is never sent again
``start INC SENDER N``        the handler was entered for SENDER's message N
``done INC SENDER N``         the handler is about to return
``finished INC``              every message of the schedule was attempted
``exit INC``                  clean exit after SIGTERM

A restarted incarnation resumes after the highest ``attempt``: a message whose
``send()`` was interrupted may already sit in the outbox (and be delivered),
so its number is never reused. ``DIR/ID.status`` (JSON, replaced atomically a
few times a second) carries the outbox and inbox sizes for the drain check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agentmesh import Agent, AsyncAgent, Message, NetworkHub
from agentmesh.errors import AgentMeshError, StateLockedError

#: Bounded waits (seconds): a worker never hangs forever, whatever the hub does.
REGISTER_DEADLINE_S = 120.0
PEERS_DEADLINE_S = 60.0


class Recorder:
    """Appends lines to the log with flush + fsync (one write per line)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __call__(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode())
        os.fsync(self._fd)


def schedule(seed: int, agent_id: str, peers: list[str], count: int) -> list[str]:
    rng = random.Random(f"{seed}:{agent_id}")
    return [rng.choice(peers) for _ in range(count)]


def resume_point(log: Path) -> int:
    """1 + the highest message number this agent ever attempted (0 if none)."""
    if not log.exists():
        return 0
    last = -1
    for line in log.read_text(encoding="utf-8").split("\n"):
        parts = line.split()
        if len(parts) == 3 and parts[0] == "attempt":
            last = max(last, int(parts[2]))
    return last + 1


def write_status(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".status.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


class AsyncFleetAgent:
    """What main() uses of an Agent (send, status, list_peers, close), over an
    AsyncAgent whose loop runs on its own thread; the handler is async."""

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="fleet-loop", daemon=True).start()

    def __init__(
        self,
        me: str,
        hub: NetworkHub,
        key: Path,
        handle: Callable[[Message], Coroutine[Any, Any, None]],
    ) -> None:
        self.agent = AsyncAgent(me, hub=hub, keypair_path=key)
        self.agent.on_message(handle)
        self._call(self.agent.start())  # raises like Agent(...) while the hub is down

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def send(self, to: str, text: str, **kwargs: Any) -> str:
        return self._call(self.agent.send(to, text, **kwargs))  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return self.agent.status()

    def list_peers(self) -> list[str]:
        return self._call(self.agent.list_peers())  # type: ignore[no-any-return]

    def close(self) -> None:
        self._call(self.agent.close())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--servers", help="HOST:PORT,HOST:PORT,... (instead of --port)")
    parser.add_argument("--peers", required=True)
    parser.add_argument("--count", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--incarnation", required=True, type=int)
    parser.add_argument("--handler-delay", type=float, default=0.0)
    parser.add_argument("--async", dest="use_async", action="store_true")
    args = parser.parse_args()

    me, inc = args.id, args.incarnation
    log_path = args.dir / f"{me}.log"
    status_path = args.dir / f"{me}.status"
    record = Recorder(log_path)
    record(f"boot {inc}")
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

    peers = [p for p in args.peers.split(",") if p and p != me]
    plan = schedule(args.seed, me, peers, args.count)
    first = resume_point(log_path)

    def handle(msg: Message) -> None:
        seq = int(msg.payload["seq"])
        record(f"start {inc} {msg.sender} {seq}")
        if args.handler_delay:
            time.sleep(args.handler_delay)
        record(f"done {inc} {msg.sender} {seq}")

    async def handle_async(msg: Message) -> None:
        seq = int(msg.payload["seq"])
        record(f"start {inc} {msg.sender} {seq}")
        if args.handler_delay:
            await asyncio.sleep(args.handler_delay)
        record(f"done {inc} {msg.sender} {seq}")

    where: dict[str, Any] = (
        {"servers": args.servers.split(",")} if args.servers else {"host": "127.0.0.1"}
    )
    hub = NetworkHub(
        port=args.port or 7700,
        **where,
        connect_timeout=2.0,
        ack_timeout=10.0,
        request_timeout=10.0,
        reconnect_initial=0.05,
        reconnect_max=0.5,
    )
    agent: Agent | AsyncFleetAgent | None = None
    deadline = time.monotonic() + REGISTER_DEADLINE_S
    while agent is None and not stopping:
        try:
            key = args.dir / f"{me}.json"
            if args.use_async:
                agent = AsyncFleetAgent(me, hub, key, handle_async)
            else:
                agent = Agent(me, hub=hub, keypair_path=key)
                agent.on_message(handle)
        except StateLockedError:
            raise
        except AgentMeshError:
            # The hub is down or restarting: the agent's files are untouched; retry.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    if agent is None:
        return 0
    record(f"ready {inc}")

    def status(finished: bool) -> None:
        assert agent is not None
        st = agent.status()
        counts = {"outbox": st["outbox"], "inbox": st["inbox_pending"]}
        write_status(status_path, {"inc": inc, "finished": finished, **counts})

    # Wait (bounded) until every peer is bound on the hub, so early sends are not refused.
    deadline = time.monotonic() + PEERS_DEADLINE_S
    while first < args.count and not stopping and time.monotonic() < deadline:
        try:
            if set(peers) <= set(agent.list_peers()):
                break
        except AgentMeshError:
            pass
        time.sleep(0.1)

    for seq in range(first, args.count):
        if stopping:
            break
        to = plan[seq]
        record(f"attempt {to} {seq}")
        try:
            agent.send(to, f"{me}:{seq}", seq=seq)
        except (AgentMeshError, ValueError) as exc:
            # Hub down before a session existed, or the hub refused it: N is spent.
            record(f"failed {to} {seq} {type(exc).__name__}")
            time.sleep(0.1)
            continue
        record(f"sent {to} {seq}")
        if agent.status()["outbox"]:
            time.sleep(0.1)  # the hub is unreachable: don't race through the plan
    else:
        record(f"finished {inc}")

    last_status = 0.0
    while not stopping:
        now = time.monotonic()
        if now - last_status >= 0.2:
            status(finished=True)
            last_status = now
        time.sleep(0.05)
    agent.close()
    hub.close()
    record(f"exit {inc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
