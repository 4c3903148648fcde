"""Scenario 11 (issue 13): several hubs on one PostgreSQL database.

``python -m bench.multihub`` measures, each part on a fresh database:

* **cross-hub pair latency**: alice on hub A, bob on hub B, ``--pair-count``
  messages paced at ``--pair-rate`` per second (pipelined sends); the latency
  of each message is from just before alice's ``send`` to bob's handler
  (p50, p99, max). The target is a median under 50 ms.
* **fleet throughput** with 1, 2 and 3 hubs (``--hubs``): scenario 7's fleet
  (``--fleet-agents`` agents in ``--fleet-procs`` processes, each sending to
  random peers with the default ``send()``, which waits for the hub's ack)
  for ``--fleet-duration`` seconds; worker process ``p`` dials hub ``p mod
  hubs``, so most messages cross hubs;
* the same fleet on **one SQLite hub**, beside it.

Every hub is a ``bench.hubproc`` process on 127.0.0.1 (production durability;
only the abuse limits are lifted). ``--pg`` is an admin URL of the server
(default ``$AGENTMESH_BENCH_PG``, else ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``);
a database ``bench_<random>`` is created for each part and dropped after it.
Prints a table and writes the JSON to ``--json`` (default
``bench-multihub.json`` in ``--work``). ``--tiny`` runs everything at a size that
only shows it works.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import HubProc
from bench.scenarios import HUB_ARGS, Settings, _processes, _worker, fleet_on

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL); dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text

    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _hubs(procs: list[Any], d: Path, count: int, db: str | None) -> list[HubProc]:
    hubs = [HubProc(d, f"hub{i}", *HUB_ARGS, db=db) for i in range(count)]
    procs.extend(hubs)
    return hubs


def cross_hub_pair(s: Settings, admin_url: str, count: int, rate: float) -> dict[str, Any]:
    """alice on hub A sends ``count`` messages at ``rate``/s to bob on hub B."""
    d = s.dir("s11-cross-hub-pair")
    with fresh_database(admin_url) as db, _processes() as procs:
        a, b = _hubs(procs, d, 2, db)
        bob = _worker(
            procs, d, "bob", "receiver", "--port", str(b.port), "--id", "bob",
            "--peer", "alice", "--expect", str(count),
        )  # fmt: skip
        bob.expect("READY", 120)
        alice = _worker(
            procs, d, "alice", "sender", "--port", str(a.port), "--id", "alice",
            "--peer", "bob", "--count", str(count), "--mode", "pipelined",
            "--rate", str(rate),
        )  # fmt: skip
        alice.expect("READY", 120)
        alice.send("GO")
        sent = alice.expect("RESULT", 900)
        got = bob.expect("RESULT", 900)
    seconds = got["t_last"] - sent["t_first"]
    return {
        "count": count,
        "rate_offered": rate,
        "handled": got["count"],
        "seconds": seconds,
        "latency_ms": got["latency_ms"],
    }


def fleet_on_hubs(
    s: Settings, admin_url: str | None, hubs: int, agents: int, procs_n: int, duration: float
) -> dict[str, Any]:
    """The fleet over ``hubs`` hubs on one fresh PostgreSQL (or one SQLite hub)."""
    name = f"s11-fleet-{hubs}-{'pg' if admin_url else 'sqlite'}"
    d = s.dir(name)
    database = fresh_database(admin_url) if admin_url else contextlib.nullcontext(None)
    with database as db, _processes() as procs:
        started = _hubs(procs, d, hubs, db)
        result = fleet_on(procs, d, [h.port for h in started], agents, duration, procs_n)
    result["hubs"] = hubs
    result["database"] = "postgresql" if admin_url else "sqlite"
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    return measure(
        Settings(work=Path(args.work)),
        args.pg,
        pair_count=args.pair_count,
        pair_rate=args.pair_rate,
        hubs=args.hubs,
        agents=args.fleet_agents,
        procs_n=args.fleet_procs,
        duration=args.duration,
    )


def measure(
    s: Settings,
    pg: str,
    *,
    pair_count: int,
    pair_rate: float,
    hubs: list[int],
    agents: int,
    procs_n: int,
    duration: float,
) -> dict[str, Any]:
    """Every part of scenario 11 (also ``python -m bench --only 11``)."""
    results: dict[str, Any] = {
        "pair": cross_hub_pair(s, pg, pair_count, pair_rate),
        "fleet": [],
    }
    for count in hubs:
        results["fleet"].append(fleet_on_hubs(s, pg, count, agents, procs_n, duration))
    results["fleet"].append(fleet_on_hubs(s, None, 1, agents, procs_n, duration))
    return results


def table(results: dict[str, Any]) -> str:
    pair = results["pair"]
    lat = pair["latency_ms"]
    lines = [
        f"cross-hub pair: {pair['handled']}/{pair['count']} handled at "
        f"{pair['rate_offered']:.0f} msgs/s offered; latency p50 {lat['p50']:.1f} ms, "
        f"p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms (target: p50 < 50 ms)",
        "",
        f"{'fleet':<22}{'agents':>8}{'sent':>10}{'received':>10}{'msgs/s':>10}{'failed':>8}",
    ]
    for row in results["fleet"]:
        label = f"{row['hubs']} hub(s), {row['database']}"
        lines.append(
            f"{label:<22}{row['agents']:>8}{row['sent']:>10}{row['received']:>10}"
            f"{row['rate']:>10.0f}{row['failed']:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multihub", description=__doc__)
    parser.add_argument("--pg", default=os.environ.get("AGENTMESH_BENCH_PG", DEFAULT_PG))
    parser.add_argument("--pair-count", type=int, default=5000)
    parser.add_argument("--pair-rate", type=float, default=100.0)
    parser.add_argument("--fleet-agents", type=int, default=120)
    parser.add_argument("--fleet-procs", type=int, default=6)
    parser.add_argument("--duration", type=float, default=30.0, help="fleet seconds per run")
    parser.add_argument("--hubs", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 3])
    parser.add_argument("--work", default=None, help="folder for logs (default: a temp dir)")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--tiny", action="store_true", help="a size that only shows it works")
    args = parser.parse_args(argv)
    if args.tiny:
        args.pair_count, args.pair_rate = 200, 200.0
        args.fleet_agents, args.fleet_procs, args.duration = 12, 3, 3.0
    with contextlib.ExitStack() as stack:
        if args.work is None:
            args.work = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-mh-"))
        results = run(args)
        out = Path(args.json or Path(args.work) / "bench-multihub.json")
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(table(results))
        if args.json:
            print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
