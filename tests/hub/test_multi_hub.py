"""Several hub subprocesses on one PostgreSQL database (docs/SCALING.md).

Each test gets a fresh database (LISTEN/NOTIFY channels are per database) and
two or three real ``agentmesh-hub`` processes on it: cross-hub delivery while
both agents stay online, the one-live-session rule across hubs, and failover
of a client with ``servers=[...]`` after a SIGKILL of its hub while a sender
streams (``NetworkHub``, and ``AsyncAgent`` on ``AsyncNetworkHub``). Skipped,
like the other PostgreSQL tests, without a reachable server.
Waits are bounded polls; nothing asserts a timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import Inbox
from hubproc import HubProcess, wait_until
from pgschema import fresh_pg_database
from sqlalchemy import create_engine, text
from test_server import FakeEndpoint

from agentmesh import Agent, AsyncAgent, AsyncNetworkHub, NetworkHub
from agentmesh.errors import ConfigurationError
from agentmesh.hub.server import HubOptions, default_hub_id
from agentmesh.hub.store import EnqueueStatus, HubStore, NewEnvelope
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(180)

#: Short leases so a dead hub's agents move on quickly; frequent catch-ups.
FAST = ("--lease-ttl", "2", "--catchup-interval", "0.5", "--purge-interval", "3600")


@pytest.fixture
def pg_db() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def start_hubs(tmp_path: Path, pg_db: str) -> Iterator[Any]:
    started: list[HubProcess] = []

    def start(count: int, *args: str) -> list[HubProcess]:
        hubs = [
            HubProcess(tmp_path / f"hub{len(started) + i}", *args, db=pg_db) for i in range(count)
        ]
        for hub in hubs:
            started.append(hub.start())
        return hubs

    yield start
    for hub in started:
        hub.stop()


def client(*hubs: HubProcess, cls: type[NetworkHub] = NetworkHub) -> NetworkHub:
    return cls(
        servers=[f"127.0.0.1:{hub.port}" for hub in hubs],
        connect_timeout=5.0,
        ack_timeout=20.0,
        reconnect_initial=0.05,
        reconnect_max=0.3,
    )


def logins(hub: HubProcess, agent_id: str) -> int:
    return hub.log().count(f"{agent_id} logged in from")


def lease_holder(url: str, agent_id: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(
                text("SELECT hub_id FROM agent_leases WHERE agent_id = :a"), {"a": agent_id}
            )
    finally:
        engine.dispose()


def queued(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(text("SELECT COUNT(*) FROM envelopes")) or 0)
    finally:
        engine.dispose()


def test_cross_hub_delivery_while_online(start_hubs: Any, tmp_path: Path) -> None:
    # No periodic catch-up within the test: only the NOTIFY wake-up can deliver.
    a, b = start_hubs(2, "--lease-ttl", "30", "--catchup-interval", "3600")
    with client(a) as via_a, client(b) as via_b:
        alice = Agent("alice", hub=via_a, keypair_path=tmp_path / "alice.json")
        bob = Agent("bob", hub=via_b, keypair_path=tmp_path / "bob.json")
        to_bob, to_alice = Inbox(), Inbox()
        bob.on_message(to_bob)
        alice.on_message(to_alice)
        for i in range(30):
            alice.send("bob", text=f"m{i}")
        wait_until(lambda: len(to_bob) == 30, what="bob gets alice's messages through hub A")
        assert to_bob.texts == [f"m{i}" for i in range(30)]
        reply = threading.Thread(target=lambda: bob.send("alice", text="back"))
        reply.start()
        reply.join(30)
        wait_until(lambda: to_alice.texts == ["back"], what="alice gets bob's reply via hub B")
        # Neither reconnected: each logged in once, on its own hub.
        assert (logins(a, "alice"), logins(b, "bob")) == (1, 1)
        assert (logins(b, "alice"), logins(a, "bob")) == (0, 0)
        alice.close()
        bob.close()


def test_three_hubs_fan_in(start_hubs: Any, tmp_path: Path) -> None:
    hubs = start_hubs(3, *FAST)
    clients = [client(hub) for hub in hubs]
    try:
        sink = Agent("sink", hub=clients[0], keypair_path=tmp_path / "sink.json")
        inbox = Inbox()
        sink.on_message(inbox)
        senders = [
            Agent(f"s{i}", hub=clients[i], keypair_path=tmp_path / f"s{i}.json") for i in range(3)
        ]
        for n in range(10):
            for sender in senders:
                sender.send("sink", text=f"{sender.agent_id}:{n}")
        wait_until(lambda: len(inbox) == 30, what="30 messages from three hubs")
        for sender in senders:  # per-sender order holds
            mine = [t for t in inbox.texts if t.startswith(f"{sender.agent_id}:")]
            assert mine == [f"{sender.agent_id}:{n}" for n in range(10)]
        for agent in [sink, *senders]:
            agent.close()
    finally:
        for each in clients:
            each.close()


def test_one_live_session_per_agent_across_hubs(start_hubs: Any, pg_db: str) -> None:
    a, b = start_hubs(2, *FAST)
    sender = FakeEndpoint("sender")
    first = FakeEndpoint("carol")
    second = FakeEndpoint("carol", identity=first.identity)  # the same agent, elsewhere
    with client(a) as via_a, client(b) as via_b, client(a) as sender_hub:
        sender_hub.register(sender)
        via_a.register(first)
        wait_until(lambda: lease_holder(pg_db, "carol") is not None, what="carol's lease")
        sent = [sender.send(sender_hub, "carol") for _ in range(5)]
        wait_until(first.got(5), what="carol on hub A gets the first five")
        wait_until(lambda: queued(pg_db) == 0, what="and acknowledges them")

        via_b.register(second)  # replaces the session on hub A
        wait_until(lambda: "logged in on another hub" in a.log(), what="hub A lets carol go")
        wait_until(
            lambda: (lease_holder(pg_db, "carol") or "").endswith(f":{b.port}"),
            what="hub B holds carol's lease",
        )
        later = [sender.send(sender_hub, "carol") for _ in range(10)]
        wait_until(second.got(10), what="carol on hub B gets the next ten")
        assert first.received == sent  # nothing after the login on hub B
        assert second.received == later  # each pushed once, in order, to one session
        assert not set(first.received) & set(second.received)


def test_failover_after_kill_of_the_recipients_hub(start_hubs: Any, tmp_path: Path) -> None:
    a, b = start_hubs(2, *FAST)
    total = 300
    with client(a, b) as bob_hub, client(b, a) as alice_hub:
        bob = Agent("bob", hub=bob_hub, keypair_path=tmp_path / "bob.json")
        inbox = Inbox()
        bob.on_message(inbox)
        alice = Agent("alice", hub=alice_hub, keypair_path=tmp_path / "alice.json")
        assert logins(a, "bob") == 1  # bob is on hub A, the first of his servers

        def stream() -> None:
            for i in range(total):
                alice.send("bob", text=str(i), wait=i % 3 != 0)

        streamer = threading.Thread(target=stream)
        streamer.start()
        wait_until(lambda: len(inbox) >= total // 4, what="a quarter delivered")
        a.kill()  # bob's hub dies mid-stream
        streamer.join(120)
        assert not streamer.is_alive()
        assert alice.flush(60)
        wait_until(lambda: len(inbox) >= total, timeout=60, what="bob gets the rest via hub B")
        wait_until(lambda: logins(b, "bob") >= 1, what="bob moved to hub B")
        texts = [int(t) for t in inbox.texts]
        assert texts == list(range(total))  # 0 lost, 0 duplicated, order kept
        # Hub B waited for dead hub A's lease to expire before pushing to bob.
        assert "bob is online on hub" in b.log()
        alice.close()
        bob.close()


def test_async_agent_fails_over_on_its_own_loop(start_hubs: Any, tmp_path: Path) -> None:
    """An AsyncAgent on AsyncNetworkHub(servers=[a, b]), its connection on the test's
    event loop: after a SIGKILL of hub A it reconnects to B, and nothing is lost,
    duplicated or reordered in either direction."""
    a, b = start_hubs(2, *FAST)
    total = 300
    with client(b) as bob_hub:
        bob = Agent("bob", hub=bob_hub, keypair_path=tmp_path / "bob.json")
        inbox = Inbox()
        bob.on_message(inbox)

        async def until(condition: Any, what: str, timeout: float = 60.0) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not condition():
                assert loop.time() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.01)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            hub = AsyncNetworkHub(
                servers=[f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
                connect_timeout=5.0,
                ack_timeout=20.0,
                reconnect_initial=0.05,
                reconnect_max=0.3,
            )
            async with (
                hub,
                AsyncAgent("alice", hub=hub, keypair_path=tmp_path / "alice.json") as alice,
            ):
                from_bob: list[int] = []
                alice.on_message(lambda m: from_bob.append(int(m.text)))
                assert logins(a, "alice") == 1  # on hub A, the first of its servers
                assert hub._links["alice"].loop is loop
                for i in range(total):
                    if i == total // 4:
                        a.kill()  # alice's hub dies mid-stream
                    await alice.send("bob", text=str(i), wait=i % 3 != 0)
                assert await alice.flush(60)
                await until(lambda: len(inbox) >= total, "bob gets every message via hub B")
                assert logins(b, "alice") >= 1
                link = hub._links["alice"]
                assert link.transport is not None and link.transport.lost.get_loop() is loop
                # And back, through hub B, to the agent that moved there.
                await loop.run_in_executor(
                    None, lambda: [bob.send("alice", text=str(i)) for i in range(50)]
                )
                await until(lambda: len(from_bob) >= 50, "alice gets bob's messages via hub B")
                assert from_bob == list(range(50))

        asyncio.run(main())
        assert [int(t) for t in inbox.texts] == list(range(total))  # 0 lost, 0 duplicated
        bob.close()


def test_a_restarted_hub_frees_the_leases_of_its_previous_run(
    start_hubs: Any, pg_db: str, tmp_path: Path
) -> None:
    (a,) = start_hubs(1, "--lease-ttl", "3600", "--catchup-interval", "0.5")
    with client(a) as via_a:
        bob = Agent("bob", hub=via_a, keypair_path=tmp_path / "bob.json")
        inbox = Inbox()
        bob.on_message(inbox)
        wait_until(lambda: lease_holder(pg_db, "bob") is not None, what="bob's lease")
        a.kill()
        a.start()  # same port, so the same hub id: an hour-long lease is no obstacle
        assert "freed 1 agent leases held by this hub's previous run" in a.log()
        with client(a) as sender_hub:
            alice = Agent("alice", hub=sender_hub, keypair_path=tmp_path / "alice.json")
            alice.send("bob", text="after the restart")
            wait_until(lambda: inbox.texts == ["after the restart"], what="bob receives again")
            alice.close()
        bob.close()


def test_the_periodic_catch_up_delivers_without_a_notification(start_hubs: Any, pg_db: str) -> None:
    (a,) = start_hubs(1, *FAST)
    carol = FakeEndpoint("carol")
    with client(a) as via_a:
        via_a.register(carol)
        wait_until(lambda: lease_holder(pg_db, "carol") is not None, what="carol's lease")
        # A writer that sends no NOTIFY (as if the notification were lost).
        data = carol.envelope("carol", sender="dave")
        with HubStore(pg_db) as silent:
            stored = silent.enqueue(
                [NewEnvelope(decode_envelope(data).message_id, "dave", "carol", data, 10**15)],
                now_ms=1,
                max_count_per_recipient=100,
                max_bytes_per_recipient=10**6,
            )
        assert stored[0].status is EnqueueStatus.STORED
        wait_until(carol.got(1), what="the catch-up finds carol's mail")


def test_the_listener_reconnects_and_catches_up(start_hubs: Any, pg_db: str) -> None:
    # No periodic catch-up: only the listener (and its catch-up on reconnect) delivers.
    a, b = start_hubs(2, "--lease-ttl", "30", "--catchup-interval", "3600")
    sender, carol = FakeEndpoint("sender"), FakeEndpoint("carol")
    with client(a) as via_a, client(b) as via_b:
        via_a.register(sender)
        via_b.register(carol)
        sender.send(via_a, "carol")
        wait_until(carol.got(1), what="the first message, woken by NOTIFY")
        engine = create_engine(pg_db)
        try:
            with engine.connect() as conn:
                killed = conn.scalar(
                    text(
                        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'agentmesh-hub-listener' "
                        "AND datname = current_database()"
                    )
                )
        finally:
            engine.dispose()
        assert killed == 2
        for _ in range(5):
            sender.send(via_a, "carol")
        wait_until(carol.got(6), what="the rest, after the listeners reconnected")
        wait_until(lambda: "hub listener lost its database connection" in b.log())


def test_servers_input_is_checked() -> None:
    with pytest.raises(ValueError, match="at least one"):
        NetworkHub(servers=[])
    with pytest.raises(ValueError, match="HOST:PORT"):
        NetworkHub(servers=["no-port"])
    with pytest.raises(ValueError, match="listed twice"):
        NetworkHub(servers=["h:1", "h:1"])
    with pytest.raises(ValueError, match="not both"):
        NetworkHub("h", 1, servers=["h:1"])
    with pytest.raises(ValueError, match="list of"):
        NetworkHub(servers="h:1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a host"):
        NetworkHub()
    hub = AsyncNetworkHub(servers=["a.example:7700", "[::1]:7701"])
    assert hub.servers == (("a.example", 7700), ("::1", 7701))
    assert (hub.host, hub.port, hub.dialled_address) == ("a.example", 7700, "a.example:7700")


def test_multi_hub_options_are_checked() -> None:
    for bad in ({"hub_id": "has space"}, {"hub_id": ""}, {"hub_id": "x" * 129}):
        with pytest.raises(ConfigurationError, match="hub_id"):
            HubOptions(**bad)  # type: ignore[arg-type]
    for name in ("lease_ttl_s", "catchup_interval_s"):
        with pytest.raises(ConfigurationError, match=name):
            HubOptions(**{name: 0})  # type: ignore[arg-type]
    assert HubOptions(hub_id="hub-1.example:7700").hub_id == "hub-1.example:7700"
    assert default_hub_id(7700).endswith(":7700")
    HubOptions(hub_id=default_hub_id(7700))  # the default is always a valid id
