"""Fuzz a live hub with random and mutated frames while real agents talk through it.

Usage (from the repository root)::

    python tests/reliability/fuzz_hub.py --frames 100000 --seed 1 [--workers 16] [--json]

Starts ``python -m agentmesh.hub_server`` on 127.0.0.1 (a fresh database in a
temporary folder), connects two real ``Agent`` s through ``NetworkHub`` that
exchange numbered messages for the whole run, and opens many connections
(``--workers`` at a time), each carrying one scenario drawn from
``random.Random(seed)``:

``random``         random bytes
``mutated``        a valid frame of any type with one byte changed, cut or spliced
``field``          a valid frame with one field replaced by a boundary value
``truncated``      the first bytes of a valid frame, then the connection closes
``oversized``      a length prefix above the hub's limit, or a big partial frame
``anonymous``      valid anonymous requests (LIST_AGENTS, GET_STATS, PING), then garbage
``login_garbage``  a valid signed LOGIN, then random or mutated frames
``login_hostile``  a valid LOGIN, then well-formed hostile requests: SENDs with forged
                   senders, unknown or legitimate recipients and junk ciphertext
                   (the legitimate agents must drop them), ACKs of random ids, bundle
                   fetches, junk prekeys and bundles, bad key rotations

It checks that the hub process stays up, that its resident memory stays
bounded (``VmRSS`` from ``/proc/<pid>/status``, sampled throughout), that it
logged no traceback, and that the legitimate agents lost nothing (every
``send()`` that returned is handled exactly once, in order). Exit status 0
when all hold. Every frame is one count of ``--frames`` (a random chunk counts
as one). Inputs in flight when something broke are written to ``--triage``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentmesh import Agent, Message
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeySecrets
from agentmesh.errors import AgentMeshError
from agentmesh.protocol import hub_protocol as hp
from agentmesh.wire import frames as f
from agentmesh.wire.envelope import RatchetHeader, encode_header

KINDS = (
    "random",
    "mutated",
    "field",
    "truncated",
    "oversized",
    "anonymous",
    "login_garbage",
    "login_hostile",
)
LEGIT = ("alice", "bob")
FUZZERS = tuple(f"fuzz-{i}" for i in range(8))
IO_TIMEOUT_S = 5.0


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


# --- inputs ----------------------------------------------------------------


def _sample_frames(identity: IdentityKeyPair) -> list[bytes]:
    secrets = PrekeySecrets.create(identity, 1_700_000_000_000)
    secrets.top_up(identity, 1_700_000_000_000, pool_size=2)
    bundle = secrets.bundle("fuzz-0", identity.public).encode()
    prekeys = tuple(k.public.encode() for k in secrets.one_time.values())
    mid = bytes(range(16))
    frames: list[f.Frame] = [
        f.Hello(1, bytes(32), "127.0.0.1:1", 1 << 20, 1 << 20),
        f.Login(1, 1, "fuzz-0", identity.public.signing, bytes(64), bundle),
        f.LoggedIn(1, True),
        f.RotateKey(2, bytes(32), bytes(64), bytes(64)),
        f.Ok(3),
        f.Error(4, "bad_frame", "x", mid, True),
        f.Ping(5),
        f.Pong(5),
        f.PublishBundle(6, bundle),
        f.UploadPrekeys(7, prekeys),
        f.FetchBundle(8, "alice"),
        f.Bundle(8, bundle),
        f.PrekeysLow(1),
        f.Send(9, _envelope("fuzz-0", "bob", random.Random(0))),
        f.SendAck(9, mid),
        f.Push(10, mid, bytes(64)),
        f.Ack((mid,)),
        f.ListAgents(11),
        f.Agents(11, ("alice", "bob")),
        f.GetStats(12),
        f.Stats.from_mapping(12, {"queued": 1}),
    ]
    return [f.encode_frame(frame) for frame in frames]


def _envelope(sender: str, recipient: str, rng: random.Random, size: int = 48) -> bytes:
    header = encode_header(
        rng.randbytes(16),
        int(time.time() * 1000),
        sender,
        recipient,
        RatchetHeader(rng.randbytes(32), rng.randrange(4), rng.randrange(4)),
        None,
    )
    return header + size.to_bytes(4, "big") + rng.randbytes(size)


def mutate(data: bytes, rng: random.Random) -> bytes:
    raw = bytearray(data)
    how = rng.choice(("flip", "cut", "insert", "splice"))
    i = rng.randrange(max(1, len(raw)))
    if how == "flip" and raw:
        raw[i] ^= rng.randrange(1, 256)
    elif how == "cut":
        del raw[i:]
    elif how == "insert":
        raw[i:i] = rng.randbytes(rng.randrange(1, 9))
    else:
        chunk = rng.randbytes(rng.randrange(1, 17))
        raw[i : i + len(chunk)] = chunk
    return bytes(raw)


def replace_field(data: bytes, rng: random.Random) -> bytes:
    """Keep the length prefix and type; set 1, 2, 4 or 8 body bytes to a boundary value."""
    raw = bytearray(data)
    if len(raw) <= 5:
        return bytes(raw)
    i = rng.randrange(5, len(raw))
    width = rng.choice((1, 2, 4, 8))
    raw[i : i + width] = bytes([rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01))]) * width
    return bytes(raw[: len(data)])


@dataclass
class Scenario:
    kind: str
    chunks: list[bytes]
    login_as: str | None = None


class Inputs:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.identities = {name: IdentityKeyPair.generate() for name in FUZZERS}
        self.samples = _sample_frames(self.identities["fuzz-0"])
        publish = f.FrameDecoder().feed(self.samples[8])[0]
        assert isinstance(publish, f.PublishBundle)
        self.bundle = publish.bundle
        self._request_id = 100

    def rid(self) -> int:
        self._request_id = (self._request_id + 1) % 0xFFFFFFFF
        return self._request_id

    def garbage(self) -> bytes:
        rng = self.rng
        choice = rng.randrange(3)
        if choice == 0:
            return rng.randbytes(rng.randrange(1, 200))
        if choice == 1:
            return mutate(rng.choice(self.samples), rng)
        return replace_field(rng.choice(self.samples), rng)

    def hostile(self, me: str) -> bytes:
        rng = self.rng
        pick = rng.randrange(9)
        if pick == 0:
            recipient = rng.choice(LEGIT + FUZZERS + ("nobody", me))
            sender = me if rng.random() < 0.8 else rng.choice(LEGIT)
            return f.encode_frame(f.Send(self.rid(), _envelope(sender, recipient, rng)))
        if pick == 1:
            return f.encode_frame(f.Send(self.rid(), rng.randbytes(rng.randrange(0, 300))))
        if pick == 2:
            ids = tuple(rng.randbytes(16) for _ in range(rng.randrange(0, 40)))
            return f.encode_frame(f.Ack(ids))
        if pick == 3:
            target = rng.choice(LEGIT + FUZZERS + ("nobody",))
            return f.encode_frame(f.FetchBundle(self.rid(), target))
        if pick == 4:
            keys = tuple(rng.randbytes(rng.randrange(0, 120)) for _ in range(rng.randrange(0, 5)))
            return f.encode_frame(f.UploadPrekeys(self.rid(), keys))
        if pick == 5:
            return f.encode_frame(f.PublishBundle(self.rid(), mutate(self.bundle, rng)))
        if pick == 6:
            return f.encode_frame(
                f.RotateKey(self.rid(), rng.randbytes(32), rng.randbytes(64), rng.randbytes(64))
            )
        if pick == 7:
            return f.encode_frame(rng.choice([f.ListAgents, f.GetStats, f.Ping])(self.rid()))
        return f.encode_frame(f.Pong(self.rid()))

    def next(self) -> Scenario:
        rng = self.rng
        kind = rng.choice(KINDS)
        if kind == "random":
            return Scenario(kind, [rng.randbytes(rng.randrange(1, 300))])
        if kind == "mutated":
            return Scenario(kind, [mutate(rng.choice(self.samples), rng)])
        if kind == "field":
            return Scenario(kind, [replace_field(rng.choice(self.samples), rng)])
        if kind == "truncated":
            sample = rng.choice(self.samples)
            return Scenario(kind, [sample[: rng.randrange(1, len(sample))]])
        if kind == "oversized":
            if rng.random() < 0.5:
                length = rng.randrange((1 << 20) + 64 * 1024 + 1, 1 << 32)
                return Scenario(kind, [length.to_bytes(4, "big") + rng.randbytes(16)])
            length = rng.randrange(64 * 1024, (1 << 20) + 64 * 1024)  # within the limit
            return Scenario(
                kind, [length.to_bytes(4, "big") + b"\x20" + bytes(rng.randrange(1, 65536))]
            )
        if kind == "anonymous":
            frames = [
                f.encode_frame(rng.choice([f.ListAgents, f.GetStats, f.Ping])(self.rid()))
                for _ in range(rng.randrange(1, 6))
            ]
            return Scenario(kind, [*frames, self.garbage()])
        me = rng.choice(FUZZERS)
        if kind == "login_garbage":
            return Scenario(kind, [self.garbage() for _ in range(rng.randrange(1, 4))], me)
        return Scenario(kind, [self.hostile(me) for _ in range(rng.randrange(1, 12))], me)


# --- the fuzzer ---------------------------------------------------------------


@dataclass
class Report:
    seed: int
    frames: int = 0
    connections: int = 0
    logins: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    hub_rss_start_kib: int = 0
    hub_rss_mid_kib: int = 0
    hub_rss_end_kib: int = 0
    hub_rss_peak_kib: int = 0
    hub_alive: bool = True
    hub_tracebacks: int = 0
    legit_sent: int = 0
    legit_handled: int = 0
    legit_lost: int = 0
    legit_duplicates: int = 0
    legit_out_of_order: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        mib = 1024
        return (
            f"fuzz seed={self.seed}: {self.frames} frames on {self.connections} connections "
            f"({self.logins} logged in) in {self.seconds}s; hub alive={self.hub_alive}, "
            f"tracebacks={self.hub_tracebacks}, RSS start {self.hub_rss_start_kib / mib:.1f} MiB, "
            f"mid {self.hub_rss_mid_kib / mib:.1f} MiB, end {self.hub_rss_end_kib / mib:.1f} MiB, "
            f"peak {self.hub_rss_peak_kib / mib:.1f} MiB; legitimate agents: "
            f"{self.legit_sent} sent, {self.legit_handled} handled, lost={self.legit_lost}, "
            f"duplicates={self.legit_duplicates}, out_of_order={self.legit_out_of_order}"
        )


async def _read_frame(
    reader: asyncio.StreamReader, decoder: f.FrameDecoder, kinds: tuple[type[f.Frame], ...]
) -> f.Frame | None:
    while True:
        data = await reader.read(65536)
        if not data:
            return None
        for frame in decoder.feed(data):
            if isinstance(frame, kinds):
                return frame


async def _connection(port: int, inputs: Inputs, scenario: Scenario, report: Report) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT_S
    )
    report.connections += 1
    try:
        if scenario.login_as is not None:
            decoder = f.FrameDecoder(max_frame_size=hp.CLIENT_MAX_FRAME_SIZE)
            hello = await asyncio.wait_for(_read_frame(reader, decoder, (f.Hello,)), IO_TIMEOUT_S)
            if not isinstance(hello, f.Hello):
                return
            identity = inputs.identities[scenario.login_as]
            address = hp.parse_hub_names(hello.hub_address)[0]
            challenge = hp.login_message(hello.nonce, scenario.login_as, address)
            login = f.Login(
                1,
                hp.PROTOCOL_VERSION,
                scenario.login_as,
                identity.public.signing,
                identity.sign(challenge),
                b"",
                address,
            )
            writer.write(f.encode_frame(login))
            report.frames += 1
            answer = await asyncio.wait_for(
                _read_frame(reader, decoder, (f.LoggedIn, f.Error)), IO_TIMEOUT_S
            )
            if not isinstance(answer, f.LoggedIn):
                return
            report.logins += 1
        for chunk in scenario.chunks:
            writer.write(chunk)
            report.frames += 1
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT_S)
        # Read what the hub answers for a moment (it usually closes after garbage).
        deadline = asyncio.get_running_loop().time() + 0.05
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            if not await asyncio.wait_for(reader.read(65536), left):
                break
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, AgentMeshError):
        pass
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            pass


async def _fuzz(
    port: int, frames: int, seed: int, workers: int, report: Report, on_half: Any
) -> list[Scenario]:
    inputs = Inputs(seed)
    recent: list[Scenario] = []
    half_done = False

    async def worker() -> None:
        nonlocal half_done
        while report.frames < frames:
            scenario = inputs.next()
            report.by_kind[scenario.kind] = report.by_kind.get(scenario.kind, 0) + 1
            recent.append(scenario)
            del recent[:-256]
            try:
                await _connection(port, inputs, scenario, report)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)  # refused (e.g. too many connections): go on
            if not half_done and report.frames >= frames // 2:
                half_done = True
                on_half()

    await asyncio.gather(*(worker() for _ in range(workers)))
    return recent


class LegitTraffic:
    """alice and bob (real Agents over NetworkHub) send each other numbered messages."""

    def __init__(self, port: int, folder: Path) -> None:
        from agentmesh import NetworkHub

        self.hubs = {n: NetworkHub("127.0.0.1", port, reconnect_max=0.5) for n in LEGIT}
        self.agents = {
            n: Agent(n, hub=self.hubs[n], keypair_path=folder / f"{n}.json") for n in LEGIT
        }
        self.sent: dict[str, list[int]] = {n: [] for n in LEGIT}
        self.got: dict[str, list[int]] = {n: [] for n in LEGIT}
        for name, agent in self.agents.items():
            agent.on_message(lambda msg, name=name: self._handle(name, msg))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _handle(self, name: str, msg: Message) -> None:
        if msg.payload.get("legit"):
            self.got[name].append(int(msg.payload["n"]))

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            sender, recipient = (LEGIT[0], LEGIT[1]) if n % 2 == 0 else (LEGIT[1], LEGIT[0])
            try:
                self.agents[sender].send(recipient, f"legit {n}", n=n, legit=True)
            except AgentMeshError:
                pass  # refused (e.g. rate limited): not sent, not counted
            else:
                self.sent[sender].append(n)
            n += 1
            time.sleep(0.005)

    def start(self) -> None:
        self._thread.start()

    def stop_and_check(self, report: Report, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(30)
        expected = {LEGIT[1]: self.sent[LEGIT[0]], LEGIT[0]: self.sent[LEGIT[1]]}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(set(expected[n]) <= set(self.got[n]) for n in LEGIT):
                break
            time.sleep(0.05)
        for name in LEGIT:
            got, want = self.got[name], expected[name]
            report.legit_sent += len(want)
            report.legit_handled += len(got)
            report.legit_lost += len(set(want) - set(got))
            report.legit_duplicates += len(got) - len(set(got))
            report.legit_out_of_order += sum(1 for a, b in itertools.pairwise(got) if b <= a)
        for agent in self.agents.values():
            agent.close()
        for hub in self.hubs.values():
            hub.close()


def run_fuzz(
    frames: int, seed: int, workers: int = 16, folder: Path | None = None,
    triage: Path | None = None,
) -> Report:  # fmt: skip
    from hubproc import HubProcess

    started = time.monotonic()
    report = Report(seed=seed)
    with tempfile.TemporaryDirectory(prefix="agentmesh-fuzz-") as tmp:
        work = folder or Path(tmp)
        hub = HubProcess(work)
        hub.start()
        assert hub.proc is not None
        pid = hub.proc.pid
        recent: list[Scenario] = []
        try:
            legit = LegitTraffic(hub.port, work)
            legit.start()
            time.sleep(0.5)
            report.hub_rss_start_kib = rss_kib(pid)

            def on_half() -> None:
                report.hub_rss_mid_kib = rss_kib(pid)

            recent = asyncio.run(_fuzz(hub.port, frames, seed, workers, report, on_half))
            report.hub_alive = hub.proc.poll() is None
            if report.hub_alive:
                report.hub_rss_end_kib = rss_kib(pid)
                report.hub_rss_peak_kib = rss_kib(pid, "VmHWM")
            legit.stop_and_check(report)
        finally:
            hub.stop()
            log = hub.log()
        report.hub_tracebacks = log.count("Traceback")
        report.seconds = round(time.monotonic() - started, 1)
        if not report.hub_alive:
            report.problems.append(f"the hub died (exit {hub.proc.returncode}):\n{log[-3000:]}")
        if report.hub_tracebacks:
            first = log.index("Traceback")
            report.problems.append(f"the hub logged tracebacks:\n{log[first - 200 : first + 3000]}")
        if report.legit_lost or report.legit_duplicates or report.legit_out_of_order:
            report.problems.append("the legitimate agents lost, repeated or reordered messages")
        if report.legit_sent == 0:
            report.problems.append("the legitimate agents sent nothing")
        growth = report.hub_rss_end_kib - max(report.hub_rss_mid_kib, report.hub_rss_start_kib)
        if report.hub_alive and growth > 64 * 1024:
            report.problems.append(f"hub RSS grew {growth} KiB in the second half of the run")
        if report.problems and triage is not None:
            triage.mkdir(parents=True, exist_ok=True)
            for i, scenario in enumerate(recent):
                name = f"{scenario.kind}-{seed}-{i}.bin"
                (triage / name).write_bytes(b"".join(scenario.chunks))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--triage", type=Path, default=Path("fuzz-triage"))
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    logging.getLogger("agentmesh").setLevel(logging.ERROR)  # agents dropping fuzz envelopes
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # writes to connections the hub closed
    report = run_fuzz(args.frames, args.seed, args.workers, triage=args.triage)
    print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
    print("by kind:", dict(Counter(report.by_kind).most_common()))
    for problem in report.problems:
        print("PROBLEM:", problem)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hubproc
    sys.exit(main())
