"""What the front ends print: peer text made safe for a terminal (property tests),
and one documented exit code per kind of error."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentmesh.cli.output import ExitCode, error_line, exit_code_for, one_line, terminal_text
from agentmesh.errors import (
    AuthFailedError,
    ConfigurationError,
    CryptoError,
    HubUnavailableError,
    IdentityChangedError,
    MailboxFullError,
    PeerNotFoundError,
    RequestTimeoutError,
    StateLockedError,
)
from agentmesh.ids import InvalidAgentIdError

# C0 and C1 controls, DEL, line and paragraph separators, bidi overrides and isolates.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@given(st.text())
def test_one_line_leaves_no_control_and_no_line_break(text: str) -> None:
    shown = one_line(text)
    assert not UNSAFE.search(shown)
    assert shown.encode("ascii", "backslashreplace").decode("unicode_escape") == text


@given(st.text())
def test_terminal_text_keeps_lines_and_tabs_only(text: str) -> None:
    shown = terminal_text(text)
    assert not UNSAFE.search(shown.replace("\n", "").replace("\t", ""))
    assert shown.count("\n") == text.count("\n")


def test_an_escape_sequence_is_shown_not_run() -> None:
    assert one_line("red\x1b[31m\nnext\\") == "red\\x1b[31m\\nnext\\\\"
    assert terminal_text("a\x1b]0;title\x07\nb\u202e") == "a\\x1b]0;title\\x07\nb\\u202e"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PeerNotFoundError("bob"), ExitCode.NOT_FOUND),
        (RequestTimeoutError("bob", "ab" * 16, 1.0), ExitCode.TIMEOUT),
        (TimeoutError("no message"), ExitCode.TIMEOUT),
        (IdentityChangedError("bob", "aaaa", "bbbb"), ExitCode.IDENTITY_CHANGED),
        (HubUnavailableError("down"), ExitCode.HUB_UNAVAILABLE),
        (AuthFailedError("wrong_hub", "not me"), ExitCode.HUB_UNAVAILABLE),
        (StateLockedError("held"), ExitCode.IDENTITY_UNAVAILABLE),
        (ConfigurationError("bad"), ExitCode.USAGE),
        (InvalidAgentIdError("bad id"), ExitCode.USAGE),
        (MailboxFullError("mailbox_full", "full"), ExitCode.ERROR),
        (CryptoError("tag"), ExitCode.ERROR),
        (KeyError("bug"), ExitCode.ERROR),
    ],
)
def test_each_error_has_its_exit_code_and_one_line(error: Exception, code: ExitCode) -> None:
    assert exit_code_for(error) == code
    line = error_line(error)
    assert line.startswith("agentmesh: ") and "\n" not in line


def test_a_hub_message_cannot_break_the_error_line() -> None:
    line = error_line(MailboxFullError("mailbox_full", "full\n\x1b[2Jforged line"))
    assert "\n" not in line and "\x1b" not in line
