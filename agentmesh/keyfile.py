"""The identity key file: load, create, and (optionally) passphrase-encrypt.

Formats (JSON):

* version 1 (still loads, and is what an unencrypted file holds)::

      {"identity_private": b64, "exchange_private": b64}

* encrypted with a passphrase::

      {"format": "agentmesh-key-v2", "kdf": "scrypt", "n": 131072, "r": 8, "p": 1,
       "salt": b64, "nonce": b64, "ciphertext": b64}

  ``ciphertext`` is AES-256-GCM, under the scrypt-derived key, of the
  version 1 JSON, with the format string as associated data. New files get
  n=2**17, r=8, p=1 (128 MiB, about 0.7 s); files written with other
  parameters are read with their own, within limits that keep a crafted file
  from exhausting memory or CPU (:func:`check_scrypt_parameters`).

Given a passphrase, :func:`load_or_create_key_file` leaves no key file
weaker than it would write: a plaintext file is encrypted, and one encrypted
with a lower scrypt cost is encrypted again, both atomically, same identity.

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
#: Written to new files (module-level so that tests can make scrypt cheap; the
#: default stays 2**17, the cost current guidance asks for with r=8).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**17, 8, 1
#: Limits on a file's parameters: scrypt takes 128*n*r bytes (here at most 128 MiB,
#: what we write) and time in proportion to n*r*p (at most 4x what we write).
_MAX_SCRYPT_NR = 2**20
_MAX_SCRYPT_NRP = 2**22
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


def check_scrypt_parameters(n: object, r: object, p_: object) -> tuple[int, int, int]:
    """Return ``(n, r, p)`` if scrypt may run with them, else raise DecodeError.

    ``n`` must be a power of two of at least 2, ``r`` and ``p`` positive
    integers, memory (128*n*r bytes) at most 128 MiB (so n at most 2**20) and
    work (n*r*p) at most 2**22, so that a crafted key file cannot exhaust
    memory or CPU.
    """
    # type() rather than isinstance(): True is an int too.
    if type(n) is not int or type(r) is not int or type(p_) is not int:
        raise DecodeError("key file: the scrypt parameters n, r and p must be integers")
    if n < 2 or n & (n - 1):
        raise DecodeError(f"key file: scrypt n={n} is not a power of two of at least 2")
    if r < 1 or p_ < 1:
        raise DecodeError(f"key file: scrypt r={r} and p={p_} must be at least 1")
    if n * r > _MAX_SCRYPT_NR:
        raise DecodeError(
            f"key file: scrypt n={n}, r={r} would take {128 * n * r >> 20} MiB of memory "
            f"(at most {128 * _MAX_SCRYPT_NR >> 20} MiB allowed)"
        )
    if n * r * p_ > _MAX_SCRYPT_NRP:
        raise DecodeError(
            f"key file: scrypt n={n}, r={r}, p={p_} is more work than allowed "
            f"(n*r*p at most {_MAX_SCRYPT_NRP})"
        )
    return n, r, p_


def _field(doc: dict[str, Any], name: str) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str):
        raise DecodeError(f"key file: {name!r} missing")
    try:
        return base64.urlsafe_b64decode(value.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise DecodeError(f"key file: {name!r} is not base64") from exc


def decode_key_file(data: bytes, passphrase: str | None = None) -> AgentKeyPair:
    """Parse key-file bytes. Raises DecodeError (malformed, or scrypt parameters out
    of bounds), ConfigurationError (encrypted but no passphrase) or
    AuthenticationError (wrong passphrase)."""
    return _decode(data, passphrase)[0]


def _decode(
    data: bytes, passphrase: str | None
) -> tuple[AgentKeyPair, tuple[int, int, int] | None]:
    """:func:`decode_key_file`, also returning the file's scrypt ``(n, r, p)``
    (None for a plaintext file)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("key file is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise DecodeError("key file must hold a JSON object")
    if doc.get("format") != ENCRYPTED_FORMAT:
        return AgentKeyPair.from_dict(doc), None
    if passphrase is None:
        raise ConfigurationError("key file is encrypted: pass passphrase=... to Agent")
    if doc.get("kdf") != "scrypt":
        raise DecodeError("key file: unsupported KDF (only scrypt is)")
    n, r, p_ = check_scrypt_parameters(doc.get("n"), doc.get("r"), doc.get("p"))
    key = _scrypt_key(passphrase, _field(doc, "salt"), n, r, p_)
    try:
        plain = p.aes_gcm_decrypt(
            key, _field(doc, "nonce"), _field(doc, "ciphertext"), ENCRYPTED_FORMAT.encode()
        )
    except AuthenticationError as exc:
        raise AuthenticationError("wrong passphrase or corrupted key file") from exc
    return decode_key_file(plain), (n, r, p_)


def load_or_create_key_file(
    path: str | os.PathLike[str], passphrase: str | None = None
) -> AgentKeyPair:
    """Load the key pair at ``path``, or create one there (mode 0600) if it does not exist.

    With a ``passphrase``, an existing plaintext file is encrypted (a warning is
    logged) and one encrypted with a lower scrypt cost than new files get is
    encrypted again: atomically, mode 0600, same identity. Raises as
    :func:`decode_key_file` does (the file unchanged), and ConfigurationError
    if a plaintext file cannot be encrypted (e.g. a read-only folder).
    """
    target = Path(path)
    if target.exists():
        info = target.stat()
        if info.st_size > _MAX_KEY_FILE_BYTES:
            raise DecodeError("key file is too large to be a key file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            log.warning("key file %s was readable by others; restricting it to 0600", target)
            os.chmod(target, 0o600)
        keypair, params = _decode(target.read_bytes(), passphrase)
        if passphrase is None:
            return keypair
        if params is None:
            # The caller asked for an encrypted key: leaving it in clear text would
            # silently break that promise, so encrypt it or refuse to go on.
            log.warning(
                "key file %s was not encrypted; encrypting it with the given passphrase", target
            )
            try:
                atomic_write(target, encode_key_file(keypair, passphrase))
            except OSError as exc:
                raise ConfigurationError(
                    f"key file {target} is not encrypted and could not be encrypted "
                    f"with the given passphrase: {exc}"
                ) from exc
        elif params[0] * params[1] * params[2] < _SCRYPT_N * _SCRYPT_R * _SCRYPT_P:
            log.info("key file %s: re-encrypting with scrypt n=%d", target, _SCRYPT_N)
            try:
                atomic_write(target, encode_key_file(keypair, passphrase))
            except OSError as exc:  # still encrypted, only with the older cost
                log.warning("key file %s: could not re-encrypt it: %s", target, exc)
        return keypair
    keypair = AgentKeyPair.generate()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, encode_key_file(keypair, passphrase))
    return keypair
