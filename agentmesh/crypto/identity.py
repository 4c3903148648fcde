"""Long-term agent identities: an Ed25519 signing key bound to an X25519 key.

Signal's specifications use one X25519 identity key with XEdDSA signatures.
``cryptography`` offers no XEdDSA, and we do not invent primitives, so an
AgentMesh identity is a *pair*: an Ed25519 key (signatures, hub login,
fingerprints) and an X25519 key (the ``IK`` of PQXDH, rev 3 section 2.4),
bound together by an Ed25519 signature over the X25519 key.

Fingerprints and safety numbers are derived from the Ed25519 key, which is
the key the binding signature makes authoritative.

No I/O; never imports asyncio or sqlalchemy.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agentmesh.crypto import primitives as p
from agentmesh.errors import DecodeError, InvalidKeyError
from agentmesh.wire.codec import Reader, Writer

_BINDING_CONTEXT = b"AgentMesh-identity-binding-v1"
IDENTITY_ENCODED_LEN = 32 + 32 + 64
_SAFETY_NUMBER_VERSION = b"\x00\x00"
_SAFETY_NUMBER_ITERATIONS = 5200


def fingerprint_of(signing_public: bytes) -> str:
    """SHA-256 of the Ed25519 identity key: 32 hex digits in 8 colon-joined groups of 4."""
    digest = p.sha256(signing_public).hex()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


def _safety_half(signing_public: bytes, agent_id: str) -> str:
    # Signal's NumericFingerprintGenerator: iterated SHA-512 over version,
    # key and stable identifier, then 6 chunks of 5 bytes mod 100000.
    digest = p.sha512(_SAFETY_NUMBER_VERSION + signing_public + agent_id.encode("utf-8"))
    for _ in range(_SAFETY_NUMBER_ITERATIONS):
        digest = p.sha512(digest + signing_public)
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )


def safety_number(id_a: str, key_a: bytes, id_b: str, key_b: bytes) -> str:
    """Signal-style 60-digit safety number for a pair, identical whichever side computes it.

    Returned as 12 groups of 5 digits separated by spaces.
    """
    halves = sorted([_safety_half(key_a, id_a), _safety_half(key_b, id_b)])
    digits = halves[0] + halves[1]
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """The public half of an identity: what peers pin and the hub binds an id to."""

    signing: bytes
    exchange: bytes
    binding: bytes

    def verify(self) -> PublicIdentity:
        """Check key lengths, the X25519 point, and the binding signature; return self.

        Raises InvalidKeyError or SignatureError.
        """
        p.ed25519_public_from_bytes(self.signing)
        p.validate_x25519_public(self.exchange)
        p.ed25519_verify(self.signing, self.binding, _BINDING_CONTEXT + self.exchange)
        return self

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.signing)

    def encode(self) -> bytes:
        return self.signing + self.exchange + self.binding

    @classmethod
    def decode(cls, data: bytes) -> PublicIdentity:
        """Parse 128 bytes (no verification: call :meth:`verify`)."""
        r = Reader(data, "identity")
        identity = cls.read(r)
        r.finish()
        return identity

    @classmethod
    def read(cls, r: Reader) -> PublicIdentity:
        return cls(signing=r.raw(32), exchange=r.raw(32), binding=r.raw(64))


class IdentityKeyPair:
    """An agent's long-term private keys. Holds key objects, never logs them."""

    __slots__ = ("_exchange", "_public", "_signing")

    def __init__(self, signing: Ed25519PrivateKey, exchange: X25519PrivateKey) -> None:
        self._signing = signing
        self._exchange = exchange
        exchange_pub = p.x25519_public_bytes(exchange)
        self._public = PublicIdentity(
            signing=p.ed25519_public_bytes(signing),
            exchange=exchange_pub,
            binding=signing.sign(_BINDING_CONTEXT + exchange_pub),
        )

    @classmethod
    def generate(cls, rng: p.RandomBytes = p.random_bytes) -> IdentityKeyPair:
        return cls(p.ed25519_generate(rng), p.x25519_generate(rng))

    @classmethod
    def from_private_bytes(cls, signing: bytes, exchange: bytes) -> IdentityKeyPair:
        """Rebuild from raw 32-byte private keys. Raises InvalidKeyError."""
        try:
            return cls(p.ed25519_private_from_bytes(signing), p.x25519_private_from_bytes(exchange))
        except ValueError as exc:
            raise InvalidKeyError("invalid private identity key") from exc

    def private_bytes(self) -> tuple[bytes, bytes]:
        """``(ed25519_private, x25519_private)`` raw bytes, for the key file only."""
        return p.ed25519_private_bytes(self._signing), p.x25519_private_bytes(self._exchange)

    @property
    def public(self) -> PublicIdentity:
        return self._public

    @property
    def fingerprint(self) -> str:
        return self._public.fingerprint

    @property
    def exchange_private(self) -> X25519PrivateKey:
        return self._exchange

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message)

    def __repr__(self) -> str:
        return f"IdentityKeyPair(fingerprint={self.fingerprint!r})"


def encode_identity_private(identity: IdentityKeyPair) -> bytes:
    """Versioned private serialization (used inside encrypted/plain key files)."""
    signing, exchange = identity.private_bytes()
    return Writer().u8(1).raw(signing).raw(exchange).getvalue()


def decode_identity_private(data: bytes) -> IdentityKeyPair:
    r = Reader(data, "identity private key")
    if r.u8() != 1:
        raise DecodeError("identity private key: unsupported version")
    signing, exchange = r.raw(32), r.raw(32)
    r.finish()
    return IdentityKeyPair.from_private_bytes(signing, exchange)
