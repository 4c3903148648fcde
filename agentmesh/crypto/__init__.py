"""Cryptographic core: identities, prekeys, PQXDH, the Double Ratchet, sessions.

Version 1's low-level names live here unchanged: ``AgentKeyPair``,
``CryptoSession``, ``perform_key_exchange``, ``seal``, ``unseal`` and
``CryptoError``. Nothing under ``agentmesh.crypto`` performs I/O or imports
asyncio, socket or sqlalchemy.
"""

from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.crypto.static import CryptoSession, perform_key_exchange, seal, unseal
from agentmesh.errors import CryptoError

__all__ = ["AgentKeyPair", "CryptoError", "CryptoSession", "perform_key_exchange", "seal", "unseal"]
