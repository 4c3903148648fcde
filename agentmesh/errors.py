"""The AgentMesh exception tree.

Every exception the library raises on purpose derives from :class:`AgentMeshError`,
so ``except AgentMeshError`` catches them all. The tree separates *your* mistakes
from the *peer's*, as h11 does with Local/RemoteProtocolError::

    AgentMeshError
    ├── LocalProtocolError        you asked for something the protocol forbids
    │   ├── ConfigurationError    bad settings (paths, quotas, URLs)
    │   ├── NoHubError            the agent has no hub (also a RuntimeError, as in version 1)
    │   ├── PayloadError          a payload that is not JSON-safe (also TypeError, ValueError)
    │   └── MessageTooLargeError  larger than the hub accepts (also a ValueError)
    ├── PeerNotFoundError         the recipient never registered (also a ValueError)
    ├── RemoteProtocolError       the other side sent something invalid
    │   └── DecodeError           bytes that do not parse (frames, envelopes, state)
    ├── CryptoError               any cryptographic failure (opaque on purpose)
    │   ├── ReplayError           "Replay attack detected"
    │   ├── AuthenticationError   "Authentication tag mismatch"
    │   ├── SignatureError        a bad Ed25519 signature
    │   ├── InvalidKeyError       wrong length, low-order point, unparsable key
    │   ├── NoSessionError        no session can decrypt this message
    │   └── IdentityChangedError  a pinned peer presented a different identity key
    ├── StateLockedError          another process already holds this identity
    ├── RequestTimeoutError       no reply to request() in time (also a TimeoutError)
    ├── HubError                  the hub refused a request (carries its code)
    │   ├── MailboxFullError      the recipient's quota is exhausted
    │   └── AuthFailedError       login refused (bad signature, id bound to another key)
    └── HubUnavailableError       the hub cannot be reached right now

This module imports nothing from the rest of the package.
"""

from __future__ import annotations


class AgentMeshError(Exception):
    """Root of every exception AgentMesh raises on purpose."""


class LocalProtocolError(AgentMeshError):
    """The caller asked for something the protocol forbids (our side's fault)."""


class ConfigurationError(LocalProtocolError):
    """A setting is invalid: a path, URL, quota or option value."""


class NoHubError(LocalProtocolError, RuntimeError):
    """The agent was created without a hub and asked to talk to one
    (version 1's ``RuntimeError: No hub configured``)."""

    def __init__(self) -> None:
        super().__init__("No hub configured: pass hub=LocalHub() or NetworkHub(...) to Agent")


class PayloadError(LocalProtocolError, TypeError, ValueError):
    """A payload that JSON cannot carry exactly; ``field`` names the top-level key.

    A ``TypeError`` (a value of a type JSON has not) and a ``ValueError`` (what
    earlier versions raised for NaN and infinities), so old ``except`` clauses hold.
    """

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        where = "the payload" if field is None else f"payload field {field!r}"
        super().__init__(f"{where} is not JSON-safe: {reason}")


class MessageTooLargeError(LocalProtocolError, ValueError):
    """A message whose envelope would exceed the largest envelope the hub accepts;
    refused before anything was encrypted or committed."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"message too large: its envelope would be {size} bytes, and the hub accepts "
            f"at most {limit}"
        )


class PeerNotFoundError(AgentMeshError, ValueError):
    """The recipient is not registered on the hub (version 1's ``ValueError: Peer 'x'
    not found on hub``)."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        super().__init__(f"Peer '{peer_id}' not found on hub")


class RemoteProtocolError(AgentMeshError):
    """The peer (agent or hub) sent something that violates the protocol."""


class DecodeError(RemoteProtocolError):
    """Bytes that do not parse: unknown version, bad length, trailing data."""


class CryptoError(AgentMeshError):
    """Any cryptographic failure.

    Messages stay deliberately coarse: a sender learns nothing about *why*
    decryption failed beyond the category.
    """


class ReplayError(CryptoError):
    """A message was delivered a second time."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("Replay attack detected" + (f": {detail}" if detail else ""))


class AuthenticationError(CryptoError):
    """AEAD verification failed: the envelope was changed or is not for this session."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("Authentication tag mismatch" + (f": {detail}" if detail else ""))


class SignatureError(CryptoError):
    """An Ed25519 signature did not verify."""


class InvalidKeyError(CryptoError):
    """A public key has the wrong length, is a low-order point, or does not parse."""


class NoSessionError(CryptoError):
    """No session with this peer can decrypt the message."""


class IdentityChangedError(CryptoError):
    """A peer presented an identity key different from the pinned one.

    Sending to and receiving from that peer stop until the user calls
    ``Agent.trust(peer_id, fingerprint)`` with the new fingerprint.
    """

    def __init__(self, peer_id: str, pinned_fingerprint: str, new_fingerprint: str) -> None:
        self.peer_id = peer_id
        self.pinned_fingerprint = pinned_fingerprint
        self.new_fingerprint = new_fingerprint
        super().__init__(
            f"Identity key of {peer_id!r} changed: pinned {pinned_fingerprint}, "
            f"presented {new_fingerprint}. Verify the new fingerprint out of band, then call "
            f"agent.trust({peer_id!r}, {new_fingerprint!r})."
        )


class StateLockedError(AgentMeshError):
    """Another process already holds this identity's state (one process per identity)."""


class RequestTimeoutError(AgentMeshError, TimeoutError):
    """``Agent.request()`` got no reply in time. A reply that comes later is delivered
    like any other message (to the handlers or ``next_message``)."""

    def __init__(self, peer_id: str, message_id: str, timeout_s: float) -> None:
        self.peer_id = peer_id
        self.message_id = message_id
        super().__init__(f"no reply from {peer_id!r} to request {message_id} within {timeout_s} s")


class HubError(AgentMeshError):
    """The hub refused a request. ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


class MailboxFullError(HubError):
    """The recipient's mailbox quota (count or bytes) is exhausted; retry later."""


class AuthFailedError(HubError):
    """The hub refused the login: bad signature or an id bound to another key."""


class HubUnavailableError(AgentMeshError):
    """The hub cannot be reached right now."""
