"""Agent id validation.

An agent id is 1 to 64 characters from ``A-Z a-z 0-9 . _ -``, starting with a
letter or digit. The set is small on purpose: ids appear in file names, SQL
parameters, log lines and the envelope header, and none of those contexts may
be able to misread an id (no path separators, quotes, whitespace or controls).
"""

from __future__ import annotations

import re

from agentmesh.errors import LocalProtocolError

MAX_AGENT_ID_LENGTH = 64
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidAgentIdError(LocalProtocolError, ValueError):
    """An agent id outside the documented length or character set."""


def validate_agent_id(agent_id: object) -> str:
    """Return ``agent_id`` unchanged if valid, else raise :class:`InvalidAgentIdError`."""
    if not isinstance(agent_id, str):
        raise InvalidAgentIdError(f"agent id must be a str, not {type(agent_id).__name__}")
    if not _AGENT_ID.fullmatch(agent_id):
        raise InvalidAgentIdError(
            f"invalid agent id {agent_id!r}: use 1-{MAX_AGENT_ID_LENGTH} characters from "
            "A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return agent_id
