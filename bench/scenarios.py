"""The benchmark scenarios (issue 5). Each returns a JSON-safe dict of measurements.

Every network scenario starts its own hub process on a fresh SQLite file
(``bench.hubproc``: WAL, ``synchronous=FULL``) and runs sender, receiver and
hub as separate processes on loopback. Sizes shrink with ``--quick``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    HubProc,
    Proc,
    WorkerError,
    cpu_seconds,
    jain_index,
    now,
    raise_fd_limit,
    summarize_profile,
)


@dataclass
class Settings:
    work: Path
    quick: bool = False
    profile: Path | None = None
    fleet_duration: float = 60.0
    window: int = 1024
    crypto_duration: float = 0.5
    peers: bool = True
    repeat: int = 1
    _procs: list[Proc] = field(default_factory=list)

    def pick(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def dir(self, name: str) -> Path:
        path = self.work / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


@contextlib.contextmanager
def _processes() -> Iterator[list[Proc]]:
    """Close every process started in the block (hub last), whatever happens."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                proc.close()


def _worker(procs: list[Proc], d: Path, name: str, role: str, *args: str) -> Proc:
    proc = Proc("bench.worker", [role, "--dir", str(d), *args], name, d)
    procs.append(proc)
    return proc


def _peer(procs: list[Proc], d: Path, name: str, role: str, *args: str) -> Proc:
    proc = Proc("bench.peers", [role, "--dir", str(d), *args], name, d)
    procs.append(proc)
    return proc


#: Extra ``bench.hubproc`` arguments for every hub of the run (``--hub-uvloop``).
HUB_ARGS: list[str] = []


def _hub(procs: list[Proc], d: Path) -> HubProc:
    hub = HubProc(d, "hub", *HUB_ARGS)
    procs.append(hub)
    return hub


def _profile(s: Settings, scenario: str, procs: dict[str, Proc]) -> None:
    if s.profile is None:
        return
    s.profile.mkdir(parents=True, exist_ok=True)
    for role, proc in procs.items():
        proc.profile(s.profile / f"{scenario}-{role}.txt")


def _profiles(s: Settings, scenario: str, procs: dict[str, Proc]) -> dict[str, Any]:
    if s.profile is None:
        return {}
    out: dict[str, Any] = {}
    for role, proc in procs.items():
        proc.stop_profile()
        out[role] = summarize_profile(s.profile / f"{scenario}-{role}.txt", top=15)
    return out


# --- 1 and 2 -------------------------------------------------------------------------------------


def crypto_bound(s: Settings) -> dict[str, Any]:
    """Scenario 1: bench/crypto.py in this process; the bounds the other scenarios use."""
    from bench import crypto

    result = crypto.run(s.crypto_duration)
    messages = result["messages"]
    analysis = result["message_analysis"]
    signed = "seal+unseal 200 B, SessionRecord.decrypt, signed"
    unsigned = "seal+unseal 200 B, SessionRecord.decrypt, unsigned"
    return {
        "seal_unseal_signed": messages[signed]["ops_per_s"],
        "seal_unseal_unsigned": messages[unsigned]["ops_per_s"],
        "seal_us_signed": analysis[signed]["seal_us"],
        "unseal_us_signed": analysis[signed]["unseal_us"],
        "unseal_us_unsigned": analysis[unsigned]["unseal_us"],
        # The receiver's decrypt + verify: the bound of a pipeline whose sender and
        # receiver run in parallel (scenarios 3 and 5).
        "receiver_bound_signed": 1e6 / analysis[signed]["unseal_us"],
        "receiver_bound_unsigned": 1e6 / analysis[unsigned]["unseal_us"],
        "detail": result,
    }


def local_pair(s: Settings) -> dict[str, Any]:
    """Scenario 2: alice and bob on a durable LocalHub in one process."""
    d = s.dir("s2-localpair")
    count = s.pick(2000, 300)
    with _processes() as procs:
        pair = _worker(procs, d, "localpair", "localpair", "--count", str(count))
        pair.expect("READY", 120)
        result = pair.expect("RESULT", 600)
    return {"count": result["count"], "rate": result["count"] / result["seconds"]}


def async_pair(s: Settings) -> dict[str, Any]:
    """Scenario 10: two AsyncAgents over a hub process (the asyncio driver): the pair's
    pipelined rate, request/reply round trips, and the event loop's longest stall."""
    d = s.dir("s10-asyncpair")
    count = s.pick(1000, 300)
    with _processes() as procs:
        hub = _hub(procs, d)
        pair = _worker(
            procs,
            d,
            "asyncpair",
            "asyncpair",
            "--port",
            str(hub.port),
            "--count",
            str(count),
            "--total",
            str(s.pick(500, 100)),
        )
        pair.expect("READY", 180)
        result = pair.expect("RESULT", 900)
    return dict(result)


# --- 3 and 4 -------------------------------------------------------------------------------------


def network_pair(
    s: Settings,
    name: str,
    count: int,
    mode: str,
    rate: float = 0.0,
    profile: bool = False,
    unsigned: bool = False,
) -> dict[str, Any]:
    """One sender, one receiver, one hub: first send to last handled."""
    d = s.dir(name)
    extra = ["--unsigned"] if unsigned else []
    with _processes() as procs:
        hub = _hub(procs, d)
        port = str(hub.port)
        bob = _worker(
            procs,
            d,
            "bob",
            "receiver",
            "--port",
            port,
            "--id",
            "bob",
            "--peer",
            "alice",
            "--expect",
            str(count),
            *extra,
        )
        bob.expect("READY", 120)
        alice = _worker(
            procs,
            d,
            "alice",
            "sender",
            "--port",
            port,
            "--id",
            "alice",
            "--peer",
            "bob",
            "--count",
            str(count),
            "--mode",
            mode,
            "--rate",
            str(rate),
            *extra,
        )
        ready = alice.expect("READY", 120)
        watched = {"hub": hub, "sender": alice, "receiver": bob}
        if profile:
            _profile(s, name, watched)
        cpu0 = {role: cpu_seconds(proc.pid) for role, proc in watched.items()}
        alice.send("GO")
        sent = alice.expect("RESULT", 900)
        got = bob.expect("RESULT", 900)
        cpu1 = {role: cpu_seconds(proc.pid) for role, proc in watched.items()}
        profiles = _profiles(s, name, watched) if profile else {}
    seconds = got["t_last"] - sent["t_first"]
    return {
        "count": count,
        "handled": got["count"],
        "pipelined": ready.get("pipelined", False),
        "seconds": seconds,
        "rate": got["count"] / seconds if seconds > 0 else 0.0,
        "send_call_rate": count / (sent["t_sent"] - sent["t_first"]),
        "latency_ms": got["latency_ms"],
        # CPU time per message in each process, user and system (includes the warm-up).
        "cpu_us_per_message": {
            role: {
                kind: round((cpu1[role][i] - cpu0[role][i]) / max(got["count"], 1) * 1e6, 1)
                for i, kind in enumerate(("user", "system"))
            }
            for role in cpu0
        },
        "profile": profiles,
    }


# --- 5 and 9 -------------------------------------------------------------------------------------


def offline_drain(s: Settings, name: str, count: int, profile: bool = False) -> dict[str, Any]:
    """Queue ``count`` real envelopes for an offline bob; time his connect-to-last-handled."""
    d = s.dir(name)
    with _processes() as procs:
        hub = _hub(procs, d)
        port = str(hub.port)
        bob = _worker(
            procs, d, "bob-warm", "receiver", "--port", port, "--id", "bob", "--mode", "warm"
        )
        bob.expect("READY", 120)
        loader = _worker(
            procs,
            d,
            "loader",
            "loader",
            "--port",
            port,
            "--id",
            "alice",
            "--peer",
            "bob",
            "--count",
            str(count),
            "--window",
            str(s.window),
        )
        loader.expect("WARM", 120)
        bob.close()  # bob goes offline
        loader.send("GO")
        loaded = loader.expect("RESULT", 1800)
        queued = asyncio.run(_stats(hub.port)).get("queued", -1)
        drainer = _worker(
            procs,
            d,
            "bob",
            "receiver",
            "--port",
            port,
            "--id",
            "bob",
            "--mode",
            "drain",
            "--expect",
            str(count),
        )
        drainer.expect("READY", 120)
        watched = {"hub": hub, "receiver": drainer}
        if profile:
            _profile(s, name, watched)
        drainer.send("GO")
        got = drainer.expect("RESULT", 3600)
        profiles = _profiles(s, name, watched) if profile else {}
    seconds = got["t_last"] - got["t_start"]
    return {
        "queued": queued,
        "handled": got["count"],
        "seconds": seconds,
        "rate": got["count"] / seconds if seconds > 0 else 0.0,
        "connect_s": got["t_connected"] - got["t_start"],
        "load": loaded,
        "profile": profiles,
    }


async def _stats(port: int) -> dict[str, int]:
    from bench.rawclient import hub_stats

    return await hub_stats(port)


# --- 6 -------------------------------------------------------------------------------------------


def hub_ingest(s: Settings, online: bool, profile: bool = False) -> dict[str, Any]:
    """16 raw connections pushing pre-built envelopes; recipients offline or online."""
    name = "s6-ingest-online" if online else "s6-ingest-offline"
    d = s.dir(name)
    connections = 16
    per = s.pick(3000, 500) if online else s.pick(6000, 1000)
    conns = str(connections)
    with _processes() as procs:
        hub = _hub(procs, d)
        port = str(hub.port)
        sink = _worker(
            procs,
            d,
            "sink",
            "sink",
            "--port",
            port,
            "--prefix",
            "r",
            "--connections",
            conns,
            "--expect",
            str(per if online else 0),
        )
        sink.expect("READY", 300)
        if not online:
            sink.expect("RESULT", 60)
        ingest = _worker(
            procs,
            d,
            "ingest",
            "ingest",
            "--port",
            port,
            "--prefix",
            "s",
            "--recipient-prefix",
            "r",
            "--connections",
            conns,
            "--count",
            str(per),
            "--window",
            str(s.window),
        )
        ready = ingest.expect("READY", 300)
        watched: dict[str, Proc] = {"hub": hub}
        if profile:
            _profile(s, name, watched)
        ingest.send("GO")
        pushed = ingest.expect("RESULT", 1800)
        t_end = pushed["t_last"]
        result: dict[str, Any] = {
            "connections": connections,
            "envelopes": pushed["sent"],
            "envelope_bytes": ready["envelope_bytes"],
            "errors": pushed["errors"],
            "last_error": pushed["last_error"],
        }
        if online:
            got = sink.expect("RESULT", 1800)
            result["pushed"] = got["count"]
            # "store, push, ack, delete": the run ends when the hub holds nothing.
            while True:
                queued = asyncio.run(_stats(hub.port)).get("queued", -1)
                if queued <= 0:
                    break
                time.sleep(0.01)
            t_end = now()
            result["last_push_s"] = got["t_last"] - pushed["t_first"]
        profiles = _profiles(s, name, watched) if profile else {}
    seconds = t_end - pushed["t_first"]
    result["seconds"] = seconds
    result["rate"] = pushed["sent"] / seconds if seconds > 0 else 0.0
    result["profile"] = profiles
    return result


# --- 7 -------------------------------------------------------------------------------------------


def fleet(s: Settings) -> dict[str, Any]:
    """100 agents in 4 processes, each sending to random peers with the default send()."""
    d = s.dir("s7-fleet")
    total = s.pick(100, 20)
    duration = s.fleet_duration if not s.quick else min(s.fleet_duration, 5.0)
    with _processes() as procs:
        hub = _hub(procs, d)
        return fleet_on(procs, d, [hub.port], total, duration, nprocs=4)


def fleet_on(
    procs: list[Proc], d: Path, ports: list[int], total: int, duration: float, nprocs: int
) -> dict[str, Any]:
    """Scenario 7's fleet on running hubs: worker process ``p`` dials ``ports[p % len]``."""
    ids = [f"fleet{i:03d}" for i in range(total)]
    workers = [
        _worker(
            procs,
            d,
            f"fleet{p}",
            "fleet",
            "--port",
            str(ports[p % len(ports)]),
            "--ids",
            ",".join(ids[p::nprocs]),
            "--total",
            str(total),
            "--duration",
            str(duration),
            "--seed",
            str(p + 1),
        )
        for p in range(nprocs)
    ]
    for worker in workers:
        worker.expect("READY", 600)
    for worker in workers:
        worker.send("GO")
    sent = [w.expect("SENT", duration + 600) for w in workers]
    time.sleep(3.0)  # let the last deliveries land
    for worker in workers:
        worker.send("REPORT")
    results = [w.expect("RESULT", 120) for w in workers]
    per_sent: dict[str, int] = {}
    per_received: dict[str, int] = {}
    failed = 0
    for r in results:
        per_sent.update(r["sent"])
        per_received.update(r["received"])
        failed += sum(r["failed"].values())
    t_start = min(x["t_start"] for x in sent)
    t_end = max(x["t_end"] for x in sent)
    sent_values = [float(per_sent[i]) for i in ids]
    recv_values = [float(per_received[i]) for i in ids]
    seconds = t_end - t_start
    return {
        "agents": total,
        "seconds": seconds,
        "sent": int(sum(sent_values)),
        "received": int(sum(recv_values)),
        "failed": failed,
        "rate": sum(sent_values) / seconds if seconds > 0 else 0.0,
        "sent_min": min(sent_values),
        "sent_max": max(sent_values),
        "jain_sent": jain_index(sent_values),
        "jain_received": jain_index(recv_values),
    }


# --- 8 -------------------------------------------------------------------------------------------


def connections(s: Settings) -> dict[str, Any]:
    """5,000 idle authenticated agents: hub RSS and login rate."""
    d = s.dir("s8-connections")
    total = s.pick(5000, 500)
    nprocs = 4
    raise_fd_limit(2 * total + 4096)  # the hub and the client processes inherit it
    with _processes() as procs:
        hub = _hub(procs, d)
        rss_before = hub.rss()
        share = [total // nprocs + (1 if p < total % nprocs else 0) for p in range(nprocs)]
        workers = [
            _worker(
                procs,
                d,
                f"idle{p}",
                "idle",
                "--port",
                str(hub.port),
                "--prefix",
                f"idle{p}-",
                "--count",
                str(share[p]),
                "--concurrency",
                "128",
            )
            for p in range(nprocs)
        ]
        for worker in workers:
            worker.expect("READY", 600)
        for worker in workers:
            worker.send("GO")
        results = [w.expect("RESULT", 1800) for w in workers]
        time.sleep(2.0)
        rss_after = hub.rss()
        stats = asyncio.run(_stats(hub.port))
    ok = sum(r["ok"] for r in results)
    seconds = max(r["t_last"] for r in results) - min(r["t_first"] for r in results)
    return {
        "agents": total,
        "logged_in": ok,
        "failed": sum(r["failed"] for r in results),
        "failure": next((r["failure"] for r in results if r["failure"]), ""),
        "hub_connections": stats.get("connections", -1),
        "rss_before_mb": rss_before / 2**20,
        "rss_mb": rss_after / 2**20,
        "rss_per_connection_kb": (rss_after - rss_before) / max(ok, 1) / 1024,
        "login_seconds": seconds,
        "login_rate": ok / seconds if seconds > 0 else 0.0,
    }


# --- peers ---------------------------------------------------------------------------------------


def _probe(system: str, d: Path) -> str | None:
    """None if the service answers, else why it is skipped."""
    try:
        import aio_pika  # noqa: F401
        import nats  # noqa: F401
    except ImportError as exc:
        return f"client not installed ({exc.name}); pip install -e '.[bench]'"
    with _processes() as procs:
        probe = _peer(procs, d, f"{system}-probe", "probe", "--system", system)
        try:
            probe.expect("RESULT", 30)
        except WorkerError as exc:
            first = str(exc).splitlines()[0]
            where = (
                "RabbitMQ at 127.0.0.1:5672"
                if system == "rabbit"
                else ("NATS JetStream at 127.0.0.1:4222")
            )
            return f"{where} not reachable ({first.split(': ', 1)[-1][:80]})"
    return None


def peer(s: Settings, system: str) -> dict[str, Any]:
    """One peer broker: pair, 16-connection publish+consume, 16-connection ingest, drain."""
    d = s.dir(f"peer-{system}")
    reason = _probe(system, d)
    if reason is not None:
        return {"skipped": reason}
    out: dict[str, Any] = {}
    win = str(s.window)
    sysarg = ["--system", system]

    def run(tag: str, queues: list[str], count: int, consume: bool, drain: bool) -> dict[str, Any]:
        common = [*sysarg, "--tag", tag, "--queues", ",".join(queues)]
        with _processes() as procs:

            def publisher(*extra: str) -> Proc:
                return _peer(
                    procs, d, f"{tag}-pub", "publish", *common,
                    "--count", str(count), "--window", win, *extra,
                )  # fmt: skip

            def consumer() -> Proc:
                return _peer(procs, d, f"{tag}-cons", "consume", *common, "--expect", str(count))

            _peer(procs, d, f"{tag}-prep", "prepare", *common).expect("RESULT", 60)
            try:
                if drain:
                    publisher("--no-go").expect("RESULT", 1800)
                    got = consumer().expect("RESULT", 1800)
                    seconds = got["t_last"] - got["t_start"]
                    return {
                        "count": got["count"],
                        "seconds": seconds,
                        "rate": got["count"] / seconds,
                    }
                cons: Proc | None = None
                if consume:
                    cons = consumer()
                    cons.expect("READY", 120)
                pub = publisher()
                pub.expect("READY", 120)
                pub.send("GO")
                published = pub.expect("RESULT", 1800)
                end = published["t_last"]
                total = published["published"]
                if cons is not None:
                    got = cons.expect("RESULT", 1800)
                    end = max(end, got["t_last"])
                    total = got["count"]
                seconds = end - published["t_first"]
                return {"count": total, "seconds": seconds, "rate": total / seconds}
            finally:
                _peer(procs, d, f"{tag}-clean", "cleanup", *common).expect("RESULT", 60)

    sixteen = [f"q{i}" for i in range(16)]
    try:
        out["pair"] = run("pair", ["q0"], s.pick(20000, 2000), consume=True, drain=False)
        out["online16"] = run("on16", sixteen, s.pick(3000, 500), consume=True, drain=False)
        out["ingest16"] = run("in16", sixteen, s.pick(6000, 1000), consume=False, drain=False)
        out["drain"] = run("drain", ["q0"], s.pick(20000, 5000), consume=False, drain=True)
    except WorkerError as exc:
        out["error"] = str(exc).splitlines()[0]
    return out


def sqlite_peer(s: Settings) -> dict[str, Any]:
    d = s.dir("peer-sqlite")
    with _processes() as procs:
        loop = _peer(procs, d, "sqlite", "sqlite", "--duration", "1.0" if s.quick else "3.0")
        return loop.expect("RESULT", 120)
