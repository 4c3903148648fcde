"""What the front ends print: messages as JSON, peer text made safe for a terminal,
and the exit code (with its one line of explanation) for every error.

The exit codes (README, "Exit codes"):

==  ==========================================================================
0   success
1   any other error (a hub refusal such as a full mailbox, a crypto failure)
2   usage: a bad option, argument or ``--data``, or an invalid setting
3   not found: an unknown peer, message id, or pinned identity
4   timeout: no reply, no message, or the hub did not take the outbox in time
5   a peer's identity key changed: verify it, then ``agentmesh trust``
6   the hub cannot be reached, refused the login, or did not take a message yet
7   the identity cannot be opened: no key file, wrong or missing passphrase,
    or another process (an ``agentmesh mcp``?) holds it
130 interrupted (Ctrl-C)
==  ==========================================================================

Imports no click and no mcp.
"""

from __future__ import annotations

import enum
import re
from typing import Any

from agentmesh.agent import Message
from agentmesh.errors import (
    AgentMeshError,
    AuthFailedError,
    HubUnavailableError,
    IdentityChangedError,
    LocalProtocolError,
    PeerNotFoundError,
    StateLockedError,
)


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    TIMEOUT = 4
    IDENTITY_CHANGED = 5
    HUB_UNAVAILABLE = 6
    IDENTITY_UNAVAILABLE = 7
    INTERRUPTED = 130


class CommandFailed(AgentMeshError):
    """A command ends with ``code`` and one line saying why."""

    def __init__(self, code: ExitCode, text: str) -> None:
        self.code = code
        super().__init__(text)


class IdentityUnavailableError(LocalProtocolError):
    """The key file cannot be used: missing, encrypted without a passphrase, or the
    wrong passphrase (exit code 7, like StateLockedError)."""


def message_json(message: Message) -> dict[str, Any]:
    """A received message as ``listen --json`` prints it and ``check_inbox`` returns it."""
    return {
        "sender": message.sender,
        "text": message.text,
        "type": message.type,
        "payload": message.payload,
        "timestamp": message.timestamp,
        "message_id": message.message_id,
        "in_reply_to": message.in_reply_to,
    }


# Terminal controls in peer-supplied text (escape sequences, bidi overrides, line
# separators) are shown escaped, so a message cannot rewrite what the user sees.
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_KEEP_LINES = re.compile(f"[{_UNSAFE}]")
_UNSAFE_ONE_LINE = re.compile(f"[{_UNSAFE}\\n\\t\\\\]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def terminal_text(text: str) -> str:
    """``text`` with terminal controls escaped; newlines and tabs kept."""
    return _UNSAFE_KEEP_LINES.sub(_escape, text)


def one_line(text: str) -> str:
    """``text`` on one line: controls, newlines, tabs and backslashes escaped."""
    return _UNSAFE_ONE_LINE.sub(_escape, text)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The documented exit code for an error a command ended with."""
    if isinstance(exc, CommandFailed):
        return exc.code
    if isinstance(exc, IdentityChangedError):
        return ExitCode.IDENTITY_CHANGED
    if isinstance(exc, PeerNotFoundError):
        return ExitCode.NOT_FOUND
    if isinstance(exc, TimeoutError):  # RequestTimeoutError, next_message, wait_for_peer
        return ExitCode.TIMEOUT
    if isinstance(exc, HubUnavailableError | AuthFailedError):
        return ExitCode.HUB_UNAVAILABLE
    if isinstance(exc, StateLockedError):
        return ExitCode.IDENTITY_UNAVAILABLE
    if isinstance(exc, IdentityUnavailableError):
        return ExitCode.IDENTITY_UNAVAILABLE
    if isinstance(exc, LocalProtocolError | ValueError):
        return ExitCode.USAGE
    return ExitCode.ERROR


def error_line(exc: BaseException) -> str:
    """One line for stderr saying what went wrong (and, where it helps, what to do)."""
    if isinstance(exc, IdentityChangedError):
        text = (
            f"the identity key of {exc.peer_id!r} changed: pinned {exc.pinned_fingerprint}, "
            f"now presented {exc.new_fingerprint}; messages to and from {exc.peer_id} are "
            f"held back. Ask {exc.peer_id}'s operator over a channel you trust for the "
            f"fingerprint 'agentmesh --id {exc.peer_id} whoami' prints; only if it matches, "
            f"run 'agentmesh trust {exc.peer_id} {exc.new_fingerprint}'"
        )
    elif isinstance(exc, StateLockedError):
        text = f"{exc} (is an 'agentmesh mcp' or another program running as this agent?)"
    elif isinstance(exc, AgentMeshError | ValueError | TimeoutError | OSError):
        text = str(exc) or type(exc).__name__
    else:
        text = f"internal error: {type(exc).__name__}: {exc}"
    return "agentmesh: " + one_line(text)
