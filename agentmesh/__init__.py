"""AgentMesh: end-to-end encrypted, store-and-forward messaging for AI agents.

The public surface (pinned by ``tests/test_exports.py``): version 1's names
plus the error tree and the new trust and hub types.
"""

from typing import TYPE_CHECKING

from agentmesh.agent import Agent, AgentEndpoint, DeadLetter, Message
from agentmesh.crypto import AgentKeyPair, CryptoSession, perform_key_exchange, seal, unseal
from agentmesh.crypto.proof import VerifiedProof, verify_proof
from agentmesh.errors import (
    AgentMeshError,
    AuthenticationError,
    AuthFailedError,
    ConfigurationError,
    CryptoError,
    DecodeError,
    HubError,
    HubUnavailableError,
    IdentityChangedError,
    LocalProtocolError,
    MailboxFullError,
    MessageTooLargeError,
    NoHubError,
    PayloadError,
    PeerNotFoundError,
    RemoteProtocolError,
    ReplayError,
    RequestTimeoutError,
    SignatureError,
    StateLockedError,
)

if TYPE_CHECKING:  # type checkers see the lazy names (below) as what they are
    from agentmesh.async_agent import AsyncAgent
    from agentmesh.hub.async_client import AsyncNetworkHub
    from agentmesh.hub.client import NetworkHub
    from agentmesh.hub.local import LocalHub
    from agentmesh.hub.server import NetworkHubServer

__version__ = "2.0.0.dev0"


def __getattr__(name: str) -> object:
    # An agent is not a hub: the hubs (and SQLAlchemy and Alembic behind LocalHub's
    # store, asyncio behind the network ones) load on first use.
    if name == "AsyncAgent":
        from agentmesh.async_agent import AsyncAgent

        return AsyncAgent
    if name == "AsyncNetworkHub":
        from agentmesh.hub.async_client import AsyncNetworkHub

        return AsyncNetworkHub
    if name == "LocalHub":
        from agentmesh.hub.local import LocalHub

        return LocalHub
    if name == "NetworkHub":
        from agentmesh.hub.client import NetworkHub

        return NetworkHub
    if name == "NetworkHubServer":
        from agentmesh.hub.server import NetworkHubServer

        return NetworkHubServer
    raise AttributeError(f"module 'agentmesh' has no attribute {name!r}")


__all__ = [
    "Agent",
    "AgentEndpoint",
    "AgentKeyPair",
    "AgentMeshError",
    "AsyncAgent",
    "AsyncNetworkHub",
    "AuthFailedError",
    "AuthenticationError",
    "ConfigurationError",
    "CryptoError",
    "CryptoSession",
    "DeadLetter",
    "DecodeError",
    "HubError",
    "HubUnavailableError",
    "IdentityChangedError",
    "LocalHub",
    "LocalProtocolError",
    "MailboxFullError",
    "Message",
    "MessageTooLargeError",
    "NetworkHub",
    "NetworkHubServer",
    "NoHubError",
    "PayloadError",
    "PeerNotFoundError",
    "RemoteProtocolError",
    "ReplayError",
    "RequestTimeoutError",
    "SignatureError",
    "StateLockedError",
    "VerifiedProof",
    "__version__",
    "perform_key_exchange",
    "seal",
    "unseal",
    "verify_proof",
]
