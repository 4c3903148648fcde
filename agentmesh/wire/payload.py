"""Message payloads: a JSON object, UTF-8, compact.

Payloads are user dicts (``{"type": "message", "text": ..., **extra}``), so
JSON is the natural encoding; it lives *inside* the ciphertext and never on
the hub's hot path. Decoding is strict: the top level must be an object.
"""

from __future__ import annotations

import json
from typing import Any

from agentmesh.errors import DecodeError


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Serialize a JSON-safe dict. Raises TypeError/ValueError for anything else."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, not {type(payload).__name__}")
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def decode_payload(data: bytes) -> dict[str, Any]:
    """Parse a payload; raises DecodeError unless it is a JSON object."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("payload is not valid UTF-8 JSON") from exc
    if not isinstance(value, dict):
        raise DecodeError("payload is not a JSON object")
    return value
