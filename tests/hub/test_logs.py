"""The hub's log formats: one record per line, whatever the message holds."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentmesh.hub.logs import configure_logging, escape

BREAKS = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85", "\x1c", "\x0b", "\x0c", "\x1b[2J"]


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream, logging.getLogger("agentmesh.test.logs")
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_message_with_line_breaks_stays_one_line(
    captured: tuple[io.StringIO, logging.Logger], log_format: str
) -> None:
    stream, log = captured
    configure_logging("INFO", log_format, stream)
    for br in BREAKS:
        log.warning("peer said %s", f"x{br}FORGED line")
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(BREAKS)
    assert not [line for line in lines if line.startswith("FORGED")]
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        assert [r["msg"] for r in records] == [f"peer said x{br}FORGED line" for br in BREAKS]
        assert {r["level"] for r in records} == {"WARNING"}
        assert all(r["logger"] == "agentmesh.test.logs" for r in records)
        assert all(r["ts"].endswith("Z") for r in records)
    else:
        assert "peer said x\\nFORGED line" in lines[0]
        assert "\x1b" not in stream.getvalue()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_tracebacks_cannot_pass_for_records(
    captured: tuple[io.StringIO, logging.Logger], log_format: str
) -> None:
    stream, log = captured
    configure_logging("INFO", log_format, stream)
    try:
        raise ValueError("bad\nFORGED line")
    except ValueError:
        log.exception("it failed")
    log.info("with extra", extra={"agent_id": "alice", "count": 3})
    text = stream.getvalue()
    assert not [line for line in text.splitlines() if line.startswith("FORGED")]
    if log_format == "json":
        first, second = (json.loads(line) for line in text.splitlines())
        assert "ValueError: bad\nFORGED line" in first["exc"]
        assert (second["agent_id"], second["count"]) == ("alice", 3)
    else:
        continuation = text.splitlines()[1:-1]
        assert continuation and all(line.startswith("    ") for line in continuation)


@given(st.text())
def test_escape_leaves_no_line_break(text: str) -> None:
    escaped = escape(text)
    assert len(escaped.splitlines()) <= 1
    assert all(ch.isprintable() for ch in escaped)
    if text.isprintable():
        assert escaped == text
