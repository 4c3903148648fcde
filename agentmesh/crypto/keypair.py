"""Version 1's ``AgentKeyPair``: an identity key pair with the v1 dict format.

``to_dict``/``from_dict`` keep version 1's key-file shape,
``{"identity_private": b64, "exchange_private": b64}`` (urlsafe base64 of the
raw 32-byte Ed25519 and X25519 private keys), so old key files still load.
No I/O: reading and writing files is :mod:`agentmesh.keyfile`'s job.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair, PublicIdentity
from agentmesh.errors import DecodeError


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _unb64(value: object, name: str, length: int = 32) -> bytes:
    if not isinstance(value, str):
        raise DecodeError(f"key data: {name!r} missing or not a base64 string")
    try:
        raw = base64.urlsafe_b64decode(value.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise DecodeError(f"key data: {name!r} is not valid base64") from exc
    if len(raw) != length:
        raise DecodeError(f"key data: {name!r} must decode to {length} bytes")
    return raw


class AgentKeyPair:
    """An agent's long-term keys (Ed25519 identity + X25519 exchange)."""

    __slots__ = ("identity",)

    def __init__(self, identity: IdentityKeyPair | None = None) -> None:
        self.identity = identity if identity is not None else IdentityKeyPair.generate()

    @classmethod
    def generate(cls, rng: p.RandomBytes = p.random_bytes) -> AgentKeyPair:
        return cls(IdentityKeyPair.generate(rng))

    @property
    def public(self) -> PublicIdentity:
        return self.identity.public

    @property
    def fingerprint(self) -> str:
        """``a1b2:c3d4:…``: the first 32 hex digits of SHA-256(identity key)."""
        return self.identity.fingerprint

    def public_bundle(self) -> dict[str, Any]:
        """JSON-safe public keys (plus the binding signature and the fingerprint)."""
        public = self.identity.public
        return {
            "identity_public": _b64(public.signing),
            "exchange_public": _b64(public.exchange),
            "identity_binding": _b64(public.binding),
            "fingerprint": public.fingerprint,
        }

    def to_dict(self) -> dict[str, str]:
        """The version 1 key-file dict. It holds private keys: store it with care."""
        signing, exchange = self.identity.private_bytes()
        return {"identity_private": _b64(signing), "exchange_private": _b64(exchange)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentKeyPair:
        """Load the version 1 dict. Raises DecodeError for a malformed one."""
        if not isinstance(data, dict):
            raise DecodeError("key data must be a dict")
        signing = _unb64(data.get("identity_private"), "identity_private")
        exchange = _unb64(data.get("exchange_private"), "exchange_private")
        return cls(IdentityKeyPair.from_private_bytes(signing, exchange))

    def __repr__(self) -> str:
        return f"AgentKeyPair(fingerprint={self.fingerprint!r})"


def public_identity_from_bundle(bundle: dict[str, Any]) -> PublicIdentity:
    """The verified identity in a ``public_bundle()`` dict. Raises CryptoError/DecodeError."""
    if not isinstance(bundle, dict):
        raise DecodeError("bundle must be a dict")
    identity = PublicIdentity(
        signing=_unb64(bundle.get("identity_public"), "identity_public"),
        exchange=_unb64(bundle.get("exchange_public"), "exchange_public"),
        binding=_unb64(bundle.get("identity_binding"), "identity_binding", 64),
    )
    return identity.verify()
