"""The hub under test: ``python -m bench.hubproc --db PATH [--port N] [--uvloop]``.

A :class:`~agentmesh.hub.server.NetworkHubServer` on 127.0.0.1 with the
production durability (SQLite WAL, ``synchronous=FULL``, SEND_ACK only after
the commit) and the default push window and group-commit size. Only the
*abuse limits* are lifted, because the benchmark is the abuse: the per-connection
token bucket (default 2,000 requests/s), the mailbox quotas (default 10,000
envelopes) that scenario 9's 100,000-message backlog would hit, the connection
cap (default 1,024) that scenario 8's 5,000 agents would hit, and the idle and
handshake timers. Prints ``READY {"port": N, "pid": N}``, serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys

from bench.common import emit, raise_fd_limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run the hub on uvloop")
    parser.add_argument("--batch-max", type=int, default=None)
    args = parser.parse_args(argv)
    raise_fd_limit(65536)
    # Imported late: the fd limit and the signal mask are set before anything starts.
    from agentmesh.hub.server import HubOptions, NetworkHubServer

    options: dict[str, object] = {
        "rate_per_s": 1e9,
        "rate_burst": 1_000_000_000,
        "mailbox_max_messages": 10_000_000,
        "mailbox_max_bytes": 1 << 40,
        "max_connections": 60_000,
        "idle_timeout_s": 3600.0,
        "ping_interval_s": 600.0,
        "handshake_timeout_s": 300.0,
        "synchronous": "FULL",
        "use_uvloop": args.uvloop,
    }
    if args.batch_max is not None:
        options["batch_max"] = args.batch_max
    assert HubOptions(**options).synchronous == "FULL"  # type: ignore[arg-type]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = NetworkHubServer("127.0.0.1", args.port, args.db, **options)
    server.start(block=False)
    uvloop = args.uvloop and importlib.util.find_spec("uvloop") is not None
    emit("READY", port=server.port, uvloop=uvloop)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
