"""The ``agentmesh`` command (click): one agent's identity, messages, outbox and trust.

Each command opens the identity named by the global options (``--id``, ``--keypair``,
``--hub``, ...; each also read from an ``AGENTMESH_*`` variable), does one thing, and
closes it. stdout carries only the result (ids, texts, JSON lines), so it suits
pipes; errors are one line on stderr with the exit code of
:mod:`agentmesh.cli.output`; waits show progress on stderr only when it is a
terminal. ``agentmesh mcp`` serves the same identity to MCP clients
(:mod:`agentmesh.cli.mcp_server`, loaded only by that command).

Threads: ``agentmesh-cli-progress`` (owned and stopped by :class:`Progress`). A key
file is never created implicitly: only ``keygen`` makes one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import click

from agentmesh import __version__
from agentmesh.agent import Agent
from agentmesh.cli.output import (
    CommandFailed,
    ExitCode,
    error_line,
    exit_code_for,
    message_json,
    one_line,
    terminal_text,
)
from agentmesh.cli.settings import Settings, load_keypair, open_agent, parse_hubs
from agentmesh.errors import LocalProtocolError, RequestTimeoutError
from agentmesh.ids import validate_agent_id
from agentmesh.keyfile import load_or_create_key_file
from agentmesh.state import StateLock, state_path_for

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
#: How long keygen waits for the hub to take the new agent's login.
_REGISTER_TIMEOUT_S = 10.0


# -- output -------------------------------------------------------------------


def emit(line: str) -> None:
    """One line of result on stdout, flushed at once (a reader of a pipe sees it now)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def emit_json(value: object) -> None:
    emit(json.dumps(value, sort_keys=True))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")


class Progress:
    """``with Progress("waiting for a reply"):`` shows the label and the seconds waited
    on stderr, once a second, if stderr is a terminal; otherwise does nothing."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            self._thread = threading.Thread(
                target=self._run, name="agentmesh-cli-progress", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            waited = int(time.monotonic() - started)
            sys.stderr.write(f"\r\x1b[K{self._label}... {waited} s (Ctrl-C to stop)")
            sys.stderr.flush()
            if self._stop.wait(1.0):
                return

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# -- arguments -------------------------------------------------------------------


def _data(text: str | None) -> dict[str, Any]:
    """``--data JSON``: a JSON object whose fields join the message payload."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise CommandFailed(ExitCode.USAGE, f"--data is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CommandFailed(ExitCode.USAGE, "--data must be a JSON object")
    if "text" in value:
        raise CommandFailed(ExitCode.USAGE, "--data must not set 'text': pass it as TEXT")
    return value


def _text(text: str) -> str:
    """TEXT, or standard input if TEXT is ``-``."""
    return sys.stdin.read() if text == "-" else text


def _peer(peer: str) -> str:
    return validate_agent_id(peer)  # InvalidAgentIdError: exit code 2


def _message_id(message_id: str) -> str:
    try:
        ok = len(bytes.fromhex(message_id)) == 16
    except ValueError:
        ok = False
    if not ok:
        raise CommandFailed(ExitCode.USAGE, f"not a message id (32 hex digits): {message_id!r}")
    return message_id.lower()


def _not_found(action: Callable[[], object]) -> None:
    """Run ``action``; "no such peer, identity or message" becomes exit code 3 (the agent
    says so with a plain ValueError or LocalProtocolError, never a subclass)."""
    try:
        action()
    except (ValueError, LocalProtocolError) as exc:
        if type(exc) not in (ValueError, LocalProtocolError):
            raise
        raise CommandFailed(ExitCode.NOT_FOUND, str(exc)) from None


def _act_on(
    settings: Settings,
    message_id: str,
    action: Callable[[Agent, str], None],
    *,
    with_hub: bool = False,
) -> None:
    """``action(agent, message_id)``; an unknown id is exit code 3, a malformed one 2."""
    message_id = _message_id(message_id)
    with open_agent(settings, with_hub=with_hub) as agent:
        _not_found(lambda: action(agent, message_id))


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None  # set by cli()
    return settings


# -- the group and its global options ------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", message="%(version)s")
@click.option(
    "--id", "agent_id", envvar="AGENTMESH_ID", metavar="NAME", help="agent id [AGENTMESH_ID]"
)
@click.option(
    "--keypair",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="AGENTMESH_KEYPAIR",
    metavar="PATH",
    help="key file (default ~/.agentmesh/<id>.json) [AGENTMESH_KEYPAIR]",
)
@click.option(
    "--hub",
    envvar="AGENTMESH_HUB",
    metavar="HOST:PORT",
    help="the hub; a comma-separated list for failover [AGENTMESH_HUB]",
)
@click.option("--tls", is_flag=True, envvar="AGENTMESH_TLS", help="TLS to the hub [AGENTMESH_TLS]")
@click.option(
    "--ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="AGENTMESH_CA",
    metavar="FILE",
    help="PEM CA file to verify the hub with (implies --tls) [AGENTMESH_CA]",
)
@click.option(
    "--passphrase-env",
    envvar="AGENTMESH_PASSPHRASE_ENV",
    metavar="NAME",
    help="the environment variable holding the key file's passphrase [AGENTMESH_PASSPHRASE_ENV]",
)
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    envvar="AGENTMESH_LOG_LEVEL",
    help="library logging on stderr (default ERROR; WARNING for mcp) [AGENTMESH_LOG_LEVEL]",
)
@click.pass_context
def cli(
    ctx: click.Context,
    agent_id: str | None,
    keypair: Path | None,
    hub: str | None,
    tls: bool,
    ca: Path | None,
    passphrase_env: str | None,
    log_level: str | None,
) -> None:
    """End-to-end encrypted messaging for AI agents: one agent's command line.

    Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 timeout, 5 a peer's
    identity changed, 6 hub unreachable, 7 identity unavailable, 130 interrupted.
    """
    if log_level is None:
        log_level = "WARNING" if ctx.invoked_subcommand == "mcp" else "ERROR"
    level = getattr(logging, log_level.upper())
    logging.basicConfig(
        level=level, stream=sys.stderr, format="agentmesh: %(levelname)s %(name)s: %(message)s"
    )
    ctx.obj = Settings(
        agent_id=agent_id,
        keypair=keypair,
        hubs=parse_hubs(hub),
        tls=tls or ca is not None,
        ca_file=ca,
        passphrase_env=passphrase_env,
        log_level=level,
    )


pass_settings = click.make_pass_decorator(Settings)


# -- identity -------------------------------------------------------------------


@cli.command()
@pass_settings
def keygen(settings: Settings) -> None:
    """Create the key file (mode 0600) and print its fingerprint.

    Refuses to replace an existing key file. With --passphrase-env the file is
    encrypted (scrypt + AES-GCM) with that variable's value. With --hub the new
    agent also registers there, so that peers can write to it at once.
    """
    path = settings.key_path
    passphrase = settings.passphrase()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = StateLock(state_path_for(path).with_suffix(".lock"))  # the lock Agent takes
    lock.acquire()
    try:
        if path.exists():
            raise CommandFailed(ExitCode.USAGE, f"key file {path} already exists: not replaced")
        if state_path_for(path).exists():  # it would refuse the new key
            raise CommandFailed(
                ExitCode.USAGE,
                f"state file {state_path_for(path)} of a former identity is in the way: "
                "move it (and its -wal, -shm, -handled files) away first",
            )
        keypair = load_or_create_key_file(path, passphrase)
    finally:
        lock.release()
    if sys.stderr.isatty():
        click.echo(f"created {path}", err=True)
    emit(keypair.fingerprint)
    if settings.hubs:
        # Peers can only write to an id the hub knows: log in once, now.
        with open_agent(settings, with_hub=True) as agent:
            try:
                agent.wait_for_peer(agent.id, timeout=_REGISTER_TIMEOUT_S)
            except TimeoutError:
                raise CommandFailed(
                    ExitCode.HUB_UNAVAILABLE,
                    f"key file created, but the hub {settings.hub_label} did not answer: "
                    "the agent registers with its first command that reaches the hub",
                ) from None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object: id, fingerprint, hub")
@pass_settings
def whoami(settings: Settings, as_json: bool) -> None:
    """Print the agent id and its fingerprint (tab-separated)."""
    agent_id = settings.require_id()
    fingerprint = load_keypair(settings).fingerprint
    if as_json:
        emit_json({"id": agent_id, "fingerprint": fingerprint, "hub": settings.hub_label})
    else:
        emit(f"{agent_id}\t{fingerprint}")


@cli.command("safety-number")
@click.argument("peer")
@pass_settings
def safety_number(settings: Settings, peer: str) -> None:
    """Print the 60-digit safety number of this agent and PEER.

    Both sides get the same number; compare it over a channel you trust.
    """
    peer = _peer(peer)
    with open_agent(settings, with_hub=False) as agent:
        _not_found(lambda: emit(agent.safety_number(peer)))


@cli.command()
@click.argument("peer")
@click.argument("fingerprint")
@pass_settings
def trust(settings: Settings, peer: str, fingerprint: str) -> None:
    """Accept PEER's new identity key, after verifying FINGERPRINT out of band.

    Messages held back because the key changed are then delivered.
    """
    peer = _peer(peer)
    with open_agent(settings, with_hub=False) as agent:
        _not_found(lambda: agent.trust(peer, fingerprint))


# -- messages -------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="a JSON array")
@pass_settings
def peers(settings: Settings, as_json: bool) -> None:
    """List the other agents registered on the hub, one a line."""
    with open_agent(settings, with_hub=True) as agent:
        found = agent.list_peers()
    if as_json:
        emit_json(found)
    else:
        for peer in found:
            emit(peer)


@cli.command()
@click.argument("peer")
@click.argument("text")
@click.option("--data", metavar="JSON", help="a JSON object whose fields join the payload")
@click.option(
    "--no-wait", is_flag=True, help="return once it is in the outbox, before the hub has it"
)
@pass_settings
def send(settings: Settings, peer: str, text: str, data: str | None, no_wait: bool) -> None:
    """Send TEXT (- reads standard input) to PEER and print the message id.

    Waits until the hub has stored the message (exit 6, with the message queued in
    the outbox, if the hub cannot be reached).
    """
    peer, fields, body = _peer(peer), _data(data), _text(text)
    with open_agent(settings, with_hub=True) as agent:
        message_id = agent.send(peer, body, wait=not no_wait, **fields)
        emit(message_id)
        if not no_wait and any(e.message_id == message_id for e in agent.outbox()):
            raise CommandFailed(
                ExitCode.HUB_UNAVAILABLE,
                f"the hub is unreachable: message {message_id} waits in the outbox and goes "
                "with the next command that reaches the hub ('agentmesh outbox retry')",
            )


@cli.command()
@click.argument("peer")
@click.argument("text")
@click.option("--timeout", default=60.0, show_default=True, metavar="S", help="seconds to wait")
@click.option("--data", metavar="JSON", help="a JSON object whose fields join the payload")
@click.option("--json", "as_json", is_flag=True, help="print the whole reply as JSON")
@pass_settings
def request(
    settings: Settings, peer: str, text: str, timeout: float, data: str | None, as_json: bool
) -> None:
    """Send TEXT to PEER, wait for its reply, and print the reply's text."""
    peer, fields, body = _peer(peer), _data(data), _text(text)
    if timeout <= 0:
        raise CommandFailed(ExitCode.USAGE, "--timeout must be positive")
    with open_agent(settings, with_hub=True) as agent:
        try:
            with Progress(f"waiting for a reply from {peer}"):
                reply = agent.request(peer, body, timeout=timeout, **fields)
        except RequestTimeoutError as exc:
            if any(e.message_id == exc.message_id for e in agent.outbox()):
                raise CommandFailed(
                    ExitCode.HUB_UNAVAILABLE,
                    f"the hub is unreachable: request {exc.message_id} waits in the outbox "
                    "and goes with the next command that reaches the hub",
                ) from None
            raise
    if as_json:
        emit_json(message_json(reply))
    else:
        emit(terminal_text(reply.text))


@cli.command()
@click.option("--count", type=click.IntRange(min=1), metavar="N", help="stop after N messages")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per message")
@click.option(
    "--timeout", type=float, metavar="S", help="give up (exit 4) if no message comes in S seconds"
)
@pass_settings
def listen(settings: Settings, count: int | None, as_json: bool, timeout: float | None) -> None:
    """Print messages as they arrive, one a line (SENDER<TAB>TEXT, or JSON).

    Messages that arrived while nothing listened wait in the agent's inbox and
    come first. A printed message counts as handled.
    """
    with open_agent(settings, with_hub=True) as agent:
        received = 0
        while count is None or received < count:
            with Progress("waiting for messages"):
                message = agent.next_message(timeout)
            if as_json:
                emit_json(message_json(message))
            else:
                emit(f"{message.sender}\t{one_line(message.text)}")
            received += 1


# -- outbox and dead letters ------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per envelope")
@click.pass_context
def outbox(ctx: click.Context, as_json: bool) -> None:
    """List the messages the hub has not taken yet (MESSAGE_ID, RECIPIENT, CREATED, BYTES)."""
    if ctx.invoked_subcommand is not None:
        return
    with open_agent(_settings(ctx), with_hub=False) as agent:
        entries = agent.outbox()
    for e in entries:
        if as_json:
            emit_json(dataclasses.asdict(e))
        else:
            emit(f"{e.message_id}\t{e.recipient}\t{_iso(e.created_ms)}\t{e.size}")


@outbox.command("retry")
@click.option("--timeout", default=30.0, show_default=True, metavar="S", help="seconds to wait")
@pass_settings
def outbox_retry(settings: Settings, timeout: float) -> None:
    """Send the outbox to the hub now, in order, and wait until the hub has it all."""
    with open_agent(settings, with_hub=True) as agent:
        with Progress("sending the outbox"):
            done = agent.flush(timeout)
        if not done:
            left = len(agent.outbox())
            raise CommandFailed(
                ExitCode.TIMEOUT,
                f"{left} messages still wait in the outbox after {timeout} s (is the hub up?)",
            )


@outbox.command("discard")
@click.argument("message_id")
@pass_settings
def outbox_discard(settings: Settings, message_id: str) -> None:
    """Drop MESSAGE_ID from the outbox: it is not sent again."""
    _act_on(settings, message_id, Agent.discard_outbox)


@cli.group("dead-letters", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per dead letter")
@click.pass_context
def dead_letters(ctx: click.Context, as_json: bool) -> None:
    """List dead letters (MESSAGE_ID, DIRECTION, PEER, TIME, REASON, TEXT): received
    messages whose handler kept failing ("in"), and sent ones no resend could
    deliver ("out": refused for good, expired, or sealed for a replaced key)."""
    if ctx.invoked_subcommand is not None:
        return
    with open_agent(_settings(ctx), with_hub=False) as agent:
        letters = agent.dead_letters()
    for d in letters:
        if as_json:
            emit_json(dataclasses.asdict(d))
        else:
            text = "" if d.payload is None else str(d.payload.get("text", ""))
            emit(
                f"{d.message_id}\t{d.direction}\t{d.peer}\t{_iso(d.timestamp)}\t"
                f"{one_line(d.reason)}\t{one_line(text)}"
            )


@dead_letters.command("retry")
@click.argument("message_id")
@pass_settings
def dead_letter_retry(settings: Settings, message_id: str) -> None:
    """Retry MESSAGE_ID: a received one goes back to the inbox (``listen`` or the
    handlers get it again); a sent one goes back to the outbox and, with --hub, to
    the hub at once."""
    _act_on(settings, message_id, Agent.retry_dead_letter, with_hub=bool(settings.hubs))


@dead_letters.command("discard")
@click.argument("message_id")
@pass_settings
def dead_letter_discard(settings: Settings, message_id: str) -> None:
    """Delete MESSAGE_ID from the dead letters for good."""
    _act_on(settings, message_id, Agent.discard_dead_letter)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@pass_settings
def status(settings: Settings, as_json: bool) -> None:
    """Print the agent's state: sessions, pinned peers, outbox, inbox, dead letters
    (KEY<TAB>VALUE lines). Reads the state file; does not contact the hub."""
    with open_agent(settings, with_hub=False) as agent:
        snapshot = agent.status()
    snapshot["hub"] = settings.hub_label
    if as_json:
        emit_json(snapshot)
        return
    for key, value in snapshot.items():
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        emit(f"{key}\t{'' if shown is None else shown}")


# -- mcp ------------------------------------------------------------------------


@cli.command()
@click.option(
    "--http",
    metavar="HOST:PORT",
    help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio",
)
@pass_settings
def mcp(settings: Settings, http: str | None) -> None:
    """Serve this agent to MCP clients (Claude, Cursor, ...) as tools.

    Tools: send_message, check_inbox, reply, request, list_peers, whoami,
    safety_number. Needs the mcp extra: pip install 'agentmesh[mcp]'.
    """
    try:
        from agentmesh.cli import mcp_server
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("mcp"):
            raise
        raise CommandFailed(
            ExitCode.USAGE,
            "agentmesh mcp needs the MCP SDK: pip install 'agentmesh[mcp]'",
        ) from None
    mcp_server.serve(settings, http)


# -- entry point ------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM ends a listen or mcp like Ctrl-C: the agent closes, its files are released.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run ``agentmesh``; return the exit status (never raise, never a traceback)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        result = cli.main(args=argv, prog_name="agentmesh", standalone_mode=False)
    except click.exceptions.Abort:
        return ExitCode.INTERRUPTED
    except click.exceptions.NoArgsIsHelpError as exc:  # bare "agentmesh": the help
        sys.stderr.write(exc.ctx.get_help() + "\n" if exc.ctx is not None else "")
        return ExitCode.USAGE
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        sys.stderr.write(f"agentmesh: {one_line(exc.format_message())}{hint}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python's exit flush
        # of stdout from complaining.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.ERROR
    except Exception as exc:
        sys.stderr.write(error_line(exc) + "\n")
        return exit_code_for(exc)
    return result if isinstance(result, int) else ExitCode.OK
