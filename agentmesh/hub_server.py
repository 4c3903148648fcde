"""Command line of the hub: ``agentmesh-hub`` and ``python -m agentmesh.hub_server``.

Argument parsing only; the server is :class:`agentmesh.hub.server.NetworkHubServer`.
Exit status: 0 after a clean stop (SIGTERM/SIGINT), 2 for a configuration error
(bad option, unusable database, missing TLS files), 1 if the address cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import sys

from agentmesh.errors import ConfigurationError
from agentmesh.hub.server import DEFAULT_PORT, HubOptions, NetworkHubServer
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
    add("--hub-address", help="name the hub signs logins for (default: HOST:PORT)")
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
