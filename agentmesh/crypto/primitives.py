"""Thin, validating wrappers over the ``cryptography`` package's primitives.

This is the only module that touches ``cryptography`` directly. It adds the
checks the protocols need (key lengths, low-order X25519 points, opaque
errors) and nothing of its own: no primitive is invented here.

Never imports asyncio, sqlalchemy or any I/O module.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from agentmesh.errors import AuthenticationError, InvalidKeyError, SignatureError

#: Randomness source; tests inject a deterministic one through the ``rng`` arguments.
RandomBytes = Callable[[int], bytes]

X25519_KEY_LEN = 32
ED25519_KEY_LEN = 32
ED25519_SIG_LEN = 64
MLKEM768_PUBLIC_LEN = 1184
MLKEM768_CIPHERTEXT_LEN = 1088
MLKEM768_SEED_LEN = 64
AES_KEY_LEN = 32
GCM_NONCE_LEN = 12

# RFC 7748 section 6.1 says to check for an all-zero shared secret. Besides that,
# we refuse the well-known low-order points (and their non-canonical aliases)
# as *public keys*, so a malicious bundle is rejected before any DH is computed.
_LOW_ORDER_POINTS = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "cdeb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",
        "4c9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7",
        "d9ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "daffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "dbffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    )
)
_ZERO32 = bytes(32)

# Ed25519 encodings of small-order points, sign bit cleared (libsodium's
# blocklist: 0, 1, the two order-8 points, p-1, p and p+1). A signature under
# such a key verifies for many messages, so none may serve as an identity key.
_SMALL_ORDER_ED25519 = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)


def random_bytes(n: int) -> bytes:
    """Cryptographically secure random bytes (the default ``rng``)."""
    return os.urandom(n)


# --- X25519 -----------------------------------------------------------------


def x25519_private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != X25519_KEY_LEN:
        raise InvalidKeyError("X25519 private key must be 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_generate(rng: RandomBytes = random_bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(rng(X25519_KEY_LEN))


def x25519_private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def x25519_public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    if isinstance(key, X25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def validate_x25519_public(raw: bytes) -> bytes:
    """Return ``raw`` if it is a usable X25519 public key, else raise InvalidKeyError."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != X25519_KEY_LEN:
        raise InvalidKeyError("X25519 public key must be 32 bytes")
    raw = bytes(raw)
    # Masking the top bit first catches the aliases that differ only in bit 255.
    masked = raw[:31] + bytes([raw[31] & 0x7F])
    if raw in _LOW_ORDER_POINTS or masked in _LOW_ORDER_POINTS:
        raise InvalidKeyError("X25519 public key is a low-order point")
    return raw


def x25519(private: X25519PrivateKey, public_raw: bytes) -> bytes:
    """X25519 Diffie-Hellman (RFC 7748) with public-key validation.

    Raises InvalidKeyError for a wrong-length or low-order public key, or an
    all-zero result (RFC 7748 section 6.1).
    """
    public = X25519PublicKey.from_public_bytes(validate_x25519_public(public_raw))
    try:
        shared = private.exchange(public)
    except ValueError as exc:  # cryptography refuses all-zero outputs itself
        raise InvalidKeyError("X25519 produced an all-zero shared secret") from exc
    if hmac.compare_digest(shared, _ZERO32):
        raise InvalidKeyError("X25519 produced an all-zero shared secret")
    return shared


# --- Ed25519 ----------------------------------------------------------------


def ed25519_generate(rng: RandomBytes = random_bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(rng(ED25519_KEY_LEN))


def ed25519_private_from_bytes(raw: bytes) -> Ed25519PrivateKey:
    if len(raw) != ED25519_KEY_LEN:
        raise InvalidKeyError("Ed25519 private key must be 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


def ed25519_private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def ed25519_public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def is_small_order_ed25519(raw: bytes) -> bool:
    """Whether ``raw`` encodes a small-order Ed25519 point (never a valid identity key)."""
    return len(raw) == 32 and raw[:31] + bytes((raw[31] & 0x7F,)) in _SMALL_ORDER_ED25519


def ed25519_public_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Parse an Ed25519 public key; wrong lengths and small-order points raise InvalidKeyError.

    Parsed keys are immutable and public, so the last few hundred are kept:
    a receiver verifies every message of a peer under the same key.
    """
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != ED25519_KEY_LEN:
        raise InvalidKeyError("Ed25519 public key must be 32 bytes")
    return _ed25519_public(bytes(raw))


@functools.lru_cache(maxsize=512)
def _ed25519_public(raw: bytes) -> Ed25519PublicKey:
    # lru_cache keeps only returns: a refused key is checked again each time.
    if is_small_order_ed25519(raw):
        raise InvalidKeyError("Ed25519 public key is a small-order point")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidKeyError("invalid Ed25519 public key") from exc


def ed25519_verify(public: Ed25519PublicKey | bytes, signature: bytes, message: bytes) -> None:
    """Verify or raise SignatureError. Never returns a boolean to forget to check."""
    if isinstance(public, (bytes, bytearray)):
        public = ed25519_public_from_bytes(public)
    if len(signature) != ED25519_SIG_LEN:
        raise SignatureError("Invalid signature")
    try:
        public.verify(signature, message)
    except InvalidSignature as exc:
        raise SignatureError("Invalid signature") from exc


# --- ML-KEM-768 (FIPS 203) --------------------------------------------------


def mlkem_generate(rng: RandomBytes = random_bytes) -> MLKEM768PrivateKey:
    return MLKEM768PrivateKey.from_seed_bytes(rng(MLKEM768_SEED_LEN))


def mlkem_private_from_seed(seed: bytes) -> MLKEM768PrivateKey:
    if len(seed) != MLKEM768_SEED_LEN:
        raise InvalidKeyError("ML-KEM-768 seed must be 64 bytes")
    return MLKEM768PrivateKey.from_seed_bytes(seed)


def mlkem_private_seed(key: MLKEM768PrivateKey) -> bytes:
    return key.private_bytes_raw()


def mlkem_public_bytes(key: MLKEM768PrivateKey | MLKEM768PublicKey) -> bytes:
    if isinstance(key, MLKEM768PrivateKey):
        key = key.public_key()
    return key.public_bytes_raw()


def mlkem_encapsulate(public_raw: bytes) -> tuple[bytes, bytes]:
    """Return ``(shared_secret, ciphertext)`` for an ML-KEM-768 public key."""
    if not isinstance(public_raw, (bytes, bytearray)) or len(public_raw) != MLKEM768_PUBLIC_LEN:
        raise InvalidKeyError("ML-KEM-768 public key must be 1184 bytes")
    try:
        public = MLKEM768PublicKey.from_public_bytes(bytes(public_raw))
    except ValueError as exc:
        raise InvalidKeyError("invalid ML-KEM-768 public key") from exc
    shared, ciphertext = public.encapsulate()
    return shared, ciphertext


def mlkem_decapsulate(private: MLKEM768PrivateKey, ciphertext: bytes) -> bytes:
    if len(ciphertext) != MLKEM768_CIPHERTEXT_LEN:
        raise InvalidKeyError("ML-KEM-768 ciphertext must be 1088 bytes")
    try:
        return private.decapsulate(ciphertext)
    except ValueError as exc:
        raise InvalidKeyError("invalid ML-KEM-768 ciphertext") from exc


# --- Hashes, HMAC, HKDF -----------------------------------------------------


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869). ``salt=None`` means a zero-filled salt of hash length."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# --- AES-256-GCM ------------------------------------------------------------


def aes_gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aes_gcm_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Decrypt or raise AuthenticationError ("Authentication tag mismatch")."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated_data)
    except (InvalidTag, ValueError) as exc:
        raise AuthenticationError() from exc


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
