"""Command line of the hub: ``agentmesh-hub`` and ``python -m agentmesh.hub_server``.

Argument parsing only; the server is :class:`agentmesh.hub.server.NetworkHubServer`.
Exit status: 0 after a clean stop (SIGTERM/SIGINT), 2 for a configuration error
(bad option, unusable database, missing TLS files, a non-loopback ``--host``
without ``--hub-address``), 1 if the address cannot be bound.

Unlike the ``NetworkHubServer`` class, the command never guesses its names: a
hub reachable from other machines must be told (``--hub-address``) the name
its agents dial, since logins signed for any other name are refused.
"""

from __future__ import annotations

import argparse
import logging
import sys

from agentmesh.errors import ConfigurationError
from agentmesh.hub.server import DEFAULT_PORT, HubOptions, NetworkHubServer, is_loopback_host
from agentmesh.hub.store import DB_ENV_VAR

_DEFAULTS = HubOptions()
#: (flag, type, HubOptions field, help) of the numeric settings.
_TUNABLES: list[tuple[str, type[int] | type[float], str, str]] = [
    ("--max-envelope-bytes", int, "max_envelope_bytes", "largest envelope accepted"),
    ("--ttl", float, "ttl_s", "seconds an undelivered envelope is kept"),
    ("--mailbox-max-messages", int, "mailbox_max_messages", "queued envelopes per recipient"),
    ("--mailbox-max-bytes", int, "mailbox_max_bytes", "queued bytes per recipient"),
    ("--max-connections", int, "max_connections", "simultaneous connections"),
    ("--handshake-timeout", float, "handshake_timeout_s", "seconds a connection has to log in"),
    ("--idle-timeout", float, "idle_timeout_s", "close a connection silent this many seconds"),
    ("--ping-interval", float, "ping_interval_s", "PING a connection silent this many seconds"),
    ("--purge-interval", float, "purge_interval_s", "seconds between purges of expired mail"),
    ("--rate-per-s", float, "rate_per_s", "requests per second per connection (token bucket)"),
    ("--rate-burst", int, "rate_burst", "burst of the per-connection token bucket"),
    ("--lease-ttl", float, "lease_ttl_s", "seconds a dead hub keeps an agent's lease (PostgreSQL)"),
    ("--catchup-interval", float, "catchup_interval_s", "seconds between mailbox catch-ups"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmesh-hub",
        description="Run an AgentMesh hub: store-and-forward routing of end-to-end encrypted "
        "envelopes between agents.",
    )
    add = parser.add_argument
    add("--db", help=f"SQLite file or SQLAlchemy URL (default: ${DB_ENV_VAR}, else hub.sqlite)")
    add("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")  # noqa: S104
    add("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    add("--tls-cert", help="PEM certificate chain; enables TLS together with --tls-key")
    add("--tls-key", help="PEM private key of --tls-cert")
    for flag, kind, option, text in _TUNABLES:
        default = getattr(_DEFAULTS, option)
        add(flag, type=kind, dest=option, default=default, metavar="N", help=f"{text} ({default})")
    add(
        "--hub-address",
        action="append",
        metavar="HOST:PORT",
        help="a name agents dial to reach this hub (repeat, or separate with commas, for "
        "several; PORT defaults to --port); logins for other names are refused. Required "
        "unless --host is a loopback address, which answers to 127.0.0.1, localhost and ::1",
    )
    add("--hub-id", help="this hub's id among hubs sharing a PostgreSQL (default: HOSTNAME:PORT)")
    add(
        "--synchronous",
        default=_DEFAULTS.synchronous,
        choices=["FULL", "NORMAL", "OFF"],
        help="SQLite durability: FULL survives power loss (default: %(default)s)",
    )
    add(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="(default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the hub until SIGTERM/SIGINT; return the exit status."""
    args = build_parser().parse_args(argv)
    if not args.hub_address and not is_loopback_host(args.host):
        # One line, before logging is set up: the operator must choose a name.
        print(
            f"agentmesh-hub: --host {args.host or '(all)'} is reachable from other machines: "
            "pass --hub-address HOST:PORT with the name agents dial (or --host 127.0.0.1)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("agentmesh.hub")
    try:
        server = NetworkHubServer(
            args.host,
            args.port,
            args.db,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            hub_address=args.hub_address,
            hub_id=args.hub_id,
            synchronous=args.synchronous,
            **{option: getattr(args, option) for _, _, option, _ in _TUNABLES},
        )
        server.start(block=True)
    except ConfigurationError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
