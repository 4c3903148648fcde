"""Run every benchmark scenario, print a table of targets, write JSON.

    python -m bench [--quick] [--only 3,5] [--json PATH] [--fleet-duration S] [--profile DIR]

Scenarios (issue 5): 1 crypto bound, 2 LocalHub pair, 3 network pair, 4 latency
at 500 msgs/s, 5 offline drain of 20,000, 6 hub ingest (16 raw connections,
recipients offline, then online), 7 fleet of 100 agents, 8 5,000 idle
connections, 9 drain of 1,000 vs 100,000 queued, 10 the asyncio driver (an
AsyncAgent pair, request/reply round trips, the event loop's longest stall). Peers (RabbitMQ, NATS
JetStream, a raw SQLite commit loop) run with scenarios 3, 5 and 6 and are
skipped, with the reason, when their service is not running.

Targets are ratios against baselines measured in the same run: this machine is
shared and noisy. Nothing here asserts; the table says PASS or MISS.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.common import ROOT, raise_fd_limit
from bench.scenarios import Settings

ALL = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


@dataclass(frozen=True)
class Row:
    scenario: str
    measured: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None

    def cells(self) -> list[str]:
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}"
        verdict = "" if self.ok is None else ("PASS" if self.ok else "MISS")
        return [self.scenario, self.measured, self.baseline, ratio, self.target, verdict]


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import cryptography
    import sqlalchemy

    return {
        "nproc": os.cpu_count() or 0,
        "cpu": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cryptography": cryptography.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "sqlite": __import__("sqlite3").sqlite_version,
    }


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def _at_least(measured: float, reference: float, factor: float) -> tuple[float | None, bool | None]:
    if reference <= 0:
        return None, None
    ratio = measured / reference
    return ratio, ratio >= factor


def build_rows(r: dict[str, Any]) -> list[Row]:
    """The table: one row per figure, with its target, ratio and verdict."""
    rows: list[Row] = []
    crypto = r.get("1")
    bound = crypto["receiver_bound_signed"] if crypto else 0.0
    if crypto:
        rows.append(
            Row(
                "1 crypto: seal+unseal, signed (1 process)",
                _rate(crypto["seal_unseal_signed"]),
                target="reference",
            )
        )
        rows.append(
            Row(
                "1 crypto: seal+unseal, unsigned",
                _rate(crypto["seal_unseal_unsigned"]),
                target="reference",
            )
        )
        rows.append(
            Row("1 crypto: receiver decrypt+verify (= bound)", _rate(bound), target="reference")
        )
    if "2" in r:
        signed = crypto["seal_unseal_signed"] if crypto else 0.0
        ratio, ok = _at_least(r["2"]["rate"], signed, 0.4)
        rows.append(
            Row(
                "2 LocalHub pair, agents with key files",
                _rate(r["2"]["rate"]),
                _rate(signed) + " seal+unseal",
                ratio,
                ">= 0.4 x 1's signed",
                ok,
            )
        )
    peers = r.get("peers", {})
    rabbit, nats_ = peers.get("rabbit", {}), peers.get("nats", {})

    def versus(
        label: str, measured: float, key: str, suffix: str = "", judged: bool = True
    ) -> None:
        """A row against each peer's ``key`` figure: judged (>= 1.0 x peer) or (info)."""
        for peer in (rabbit, nats_):
            name = "RabbitMQ" if peer is rabbit else "NATS JetStream"
            if "skipped" in peer or "error" in peer or key not in peer:
                if judged:
                    why = peer.get("skipped") or peer.get("error") or "not measured"
                    rows.append(Row(f"{label} vs {name}", _rate(measured), f"skipped: {why}"))
                continue
            ratio, ok = _at_least(measured, peer[key]["rate"], 1.0)
            rows.append(
                Row(
                    f"{label} vs {name}{suffix}",
                    _rate(measured),
                    _rate(peer[key]["rate"]),
                    ratio,
                    ">= 1.0 x peer" if judged else "(info)",
                    ok if judged else None,
                )
            )

    if "3" in r:
        pair = r["3"]
        ratio, ok = _at_least(pair["pipelined"]["rate"], bound, 0.6)
        mode = "send(wait=False)" if pair["pipelined"]["pipelined"] else "send()"
        rows.append(
            Row(
                f"3 network pair, {mode}",
                _rate(pair["pipelined"]["rate"]),
                _rate(bound) + " bound",
                ratio,
                ">= 0.6 x bound",
                ok,
            )
        )
        if "default" in pair:
            ratio, ok = _at_least(pair["default"]["rate"], bound, 0.1)
            rows.append(
                Row(
                    "3 network pair, default send() (waits for ack)",
                    _rate(pair["default"]["rate"]),
                    _rate(bound) + " bound",
                    ratio,
                    ">= 0.1 x bound",
                    ok,
                )
            )
        cpu = pair["pipelined"].get("cpu_us_per_message")
        if cpu and crypto:
            spent = sum(kinds["user"] + kinds["system"] for kinds in cpu.values())
            own = crypto["seal_us_signed"] + crypto["unseal_us_signed"]
            rows.append(
                Row(
                    "3 CPU per message, pipelined pair, all processes",
                    f"{spent:,.0f} us",
                    f"{own:,.0f} us crypto",
                    spent / own,
                    "<= 4 x crypto",
                    spent <= 4 * own,
                )
            )
        if "unsigned" in pair:
            unsigned_bound = crypto["receiver_bound_unsigned"] if crypto else 0.0
            ratio, _ = _at_least(pair["unsigned"]["rate"], unsigned_bound, 0.6)
            rows.append(
                Row(
                    "3 network pair, sign_messages=False (info)",
                    _rate(pair["unsigned"]["rate"]),
                    _rate(unsigned_bound) + " bound",
                    ratio,
                    "(info)",
                )
            )
        versus("3 pair", pair["pipelined"]["rate"], "pair")
    if "4" in r:
        lat = r["4"]["latency_ms"]
        achieved = r["4"].get("send_call_rate", 0.0)
        rows.append(
            Row(f"4 latency p50 @500/s (sent at {achieved:,.0f}/s)", f"{lat['p50']:.2f} ms")
        )
        rows.append(
            Row(
                "4 latency p99 @500/s",
                f"{lat['p99']:.2f} ms",
                "5 ms",
                lat["p99"] / 5.0,
                "<= 5 ms",
                lat["p99"] <= 5.0,
            )
        )
        rows.append(
            Row(
                "4 latency p99.9 @500/s",
                f"{lat['p99.9']:.2f} ms",
                "15 ms",
                lat["p99.9"] / 15.0,
                "<= 15 ms",
                lat["p99.9"] <= 15.0,
            )
        )
    if "5" in r:
        drain = r["5"]
        ratio, ok = _at_least(drain["rate"], bound, 0.8)
        rows.append(
            Row(
                f"5 offline drain of {drain['handled']:,}",
                _rate(drain["rate"]),
                _rate(bound) + " bound",
                ratio,
                ">= 0.8 x bound",
                ok,
            )
        )
        versus("5 drain", drain["rate"], "drain", judged=False)
    if "6" in r:
        offline, online = r["6"]["offline"], r["6"]["online"]
        rows.append(Row("6 hub ingest, 16 conns, recipients offline", _rate(offline["rate"])))
        rows.append(
            Row("6 hub ingest, recipients online (store+push+ack+delete)", _rate(online["rate"]))
        )
        # Judged against NATS JetStream in the same run (issue 15); RabbitMQ for reference.
        versus("6 online", online["rate"], "online16")
        versus("6 offline", offline["rate"], "ingest16", " publish-only")
    if "7" in r:
        f = r["7"]
        rows.append(
            Row(f"7 fleet of {f['agents']}, {f['seconds']:.0f} s, default send()", _rate(f["rate"]))
        )
        rows.append(
            Row(
                "7 fleet fairness: Jain's index (sent)",
                f"{f['jain_sent']:.3f}",
                f"min {f['sent_min']:.0f} / max {f['sent_max']:.0f}",
            )
        )
    if "8" in r:
        c = r["8"]
        rows.append(
            Row(
                f"8 hub RSS, {c['logged_in']:,} idle agents",
                f"{c['rss_mb']:.0f} MB",
                "300 MB",
                c["rss_mb"] / 300.0,
                "<= 300 MB",
                c["rss_mb"] <= 300.0,
            )
        )
        rows.append(Row("8 login rate", _rate(c["login_rate"])))
    if "9" in r:
        small, large = r["9"]["small"], r["9"]["large"]
        ratio, ok = _at_least(large["rate"], small["rate"], 0.8)
        rows.append(
            Row(
                f"9 drain {large['handled']:,} vs {small['handled']:,}",
                _rate(large["rate"]),
                _rate(small["rate"]),
                ratio,
                ">= 0.8 x small",
                ok,
            )
        )
    if "10" in r:
        ten = r["10"]
        rows.append(Row("10 AsyncAgent pair, send(wait=False)", _rate(ten["rate"])))
        rows.append(Row("10 request/reply round trip p50", f"{ten['rtt_p50_ms']:.2f} ms"))
        rows.append(Row("10 request/reply round trip p99", f"{ten['rtt_p99_ms']:.2f} ms"))
        rows.append(
            Row(
                f"10 event loop longest stall, {ten['count']:,} messages",
                f"{ten['loop_stall_max_ms']:.2f} ms",
                target="(info)",
            )
        )
    if "11" in r:
        pair, fleets = r["11"]["pair"], r["11"]["fleet"]
        lat = pair["latency_ms"]
        rows.append(
            Row(
                f"11 cross-hub pair p50 @{pair['rate_offered']:.0f}/s (PostgreSQL)",
                f"{lat['p50']:.2f} ms",
                "50 ms",
                lat["p50"] / 50.0,
                "< 50 ms",
                lat["p50"] < 50.0,
            )
        )
        rows.append(Row("11 cross-hub pair p99", f"{lat['p99']:.2f} ms", target="(info)"))
        for fleet_row in fleets:
            label = f"{fleet_row['hubs']} hub(s), {fleet_row['database']}"
            rows.append(
                Row(
                    f"11 fleet of {fleet_row['agents']}, {label}",
                    _rate(fleet_row["rate"]),
                    f"{fleet_row['failed']} failed",
                    target="(info)",
                )
            )
    if "sqlite" in peers:
        rows.append(
            Row(
                "storage limit: SQLite insert+commit loop (FULL)",
                _rate(peers["sqlite"]["rate"]),
                target="reference",
            )
        )
    return rows


def peer_rows(r: dict[str, Any]) -> list[list[str]]:
    peers = r.get("peers", {})
    out: list[list[str]] = []
    for key, name in (("rabbit", "RabbitMQ (aio-pika)"), ("nats", "NATS JetStream (nats-py)")):
        peer = peers.get(key)
        if peer is None:
            continue
        if "skipped" in peer:
            out.append([name, f"skipped: {peer['skipped']}", "", "", ""])
            continue
        cells = [name]
        for what in ("pair", "drain", "ingest16", "online16"):
            cells.append(_rate(peer[what]["rate"]) if what in peer else peer.get("error", "-"))
        out.append(cells)
    ours = ["AgentMesh"]
    ours.append(_rate(r["3"]["pipelined"]["rate"]) if "3" in r else "-")
    ours.append(_rate(r["5"]["rate"]) if "5" in r else "-")
    ours.append(_rate(r["6"]["offline"]["rate"]) if "6" in r else "-")
    ours.append(_rate(r["6"]["online"]["rate"]) if "6" in r else "-")
    if out:
        out.insert(0, ours)
    return out


def format_table(rows: list[Row], peers: list[list[str]]) -> str:
    header = ["scenario", "measured", "baseline", "ratio", "target", "result"]
    table = [header] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for index, line in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    if peers:
        lines.append("")
        head = [
            "side by side",
            "3: pair (1 to 1)",
            "5: drain 20k backlog",
            "6: 16 conns, store only",
            "6: 16 conns, publish+consume",
        ]
        grid = [head, *peers]
        widths = [max(len(line[i]) for line in grid) for i in range(len(head))]
        for index, line in enumerate(grid):
            lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _step(
    label: str,
    fn: Callable[[], Any],
    errors: dict[str, str],
    score: Callable[[Any], float] | None = None,
    repeat: int = 1,
) -> Any:
    """Run ``fn`` ``repeat`` times; keep the best run by ``score`` (all scores kept too)."""
    results: list[Any] = []
    for attempt in range(repeat):
        suffix = f" (run {attempt + 1}/{repeat})" if repeat > 1 else ""
        print(f"... {label}{suffix}", flush=True)
        started = time.monotonic()
        try:
            results.append(fn())
        except Exception as exc:  # one failed scenario must not lose the others
            errors[label] = f"{type(exc).__name__}: {exc}"
            print(f"    FAILED: {errors[label].splitlines()[0]}", flush=True)
            continue
        print(f"    done in {time.monotonic() - started:.1f}s", flush=True)
    if not results:
        return None
    if score is None or len(results) == 1:
        return results[-1]
    best = max(results, key=score)
    if isinstance(best, dict):
        best["runs"] = [round(score(r), 3) for r in results]
    return best


def _rate_of(result: Any) -> float:
    return float(result["rate"])


def run(selected: list[int], s: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    pair_count = s.pick(20000, 2000)
    profiled = s.profile is not None
    n = s.repeat

    def step(label: str, fn: Callable[[], Any], score: Callable[[Any], float]) -> Any:
        return _step(label, fn, errors, score, n)

    def put(key: str, label: str, fn: Callable[[], Any], score: Callable[[Any], float]) -> None:
        value = step(label, fn, score)
        if value is not None:
            results[key] = value

    if 1 in selected or 3 in selected or 5 in selected:
        # The best bound of the repeats: the strictest baseline for 3 and 5.
        put(
            "1",
            "1 crypto bound",
            lambda: scenarios.crypto_bound(s),
            lambda r: float(r["receiver_bound_signed"]),
        )
    if 2 in selected:
        put("2", "2 LocalHub pair", lambda: scenarios.local_pair(s), _rate_of)
    if 10 in selected:
        put("10", "10 AsyncAgent pair", lambda: scenarios.async_pair(s), _rate_of)
    if 11 in selected:
        from bench import multihub

        put(
            "11",
            "11 several hubs on one PostgreSQL",
            lambda: multihub.measure(
                s,
                os.environ.get("AGENTMESH_BENCH_PG", multihub.DEFAULT_PG),
                pair_count=s.pick(5000, 500),
                pair_rate=100.0,
                hubs=[1, 2, 3],
                agents=s.pick(120, 30),
                procs_n=s.pick(6, 3),
                duration=min(s.fleet_duration, 30.0) if not s.quick else 5.0,
            ),
            # The best run is the one with the lowest cross-hub median.
            lambda r: -float(r["pair"]["latency_ms"]["p50"]),
        )
    if 3 in selected:
        three: dict[str, Any] = {}
        value = step(
            "3 network pair (pipelined)",
            lambda: scenarios.network_pair(s, "s3-pair", pair_count, "pipelined", profile=profiled),
            _rate_of,
        )
        if value is not None:
            three["pipelined"] = value
        value = step(
            "3 network pair (default send)",
            lambda: scenarios.network_pair(
                s, "s3-pair-default", s.pick(3000, 300), "sync", profile=profiled
            ),
            _rate_of,
        )
        if value is not None:
            three["default"] = value
        value = step(
            "3 network pair (pipelined, unsigned)",
            lambda: scenarios.network_pair(
                s, "s3-pair-unsigned", pair_count, "pipelined", unsigned=True
            ),
            _rate_of,
        )
        if value is not None:
            three["unsigned"] = value
        if "pipelined" in three:
            results["3"] = three
    if 4 in selected:
        put(
            "4",
            "4 latency at 500 msgs/s",
            lambda: scenarios.network_pair(
                s, "s4-latency", 500 * s.pick(10, 3), "pipelined", rate=500.0
            ),
            lambda r: -float(r["latency_ms"]["p99"]),
        )
    if 5 in selected:
        put(
            "5",
            "5 offline drain",
            lambda: scenarios.offline_drain(s, "s5-drain", s.pick(20000, 5000), profile=profiled),
            _rate_of,
        )
    if 6 in selected:
        six: dict[str, Any] = {}
        for online in (False, True):
            key = "online" if online else "offline"
            value = step(
                f"6 hub ingest ({key})",
                functools.partial(scenarios.hub_ingest, s, online, profiled),
                _rate_of,
            )
            if value is not None:
                six[key] = value
        if len(six) == 2:
            results["6"] = six
    if 7 in selected:
        put("7", "7 fleet", lambda: scenarios.fleet(s), _rate_of)
    if 8 in selected:
        put(
            "8",
            "8 idle connections",
            lambda: scenarios.connections(s),
            lambda r: -float(r["rss_mb"]),
        )
    if 9 in selected:
        nine: dict[str, Any] = {}
        for key, count in (("small", 1000), ("large", s.pick(100_000, 10_000))):
            value = step(
                f"9 backlog drain of {count:,}",
                functools.partial(scenarios.offline_drain, s, f"s9-drain-{key}", count),
                _rate_of,
            )
            if value is not None:
                nine[key] = value
        if len(nine) == 2:
            results["9"] = nine
    if {3, 5, 6} & set(selected) and s.peers:
        peers: dict[str, Any] = {}
        for system in ("rabbit", "nats"):
            value = step(
                f"peer {system}", functools.partial(scenarios.peer, s, system), _peer_score
            )
            if value is not None:
                peers[system] = value
        value = step("peer sqlite loop", lambda: scenarios.sqlite_peer(s), _rate_of)
        if value is not None:
            peers["sqlite"] = value
        results["peers"] = peers
    results["errors"] = errors
    return results


def _peer_score(result: Any) -> float:
    """Best peer run: the highest sum of its four rates (a skipped peer scores 0)."""
    return sum(float(part["rate"]) for part in result.values() if isinstance(part, dict))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="AgentMesh benchmarks (issue 5); see docs/PERFORMANCE.md",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (smaller sizes)")
    parser.add_argument("--only", default="", help="comma-separated scenario numbers, e.g. 3,5")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="default: %(default)s")
    parser.add_argument(
        "--fleet-duration",
        type=float,
        default=60.0,
        help="seconds of scenario 7 (default %(default)s; --quick caps it at 5)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=1024,
        help="unacknowledged sends per connection, for us and the peers",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="attach py-spy to hub, sender and receiver in 3, 5, 6; raw stacks here",
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="skip RabbitMQ, NATS and the SQLite loop"
    )
    parser.add_argument(
        "--hub-uvloop",
        action="store_true",
        help="run the hub on uvloop (must be importable; not a dependency)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario N times and keep the best run (this machine is noisy)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run's files here")
    args = parser.parse_args(argv)
    selected = (
        sorted({int(x) for x in args.only.split(",") if x.strip()}) if args.only else list(ALL)
    )
    unknown = set(selected) - set(ALL)
    if unknown:
        parser.error(f"unknown scenario(s): {sorted(unknown)}")
    raise_fd_limit(65536)
    if args.hub_uvloop:
        scenarios.HUB_ARGS.append("--uvloop")
    temp = None
    if args.workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="agentmesh-bench-")
        work = Path(temp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    s = Settings(
        work=work,
        quick=args.quick,
        profile=args.profile,
        fleet_duration=args.fleet_duration,
        window=args.window,
        crypto_duration=0.1 if args.quick else 0.5,
        peers=not args.no_peers,
        repeat=max(1, args.repeat),
    )
    started = time.time()
    info = machine()
    print(
        f"AgentMesh bench: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"scenarios {','.join(map(str, selected))}{' (quick)' if args.quick else ''}",
        flush=True,
    )
    try:
        results = run(selected, s)
    finally:
        if temp is not None:
            temp.cleanup()
    rows = build_rows(results)
    table = format_table(rows, peer_rows(results))
    print()
    print(table)
    if results.get("errors"):
        print("\nerrors:")
        for label, error in results["errors"].items():
            print(f"  {label}: {error.splitlines()[0]}")
    document = {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": info,
        "table": [
            dict(
                zip(
                    ["scenario", "measured", "baseline", "ratio", "target", "result"],
                    row.cells(),
                    strict=True,
                )
            )
            for row in rows
        ],
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
