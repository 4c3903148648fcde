"""Command line of the hub: ``agentmesh-hub`` and ``python -m agentmesh.hub_server``.

Argument parsing and operator output only; the server is
:class:`agentmesh.hub.server.NetworkHubServer` and every SQL statement is in
:class:`agentmesh.hub.store.HubStore`.

``agentmesh-hub [serve] [--db URL] [options]``
    Run the hub. Exit status: 0 after a clean stop (SIGTERM/SIGINT), 2 for a
    configuration error (bad option, unusable or missing database folder, a
    database not at head with ``--no-migrate``, a PostgreSQL URL whose driver is
    not installed, missing TLS files, ``--metrics-port`` without
    ``prometheus_client``, a non-loopback ``--host`` without ``--hub-address``),
    1 if an address cannot be bound.
``agentmesh-hub migrate [--db URL]``
    Bring the database to the newest schema with the migrations packaged in the
    wheel (``alembic upgrade head`` without ``alembic.ini``). 0, or 2.
``agentmesh-hub admin agents|stats|unbind AGENT_ID|purge-expired [--db URL] [--json]``
    Look at or repair the database of a hub (running or not). 0 on success, 1
    when ``unbind`` finds no such agent, 2 when the database cannot be used
    (missing, unreachable, not at head).

Every command takes ``--db`` (a SQLite file or a SQLAlchemy URL), else
``$AGENTMESH_DB``, else ``hub.sqlite`` in the current folder.

Unlike the ``NetworkHubServer`` class, the command never guesses its names: a
hub reachable from other machines must be told (``--hub-address``) the name
its agents dial, since logins signed for any other name are refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from agentmesh.crypto.identity import fingerprint_of
from agentmesh.errors import ConfigurationError
from agentmesh.hub.logs import LOG_FORMATS, configure_logging
from agentmesh.hub.metrics import METRICS_INSTALL, metrics_available
from agentmesh.hub.server import DEFAULT_PORT, HubOptions, NetworkHubServer, is_loopback_host
from agentmesh.hub.store import (
    DB_ENV_VAR,
    DEFAULT_DB,
    HubStore,
    check_database_location,
    resolve_db_url,
)
from agentmesh.ids import InvalidAgentIdError, validate_agent_id

log = logging.getLogger("agentmesh.hub")
admin_log = logging.getLogger("agentmesh.hub.admin")

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
#: The first argument that selects a command other than serving.
_COMMANDS = ("migrate", "admin")
_DB_HELP = f"SQLite file or SQLAlchemy URL (default: ${DB_ENV_VAR}, else {DEFAULT_DB})"
_EXIT_OK, _EXIT_NOT_FOUND, _EXIT_CONFIG = 0, 1, 2


def _version() -> str:
    try:
        return metadata.version("agentmesh")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        from agentmesh import __version__

        return __version__


def _add_logging_options(parser: argparse.ArgumentParser, default_level: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="(default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``agentmesh-hub [serve]``: running the hub."""
    parser = argparse.ArgumentParser(
        prog="agentmesh-hub",
        description="Run an AgentMesh hub: store-and-forward routing of end-to-end encrypted "
        "envelopes between agents.",
        epilog="Other commands: `agentmesh-hub migrate [--db URL]` brings the database to the "
        "current schema; `agentmesh-hub admin {agents,stats,unbind,purge-expired} [--db URL]` "
        "looks at or repairs it (`agentmesh-hub admin --help`).",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"agentmesh-hub {_version()}")
    add("--db", help=_DB_HELP)
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
        "--no-migrate",
        action="store_true",
        help="refuse to start on a database that is not at the current schema, instead of "
        "migrating it (for controlled upgrades: run `agentmesh-hub migrate` first)",
    )
    add(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics at /metrics and a health check at /healthz on this "
        f"port (needs prometheus_client: {METRICS_INSTALL})",
    )
    add(
        "--metrics-host",
        metavar="HOST",
        help="address of --metrics-port (default: --host)",
    )
    _add_logging_options(parser, "INFO")
    return parser


def build_command_parser() -> argparse.ArgumentParser:
    """The parser of ``agentmesh-hub migrate`` and ``agentmesh-hub admin ...``."""
    parser = argparse.ArgumentParser(prog="agentmesh-hub")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: Any, name: str, text: str, *, json_output: bool = False
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=text, description=text)
        sub.add_argument("--db", help=_DB_HELP)
        if json_output:
            sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        _add_logging_options(sub, "INFO")
        return sub

    command(
        commands,
        "migrate",
        "Bring the hub database to the current schema (creating it if new), with the "
        "migrations packaged in AgentMesh.",
    )
    admin = commands.add_parser(
        "admin", help="look at or repair a hub database", description="Hub database administration."
    )
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(
        actions,
        "agents",
        "List the bound agent ids: key fingerprint, last login, queued mail.",
        json_output=True,
    )
    command(actions, "stats", "What the hub database holds.", json_output=True)
    unbind = command(
        actions,
        "unbind",
        "Release an agent id after its key was lost: delete its binding, prekeys and queued "
        "mail, so that a new key can register the id. Peers that pinned the old key see an "
        "identity change and must trust the new fingerprint.",
    )
    unbind.add_argument("agent_id", metavar="AGENT_ID")
    command(actions, "purge-expired", "Delete the envelopes past their TTL now.")
    return parser


# --- serving -------------------------------------------------------------------------


def _db_setting(given: str | None) -> str:
    """``--db``, else ``$AGENTMESH_DB``, else ``hub.sqlite``: what NetworkHubServer opens."""
    return given or os.environ.get(DB_ENV_VAR) or DEFAULT_DB


def _serve(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.hub_address and not is_loopback_host(args.host):
        # One line, before logging is set up: the operator must choose a name.
        print(
            f"agentmesh-hub: --host {args.host or '(all)'} is reachable from other machines: "
            "pass --hub-address HOST:PORT with the name agents dial (or --host 127.0.0.1)",
            file=sys.stderr,
        )
        return _EXIT_CONFIG
    configure_logging(args.log_level, args.log_format)
    if args.metrics_port is not None and not metrics_available():
        log.error("cannot start: --metrics-port needs prometheus_client: %s", METRICS_INSTALL)
        return _EXIT_CONFIG
    db = _db_setting(args.db)
    try:
        check_database_location(db, must_exist=args.no_migrate)
        server = NetworkHubServer(
            args.host,
            args.port,
            db,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            hub_address=args.hub_address,
            hub_id=args.hub_id,
            synchronous=args.synchronous,
            migrate=not args.no_migrate,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            **{option: getattr(args, option) for _, _, option, _ in _TUNABLES},
        )
        server.start(block=True)
    except ConfigurationError as exc:
        log.error("cannot start: %s", exc)
        return _EXIT_CONFIG
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    return _EXIT_OK


# --- migrate and admin ---------------------------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _utc(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _shown(db: str) -> str:
    """The database as the operator may see it (no password)."""
    from sqlalchemy.engine import make_url

    return make_url(resolve_db_url(db)).render_as_string(hide_password=True)


def _operator() -> str:
    """Who runs this command, as the OS tells (not the environment, which anyone sets)."""
    try:
        import pwd

        name = pwd.getpwuid(os.geteuid()).pw_name
        uid = f"uid {os.geteuid()}"
    except (ImportError, KeyError, AttributeError):
        import getpass

        name, uid = getpass.getuser(), "uid unknown"
    sudo = os.environ.get("SUDO_USER")
    return f"{name!r} ({uid}{f', via sudo from {sudo!r}' if sudo else ''})"


def _migrate(store: HubStore, db: str, _args: argparse.Namespace) -> int:
    before, heads = store.schema_revisions()
    store.migrate()
    after, _ = store.schema_revisions()
    target = ", ".join(after)
    if before == after:
        print(f"{_shown(db)}: already at the current schema (revision {target})")
    else:
        start = ", ".join(before) if before else "an empty database"
        print(f"{_shown(db)}: migrated from {start} to revision {target} (head)")
    assert after == heads
    return _EXIT_OK


def _admin_agents(store: HubStore, _db: str, args: argparse.Namespace) -> int:
    records = store.agent_records()
    rows = [
        {
            "agent_id": r.agent_id,
            "fingerprint": fingerprint_of(r.signing_key),
            "created": _utc(r.created_at_ms),
            "last_seen": _utc(r.last_seen_ms),
            "queued_messages": r.queued_messages,
            "queued_bytes": r.queued_bytes,
            "one_time_prekeys": r.one_time_prekeys,
            "has_bundle": r.has_bundle,
        }
        for r in records
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return _EXIT_OK
    if not rows:
        print("no agent is bound on this hub")
        return _EXIT_OK
    header = ("AGENT ID", "FINGERPRINT", "LAST SEEN (UTC)", "QUEUED", "BYTES", "PREKEYS")
    table = [header] + [
        (
            row["agent_id"],
            row["fingerprint"],
            row["last_seen"],
            str(row["queued_messages"]),
            str(row["queued_bytes"]),
            str(row["one_time_prekeys"]),
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for line in table:
        cells = (str(cell).ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())
    print(f"{len(rows)} agent{'s' if len(rows) != 1 else ''}")
    return _EXIT_OK


def _admin_stats(store: HubStore, db: str, args: argparse.Namespace) -> int:
    now = _now_ms()
    stats = store.store_stats(now)
    current, _ = store.schema_revisions()
    age = None if stats.oldest_envelope_ms is None else (now - stats.oldest_envelope_ms) / 1000
    values: dict[str, Any] = {
        "database": _shown(db),
        "schema_revision": ", ".join(current),
        "agents": stats.agents,
        "queued_envelopes": stats.envelopes,
        "queued_bytes": stats.bytes,
        "expired_envelopes": stats.expired,
        "oldest_envelope_age_s": None if age is None else round(age, 1),
        "one_time_prekeys": stats.one_time_prekeys,
    }
    if args.json:
        print(json.dumps(values, indent=2))
        return _EXIT_OK
    labels = {
        "database": "database",
        "schema_revision": "schema revision",
        "agents": "bound agents",
        "queued_envelopes": "queued envelopes",
        "queued_bytes": "queued bytes",
        "expired_envelopes": "expired, not purged",
        "oldest_envelope_age_s": "oldest envelope age (s)",
        "one_time_prekeys": "one-time prekeys",
    }
    width = max(len(label) for label in labels.values())
    for key, label in labels.items():
        value = values[key]
        print(f"{label + ':':<{width + 1}} {'-' if value is None else value}")
    return _EXIT_OK


def _admin_unbind(store: HubStore, db: str, args: argparse.Namespace) -> int:
    agent_id = args.agent_id
    try:
        validate_agent_id(agent_id)
    except InvalidAgentIdError as exc:
        print(f"agentmesh-hub: {exc}", file=sys.stderr)
        return _EXIT_CONFIG
    key = store.agent_key(agent_id)
    dropped = store.unbind_agent(agent_id)
    if key is None or dropped is None:
        print(f"agentmesh-hub: agent {agent_id!r} is not bound on {_shown(db)}", file=sys.stderr)
        return _EXIT_NOT_FOUND
    when = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    fingerprint = fingerprint_of(key)
    admin_log.warning(
        "unbound agent %r (key %s) on %s: by OS user %s at %s; %d queued envelopes dropped",
        agent_id,
        fingerprint,
        _shown(db),
        _operator(),
        when,
        dropped,
    )
    print(
        f"released agent {agent_id!r} (was key {fingerprint}): dropped {dropped} queued "
        f"envelope{'s' if dropped != 1 else ''}; the next login with any key binds the id"
    )
    return _EXIT_OK


def _admin_purge(store: HubStore, _db: str, _args: argparse.Namespace) -> int:
    total, limit = 0, 10_000
    now = _now_ms()
    while True:
        purged = store.purge_expired(now, limit)
        total += purged
        if purged < limit:
            break
    print(f"purged {total} expired envelope{'s' if total != 1 else ''}")
    return _EXIT_OK


_Action = Callable[[HubStore, str, argparse.Namespace], int]
_ACTIONS: dict[str, _Action] = {
    "agents": _admin_agents,
    "stats": _admin_stats,
    "unbind": _admin_unbind,
    "purge-expired": _admin_purge,
}


def _command(argv: list[str]) -> int:
    args = build_command_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.log_level != "DEBUG":  # Alembic's "Context impl ..." lines say nothing here
        logging.getLogger("alembic").setLevel(logging.WARNING)
    db = _db_setting(args.db)
    migrating = args.command == "migrate"
    action: _Action = _migrate if migrating else _ACTIONS[args.action]
    try:
        # Admin commands never create a database; migrate creates a missing file.
        check_database_location(db, must_exist=not migrating)
        with HubStore(db) as store:
            if not migrating:
                store.check_revision()
            return action(store, db, args)
    except ConfigurationError as exc:
        print(f"agentmesh-hub: {exc}", file=sys.stderr)
        return _EXIT_CONFIG
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"agentmesh-hub: cannot use the database {_shown(db)}: {reason}", file=sys.stderr)
        return _EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in _COMMANDS:
        return _command(arguments)
    if arguments and arguments[0] == "serve":
        arguments = arguments[1:]
    return _serve(arguments)


if __name__ == "__main__":
    sys.exit(main())
