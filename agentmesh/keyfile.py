"""The identity key file: load, create, and (optionally) passphrase-encrypt.

Formats (JSON):

* version 1 (still loads, and is what an unencrypted file holds)::

      {"identity_private": b64, "exchange_private": b64}

* encrypted with a passphrase::

      {"format": "agentmesh-key-v2", "kdf": "scrypt", "n": 32768, "r": 8, "p": 1,
       "salt": b64, "nonce": b64, "ciphertext": b64}

  ``ciphertext`` is AES-256-GCM, under the scrypt-derived key, of the
  version 1 JSON, with the format string as associated data.

Files are written atomically (temporary file in the same folder, fsync,
rename, fsync of the folder) with mode 0600, so a crash never leaves a
truncated key and no other user can read it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agentmesh.crypto import primitives as p
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.errors import AuthenticationError, ConfigurationError, DecodeError

log = logging.getLogger("agentmesh.keyfile")

ENCRYPTED_FORMAT = "agentmesh-key-v2"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
_MAX_KEY_FILE_BYTES = 64 * 1024


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (temp file, fsync, rename, fsync dir)."""
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _scrypt_key(passphrase: str, salt: bytes, n: int, r: int, p_: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p_).derive(passphrase.encode("utf-8"))


def encode_key_file(keypair: AgentKeyPair, passphrase: str | None = None) -> bytes:
    """Serialize a key pair to key-file bytes, encrypted if ``passphrase`` is given."""
    plain = json.dumps(keypair.to_dict()).encode()
    if passphrase is None:
        return plain + b"\n"
    salt, nonce = p.random_bytes(16), p.random_bytes(12)
    key = _scrypt_key(passphrase, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    ciphertext = p.aes_gcm_encrypt(key, nonce, plain, ENCRYPTED_FORMAT.encode())
    doc = {
        "format": ENCRYPTED_FORMAT,
        "kdf": "scrypt",
        "n": _SCRYPT_N,
        "r": _SCRYPT_R,
        "p": _SCRYPT_P,
        "salt": base64.urlsafe_b64encode(salt).decode(),
        "nonce": base64.urlsafe_b64encode(nonce).decode(),
        "ciphertext": base64.urlsafe_b64encode(ciphertext).decode(),
    }
    return json.dumps(doc).encode() + b"\n"


def _field(doc: dict[str, Any], name: str) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str):
        raise DecodeError(f"key file: {name!r} missing")
    try:
        return base64.urlsafe_b64decode(value.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise DecodeError(f"key file: {name!r} is not base64") from exc


def decode_key_file(data: bytes, passphrase: str | None = None) -> AgentKeyPair:
    """Parse key-file bytes. Raises DecodeError (malformed), ConfigurationError
    (encrypted but no passphrase) or AuthenticationError (wrong passphrase)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("key file is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise DecodeError("key file must hold a JSON object")
    if doc.get("format") != ENCRYPTED_FORMAT:
        return AgentKeyPair.from_dict(doc)
    if passphrase is None:
        raise ConfigurationError("key file is encrypted: pass passphrase=... to Agent")
    params = [doc.get(k) for k in ("n", "r", "p")]
    if not all(type(v) is int and 0 < v <= 2**20 for v in params) or doc.get("kdf") != "scrypt":
        raise DecodeError("key file: unsupported KDF parameters")
    n, r, p_ = (int(v) for v in params)  # type: ignore[arg-type]
    # scrypt needs n to be a power of two; cap memory (128*n*r bytes) and work so that
    # a crafted file cannot exhaust memory or CPU (we write n=2**15, r=8, p=1).
    if n < 2 or n & (n - 1) or n * r > 2**20 or n * r * p_ > 2**22:
        raise DecodeError("key file: unsupported KDF parameters")
    key = _scrypt_key(passphrase, _field(doc, "salt"), n, r, p_)
    try:
        plain = p.aes_gcm_decrypt(
            key, _field(doc, "nonce"), _field(doc, "ciphertext"), ENCRYPTED_FORMAT.encode()
        )
    except AuthenticationError as exc:
        raise AuthenticationError("wrong passphrase or corrupted key file") from exc
    return decode_key_file(plain)


def load_or_create_key_file(
    path: str | os.PathLike[str], passphrase: str | None = None
) -> AgentKeyPair:
    """Load the key pair at ``path``, or create one there (mode 0600) if it does not exist."""
    target = Path(path)
    if target.exists():
        info = target.stat()
        if info.st_size > _MAX_KEY_FILE_BYTES:
            raise DecodeError("key file is too large to be a key file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            log.warning("key file %s was readable by others; restricting it to 0600", target)
            os.chmod(target, 0o600)
        return decode_key_file(target.read_bytes(), passphrase)
    keypair = AgentKeyPair.generate()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, encode_key_file(keypair, passphrase))
    return keypair
