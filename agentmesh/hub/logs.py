"""Log formats of the hub's command line: one record per line, whatever a peer sent.

``--log-format text`` (the default) writes ``TIME LEVEL LOGGER: MESSAGE``;
``--log-format json`` writes one JSON object per line with ``ts`` (UTC, ISO
8601), ``level``, ``logger``, ``msg``, ``exc`` when there is a traceback, and
the fields given with ``extra=``.

Peer-supplied strings are logged with ``%r`` by the hub already; these
formatters make the rule hold for every message anyway: JSON escapes all
control characters, and the text format writes each control character of the
message as an escape (``\\n``, ``\\x1b``, ``\\u2028``), so a message cannot
start a line of its own. A traceback in the text format keeps its lines (an
operator reads it) but each is indented, so none of them can pass for a record.

No I/O beyond the handler's stream; no import of the rest of the hub.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Final, TextIO

__all__ = ["LOG_FORMATS", "JsonFormatter", "TextFormatter", "configure_logging", "escape"]

LOG_FORMATS: Final = ("text", "json")

#: Attributes every LogRecord has; the others came with ``extra=``.
_RECORD_FIELDS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
#: Characters that end or break a line somewhere (str.splitlines, terminals).
_LINE_BREAKS: Final = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def escape(text: str) -> str:
    """``text`` with every control or line-breaking character written as an escape."""
    if text.isprintable():
        return text
    out: list[str] = []
    for char in text:
        if char.isprintable() and char not in _LINE_BREAKS:
            out.append(char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE`` on one line; a traceback follows, indented."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        return "\n".join("    " + escape(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (``json.dumps`` escapes every control)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry:
                entry[key] = value if isinstance(value, (str, int, float, bool)) else repr(value)
        return json.dumps(entry, ensure_ascii=True)


def configure_logging(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Send the root logger's records to ``stream`` (stderr) in ``log_format``.

    Replaces the root logger's handlers (the command line owns the process).
    Raises ValueError for a format not in :data:`LOG_FORMATS`.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
