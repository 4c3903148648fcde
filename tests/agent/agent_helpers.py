"""Helpers shared by the tests under tests/agent (imported by name; no package).

``Inbox`` and ``flip`` are in ``tests/agentkit.py``, shared with the other folders.
"""

from __future__ import annotations

from typing import Any

from agentmesh import LocalHub
from agentmesh.wire.envelope import decode_envelope


class RecordingHub(LocalHub):
    """A LocalHub that keeps a copy of every envelope handed to ``deliver`` or ``route``.

    ``LocalHub.deliver(hub, data)`` re-injects a recorded envelope without
    recording it again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.envelopes: list[bytes] = []
        #: While True, envelopes are recorded but not passed on (an interception).
        self.hold = False

    def deliver(self, envelope: Any) -> None:
        self.envelopes.append(bytes(envelope))
        if not self.hold:
            super().deliver(envelope)

    def route(self, envelope: bytes) -> None:  # what an Agent's send calls
        self.envelopes.append(bytes(envelope))
        if not self.hold:
            super().route(envelope)

    def to(self, recipient: str) -> list[bytes]:
        """Recorded envelopes addressed to ``recipient``."""
        return [e for e in self.envelopes if decode_envelope(e).recipient == recipient]


def identity_signing_offset(data: bytes) -> int:
    """Offset of ``identity_signing`` in a prekey envelope (see wire/envelope.py)."""
    envelope = decode_envelope(data)
    assert envelope.prekey is not None, "not a prekey envelope"
    sender, recipient = envelope.sender.encode(), envelope.recipient.encode()
    # version, kind, message id, timestamp, str8 sender, str8 recipient, DH, PN, N
    return 1 + 1 + 16 + 8 + 1 + len(sender) + 1 + len(recipient) + 32 + 4 + 4
