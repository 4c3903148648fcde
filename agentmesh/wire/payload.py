"""Message payloads: a JSON object, UTF-8, compact.

Payloads are user dicts (``{"type": "message", "text": ..., **extra}``), so
JSON is the natural encoding; it lives *inside* the ciphertext and never on
the hub's hot path. Decoding is strict: the top level must be an object.
"""

from __future__ import annotations

import json
from typing import Any

from agentmesh.errors import DecodeError, PayloadError


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Serialize a JSON-safe dict. Raises PayloadError (a TypeError) naming the first
    top-level field that JSON cannot carry exactly (a datetime, bytes, NaN, …)."""
    if not isinstance(payload, dict):
        raise PayloadError(None, f"payload must be a dict, not {type(payload).__name__}")
    try:
        return _dumps(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        for key, value in payload.items():
            if not isinstance(key, str):
                raise PayloadError(repr(key), "keys must be strings") from exc
            try:
                _dumps(value)
            except (TypeError, ValueError, RecursionError) as field_exc:
                raise PayloadError(key, str(field_exc)) from exc
        raise PayloadError(None, str(exc)) from exc


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def decode_payload(data: bytes) -> dict[str, Any]:
    """Parse a payload; raises DecodeError unless it is a JSON object."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("payload is not valid UTF-8 JSON") from exc
    if not isinstance(value, dict):
        raise DecodeError("payload is not a JSON object")
    return value
