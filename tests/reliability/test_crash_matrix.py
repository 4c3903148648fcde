"""Crash matrix: a fleet of real agent processes and a real hub process, SIGKILLed.

Ten agents (``_fleet_agent.py``, each its own process with a key file and a
state file) exchange messages through a hub subprocess
(``python -m agentmesh.hub_server``) on one SQLite file. A chaos schedule,
drawn from a fixed seed and keyed to the fleet's progress (messages
attempted), SIGKILLs:

* the hub, at least 20 times, restarting it on the same database and port
  (with several hubs: one of them, or all of them for the sender kill below);
* a sender while the hub is down, right after two of its ``send()`` calls
  returned (so its outbox is known to hold messages), restarting it from its
  files;
* a receiver right after it entered a handler after a hub restart (mid-drain,
  usually inside the handler, with committed but unhandled inbox rows);
* random agents at random points;
* finally every agent at once, after which all restart and drain.

The invariant is checked from the agents' own durable records (see
``_fleet_agent.py``): every message whose ``send()`` returned is handled by its
recipient, exactly once unless the recipient was SIGKILLed inside (or right
after) that handler, which may then run once more per such kill; none is lost;
per-sender order holds at every recipient. The figures are printed (``-s``).

CI size: 10 agents x 250 messages, 22 hub kills. ``AGENTMESH_SOAK=1``: 10 x
2000 messages, 120 hub kills. ``AGENTMESH_CRASH_SEED`` overrides the seed.

The same matrix also runs with two hubs on one fresh PostgreSQL database
(``test_crash_matrix_two_hubs_on_postgresql``): half the agents list one hub
first and half the other (``NetworkHub(servers=[...])``), so most messages
cross hubs; each hub kill SIGKILLs one of the two, chosen by the seed, and its
agents fail over to the other.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hubproc import HubProcess
from pgschema import fresh_pg_database
from sqlalchemy import create_engine, text

WORKER = Path(__file__).with_name("_fleet_agent.py")
#: This fleet member runs an AsyncAgent (async handler, sends from its event loop).
ASYNC_AGENT = "a9"
SOAK = os.environ.get("AGENTMESH_SOAK") == "1"
SEED = int(os.environ.get("AGENTMESH_CRASH_SEED", "20261124"))
AGENTS = 10
PER_AGENT = 2000 if SOAK else 250
HUB_KILLS = 120 if SOAK else 22
OUTBOX_KILLS = 20 if SOAK else 4  # senders killed with messages in their outbox
DRAIN_KILLS = 20 if SOAK else 4  # receivers killed mid-drain
RANDOM_KILLS = 40 if SOAK else 6  # agents killed at random points
HANDLER_DELAY_S = 0.003
#: Safety nets against hangs (not performance assertions).
RUN_DEADLINE_S = 3 * 3600 if SOAK else 420
WAIT_S = 120.0


# --- the agents' records ---------------------------------------------------


@dataclass
class AgentLog:
    """Incremental reader of one agent's ``.log`` (complete lines only)."""

    path: Path
    offset: int = 0
    attempted: dict[int, str] = field(default_factory=dict)  # seq -> recipient
    sent: dict[int, str] = field(default_factory=dict)  # seq -> recipient (send() returned)
    failed: int = 0
    #: ("start" | "done", incarnation, sender, seq), in file order
    handled: list[tuple[str, int, str, int]] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)
    ready: set[int] = field(default_factory=set)

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].decode().splitlines():
            parts = line.split()
            kind = parts[0]
            if kind == "attempt":
                self.attempted[int(parts[2])] = parts[1]
            elif kind == "sent":
                self.sent[int(parts[2])] = parts[1]
            elif kind == "failed":
                self.failed += 1
            elif kind in ("start", "done"):
                self.handled.append((kind, int(parts[1]), parts[2], int(parts[3])))
            elif kind == "finished":
                self.finished.add(int(parts[1]))
            elif kind == "ready":
                self.ready.add(int(parts[1]))

    def count(self, kind: str) -> int:
        return sum(1 for entry in self.handled if entry[0] == kind)


def state_rows(state_file: Path) -> tuple[int, int]:
    """(outbox rows, inbox rows) of a dead agent's state file."""
    db = sqlite3.connect(state_file)
    try:
        outbox = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        inbox = db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
    finally:
        db.close()
    return int(outbox), int(inbox)


# --- the fleet -------------------------------------------------------------


@dataclass
class Figures:
    seed: int
    agents: int = AGENTS
    planned: int = 0
    hub_starts: int = 0
    hub_kills: int = 0
    agent_starts: int = 0
    agent_kills: int = 0
    outbox_kills: int = 0
    outbox_rows_at_kill: int = 0
    drain_kills: int = 0
    inbox_rows_at_kill: int = 0
    attempted: int = 0
    sent: int = 0
    failed: int = 0
    handled: int = 0
    in_doubt_delivered: int = 0
    rehandled_killed_in_handler: int = 0
    rehandled_killed_after_handler: int = 0
    duplicates: int = 0
    lost: int = 0
    order_violations: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Fleet:
    def __init__(
        self, workdir: Path, seed: int, per_agent: int, pg_url: str | None = None, hubs: int = 1
    ) -> None:
        self.workdir = workdir
        self.seed = seed
        self.per_agent = per_agent
        self.names = [f"a{i}" for i in range(AGENTS)]
        self.pg_url = pg_url
        if pg_url is None:
            self.hubs = [HubProcess(workdir, "--purge-interval", "3600")]
        else:
            shared = ("--purge-interval", "3600", "--lease-ttl", "2", "--catchup-interval", "0.5")
            self.hubs = [HubProcess(workdir / f"hub{i}", *shared, db=pg_url) for i in range(hubs)]
        self.hub = self.hubs[0]
        self._victims = random.Random(seed + 1)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.incarnation: dict[str, int] = dict.fromkeys(self.names, 0)
        #: (agent, incarnation) ended by SIGKILL
        self.killed: set[tuple[str, int]] = set()
        self.logs = {n: AgentLog(workdir / f"{n}.log") for n in self.names}
        self.fig = Figures(seed=seed, planned=AGENTS * per_agent)

    # hub

    def start_hub(self) -> None:
        for hub in self.hubs:
            if not hub.alive:
                hub.start()
                self.fig.hub_starts += 1

    def kill_hub(self, every: bool = False) -> None:
        """SIGKILL one hub (chosen by the seed), or with ``every`` all of them."""
        for hub in self.hubs if every else [self._victims.choice(self.hubs)]:
            if hub.alive:
                hub.kill()
                self.fig.hub_kills += 1

    def servers(self, name: str) -> list[str]:
        """The fleet agent's command-line option naming its hubs (rotated per agent)."""
        if self.pg_url is None:
            return ["--port", str(self.hub.port)]
        turn = self.names.index(name) % len(self.hubs)
        ordered = self.hubs[turn:] + self.hubs[:turn]
        return ["--servers", ",".join(f"127.0.0.1:{hub.port}" for hub in ordered)]

    def hub_queued(self) -> int:
        if self.pg_url is not None:
            engine = create_engine(self.pg_url)
            try:
                with engine.connect() as conn:
                    return int(conn.scalar(text("SELECT COUNT(*) FROM envelopes")) or 0)
            finally:
                engine.dispose()
        assert self.hub.db is not None
        db = sqlite3.connect(self.hub.db)
        try:
            return int(db.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0])
        finally:
            db.close()

    # agents

    def start_agent(self, name: str) -> None:
        self.incarnation[name] += 1
        inc = self.incarnation[name]
        with (self.workdir / f"{name}.err").open("ab") as err:
            self.procs[name] = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "--id", name,
                    "--dir", str(self.workdir),
                    *self.servers(name),
                    "--peers", ",".join(self.names),
                    "--count", str(self.per_agent),
                    "--seed", str(self.seed),
                    "--incarnation", str(inc),
                    "--handler-delay", str(HANDLER_DELAY_S),
                    *(["--async"] if name == ASYNC_AGENT else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=self.workdir,
            )  # fmt: skip
        self.fig.agent_starts += 1

    def kill_agent(self, name: str) -> tuple[int, int]:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(30)
        self.killed.add((name, self.incarnation[name]))
        self.fig.agent_kills += 1
        state = self.workdir / f"{name}.state.sqlite"
        return state_rows(state) if state.exists() else (0, 0)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                err = (self.workdir / f"{name}.err").read_text(errors="replace")
                raise AssertionError(f"agent {name} exited with {proc.returncode}:\n{err[-3000:]}")

    def poll(self) -> None:
        for log in self.logs.values():
            log.poll()

    def attempts(self) -> int:
        self.poll()
        return sum(len(log.attempted) for log in self.logs.values())

    def wait(self, condition: object, timeout: float, what: str, hard: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if condition():  # type: ignore[operator]
                return True
            self.check_alive()
            if time.monotonic() > deadline:
                if hard:
                    raise AssertionError(f"timed out waiting for {what}")
                return False
            time.sleep(0.01)

    def all_attempted(self) -> bool:
        return all(len(self.logs[n].attempted) >= self.per_agent for n in self.names)

    def status(self, name: str) -> dict[str, int] | None:
        try:
            data = json.loads((self.workdir / f"{name}.status").read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("inc") == self.incarnation[name] else None

    def drained(self) -> bool:
        for name in self.names:
            st = self.status(name)
            if st is None or st["outbox"] or st["inbox"]:
                return False
        if self.missing():
            return False
        return self.hub_queued() == 0

    def missing(self) -> int:
        done = {
            (sender, recipient, seq)
            for recipient, log in self.logs.items()
            for kind, _, sender, seq in log.handled
            if kind == "done"
        }
        return sum(
            1
            for sender, log in self.logs.items()
            for seq, recipient in log.sent.items()
            if (sender, recipient, seq) not in done
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()
        for hub in self.hubs:
            hub.stop()


# --- the run ---------------------------------------------------------------


def run_matrix(
    workdir: Path,
    seed: int = SEED,
    per_agent: int = PER_AGENT,
    pg_url: str | None = None,
    hubs: int = 1,
) -> Figures:
    started = time.monotonic()
    rng = random.Random(seed)
    fleet = Fleet(workdir, seed, per_agent, pg_url, hubs)
    total = AGENTS * per_agent
    kinds = (
        ["hub-outbox"] * OUTBOX_KILLS
        + ["hub-drain"] * DRAIN_KILLS
        + ["hub"] * (HUB_KILLS - OUTBOX_KILLS - DRAIN_KILLS)
        + ["agent"] * RANDOM_KILLS
    )
    rng.shuffle(kinds)
    thresholds = sorted(rng.randrange(total // 50, total * 19 // 20) for _ in kinds)
    try:
        fleet.start_hub()
        for name in fleet.names:
            fleet.start_agent(name)
        for kind, threshold in zip(kinds, thresholds, strict=True):
            if time.monotonic() - started > RUN_DEADLINE_S:
                raise AssertionError("crash matrix ran past its deadline")
            fleet.wait(
                lambda t=threshold: fleet.attempts() >= t or fleet.all_attempted(),
                WAIT_S,
                f"{threshold} attempts",
            )
            if kind == "agent":
                victim = rng.choice(fleet.names)
                fleet.kill_agent(victim)
                time.sleep(rng.uniform(0.0, 0.3))
                fleet.start_agent(victim)
                continue
            # A sender keeps its outbox only while no hub answers: then kill them all.
            fleet.kill_hub(every=kind == "hub-outbox")
            fleet.poll()  # every line written so far was written before the hub died
            if kind == "hub-outbox":
                busy = [
                    n
                    for n in fleet.names
                    if len(fleet.logs[n].attempted) < per_agent - 4
                    and fleet.incarnation[n] in fleet.logs[n].ready  # registered before the kill
                ]
                victim = rng.choice(busy or fleet.names)
                log = fleet.logs[victim]
                before = len(log.sent)
                # Two send() calls returned after the kill: the second began after it,
                # so it can only have returned with its envelope in the outbox.
                sent_two = lambda log=log, before=before: len(log.sent) >= before + 2  # noqa: E731
                if fleet.wait(sent_two, 10.0, "outbox", hard=False):
                    outbox, _ = fleet.kill_agent(victim)
                    fleet.fig.outbox_kills += 1
                    fleet.fig.outbox_rows_at_kill += outbox
                    assert outbox >= 1, f"{victim}: send() returned without an ack or outbox row"
                    fleet.start_agent(victim)
                else:
                    fleet.fig.skipped.append(
                        f"outbox {victim} sent={len(log.sent)} att={len(log.attempted)}"
                    )
            time.sleep(rng.uniform(0.05, 0.6))
            fleet.start_hub()
            if kind == "hub-drain":
                victim = rng.choice(fleet.names)  # every agent receives until the very end
                log = fleet.logs[victim]
                before = log.count("start")
                entered = lambda log=log, before=before: log.count("start") > before  # noqa: E731
                if fleet.wait(entered, 10.0, "drain", hard=False):
                    _, inbox = fleet.kill_agent(victim)
                    fleet.fig.drain_kills += 1
                    fleet.fig.inbox_rows_at_kill += inbox
                    time.sleep(rng.uniform(0.0, 0.3))
                    fleet.start_agent(victim)
                else:
                    fleet.fig.skipped.append(f"drain {victim}")
        fleet.wait(fleet.all_attempted, WAIT_S * 2, "every message attempted")
        # Everyone restarts once more (SIGKILL all), then the fleet drains.
        for name in fleet.names:
            fleet.kill_agent(name)
        for name in fleet.names:
            fleet.start_agent(name)
        fleet.wait(fleet.drained, WAIT_S * 2, "the fleet to drain")
    finally:
        fleet.stop_all()
    fleet.poll()
    analyse(fleet)
    fleet.fig.seconds = round(time.monotonic() - started, 1)
    return fleet.fig


def analyse(fleet: Fleet) -> None:
    fig = fleet.fig
    attempted = {
        (sender, recipient, seq)
        for sender, log in fleet.logs.items()
        for seq, recipient in log.attempted.items()
    }
    sent = {
        (sender, recipient, seq)
        for sender, log in fleet.logs.items()
        for seq, recipient in log.sent.items()
    }
    fig.attempted, fig.sent = len(attempted), len(sent)
    fig.failed = sum(log.failed for log in fleet.logs.values())
    handled_keys: set[tuple[str, str, int]] = set()
    for recipient, log in fleet.logs.items():
        # The handler entry in progress when each killed incarnation died.
        last_start: dict[int, tuple[str, int]] = {}
        for kind, inc, sender, seq in log.handled:
            if kind == "start":
                last_start[inc] = (sender, seq)
        starts: dict[tuple[str, int], list[int]] = defaultdict(list)
        dones: dict[tuple[str, int], set[int]] = defaultdict(set)
        first_order: dict[str, list[int]] = defaultdict(list)
        for kind, inc, sender, seq in log.handled:
            key = (sender, seq)
            if kind == "done":
                dones[key].add(inc)
                continue
            if not starts[key]:
                first_order[sender].append(seq)
            starts[key].append(inc)
        for (sender, seq), incs in starts.items():
            handled_keys.add((sender, recipient, seq))
            if (sender, recipient, seq) not in attempted:
                fig.problems.append(f"{recipient} handled {sender}:{seq}, never attempted")
            for previous in incs[:-1]:
                killed_here = (recipient, previous) in fleet.killed
                if killed_here and last_start.get(previous) == (sender, seq):
                    if previous in dones[(sender, seq)]:
                        fig.rehandled_killed_after_handler += 1
                    else:
                        fig.rehandled_killed_in_handler += 1
                else:
                    fig.duplicates += 1
                    fig.problems.append(
                        f"{recipient} handled {sender}:{seq} again after incarnation {previous}"
                    )
        for sender, seqs in first_order.items():
            for a, b in itertools.pairwise(seqs):
                if b <= a:
                    fig.order_violations += 1
                    fig.problems.append(f"{recipient}: {sender}:{b} handled after {sender}:{a}")
        for key in starts:
            if not dones[key]:
                fig.problems.append(f"{recipient} never finished handling {key}")
    fig.handled = len(handled_keys)
    fig.in_doubt_delivered = len(handled_keys & (attempted - sent))
    lost = sent - handled_keys
    fig.lost = len(lost)
    fig.problems.extend(f"lost {s}->{r} #{n}" for s, r, n in sorted(lost)[:20])


def report(fig: Figures) -> str:
    return (
        f"crash matrix seed={fig.seed}: {fig.agents} agents, {fig.planned} messages planned, "
        f"{fig.attempted} attempted, {fig.sent} sent (send() returned), {fig.failed} refused "
        f"(send() raised), {fig.handled} handled ({fig.in_doubt_delivered} of them "
        f"in doubt: send() interrupted); hub: {fig.hub_kills} SIGKILLs, {fig.hub_starts} starts; "
        f"agents: {fig.agent_kills} SIGKILLs ({fig.outbox_kills} senders with "
        f"{fig.outbox_rows_at_kill} envelopes in their outboxes, {fig.drain_kills} receivers "
        f"mid-drain with {fig.inbox_rows_at_kill} unhandled inbox rows), {fig.agent_starts} "
        f"starts; re-handled after a kill inside the handler: {fig.rehandled_killed_in_handler}, "
        f"after the handler returned but before the inbox row was deleted: "
        f"{fig.rehandled_killed_after_handler}; lost={fig.lost} duplicates={fig.duplicates} "
        f"order_violations={fig.order_violations}; {fig.seconds}s"
    )


@pytest.mark.timeout(RUN_DEADLINE_S + 300)
def test_crash_matrix(tmp_path: Path) -> None:
    check(run_matrix(tmp_path))


@pytest.mark.timeout(RUN_DEADLINE_S + 300)
def test_crash_matrix_two_hubs_on_postgresql(tmp_path: Path) -> None:
    with fresh_pg_database() as url:
        check(run_matrix(tmp_path, pg_url=url, hubs=2))


def check(fig: Figures) -> None:
    print("\n" + report(fig))
    if fig.skipped:
        print("targeted kills skipped (the victim had nothing in flight):", fig.skipped)
    assert fig.problems == [], "\n".join(fig.problems[:50])
    assert fig.lost == 0 and fig.duplicates == 0 and fig.order_violations == 0
    assert fig.hub_kills >= 20
    assert fig.sent >= 2000 * per_agent_scale()
    assert fig.outbox_kills >= 1 and fig.outbox_rows_at_kill >= fig.outbox_kills
    assert fig.drain_kills >= 1


def per_agent_scale() -> float:
    return PER_AGENT / 250
