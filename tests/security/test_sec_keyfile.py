"""F-7: the key file given a passphrase is encrypted afterwards, with a current
scrypt cost, and a file cannot make scrypt burn memory or CPU.

Most tests make scrypt cheap through ``keyfile._SCRYPT_N`` (a module-level
hook); the ones about the default cost run with the real one (about 0.7 s).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agentmesh import Agent, AuthenticationError, ConfigurationError, DecodeError, keyfile
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.keyfile import decode_key_file, encode_key_file, load_or_create_key_file

PASSPHRASE = "correct horse battery staple"
CHEAP_N = 2**10


@pytest.fixture
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyfile, "_SCRYPT_N", CHEAP_N)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def doc_of(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_bytes())
    return doc


def test_plaintext_key_file_is_encrypted_when_a_passphrase_is_given(
    keydir: Path, cheap_scrypt: None, caplog: pytest.LogCaptureFixture
) -> None:
    path = keydir / "alice.json"
    agent = Agent("alice", keypair_path=path)
    fingerprint, secrets = agent.fingerprint, agent.keypair.to_dict()
    agent.close()
    assert "identity_private" in doc_of(path)  # plaintext so far

    with caplog.at_level(logging.DEBUG, logger="agentmesh.keyfile"):
        agent = Agent("alice", keypair_path=path, passphrase=PASSPHRASE)
    assert agent.fingerprint == fingerprint
    agent.close()

    text = path.read_text()
    doc = json.loads(text)
    assert doc["format"] == keyfile.ENCRYPTED_FORMAT
    assert not any(value in text for value in secrets.values())
    assert "identity_private" not in text and "exchange_private" not in text
    assert mode(path) == 0o600
    assert [n for n in os.listdir(keydir) if n.endswith(".tmp")] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("not encrypted" in w for w in warnings), warnings
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert PASSPHRASE not in logged
    assert not any(value in logged for value in secrets.values())

    with pytest.raises(ConfigurationError, match="encrypted: pass passphrase"):
        Agent("alice", keypair_path=path)
    with pytest.raises(AuthenticationError):
        Agent("alice", keypair_path=path, passphrase="wrong")
    again = Agent("alice", keypair_path=path, passphrase=PASSPHRASE)
    assert again.fingerprint == fingerprint
    again.close()


def test_encrypting_a_plaintext_file_that_cannot_be_written_is_refused(
    tmp_path: Path, cheap_scrypt: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing to encrypt must not go on with a key the caller believes encrypted."""
    path = tmp_path / "alice.json"
    plain = encode_key_file(AgentKeyPair.generate())
    path.write_bytes(plain)
    os.chmod(path, 0o600)

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(keyfile, "atomic_write", read_only)
    with pytest.raises(ConfigurationError, match="could not be encrypted"):
        load_or_create_key_file(path, PASSPHRASE)
    assert path.read_bytes() == plain


def test_encrypted_file_without_passphrase_is_a_clear_error(
    tmp_path: Path, cheap_scrypt: None
) -> None:
    path = tmp_path / "alice.json"
    load_or_create_key_file(path, PASSPHRASE)
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match="key file is encrypted: pass passphrase"):
        load_or_create_key_file(path)
    assert path.read_bytes() == before


def test_an_encrypted_file_at_the_current_cost_is_not_rewritten(
    tmp_path: Path, cheap_scrypt: None
) -> None:
    path = tmp_path / "alice.json"
    fingerprint = load_or_create_key_file(path, PASSPHRASE).fingerprint
    before = path.read_bytes()
    assert load_or_create_key_file(path, PASSPHRASE).fingerprint == fingerprint
    assert path.read_bytes() == before


def test_new_key_files_use_scrypt_n_of_at_least_2_17(tmp_path: Path) -> None:
    """The real default, not the test hook: what reaches the disk."""
    assert keyfile._SCRYPT_N >= 2**17
    path = tmp_path / "alice.json"
    keypair = load_or_create_key_file(path, PASSPHRASE)
    doc = doc_of(path)
    assert doc["kdf"] == "scrypt"
    assert doc["n"] >= 2**17 and doc["r"] == 8 and doc["p"] == 1
    assert mode(path) == 0o600
    assert decode_key_file(path.read_bytes(), PASSPHRASE).fingerprint == keypair.fingerprint


def test_old_n_2_15_file_still_loads_and_is_brought_up_to_the_current_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keypair = AgentKeyPair.generate()
    with monkeypatch.context() as patch:
        patch.setattr(keyfile, "_SCRYPT_N", 2**15)  # what earlier versions wrote
        old = encode_key_file(keypair, PASSPHRASE)
    assert json.loads(old)["n"] == 2**15
    assert decode_key_file(old, PASSPHRASE).fingerprint == keypair.fingerprint

    path = tmp_path / "alice.json"
    path.write_bytes(old)
    os.chmod(path, 0o600)
    assert load_or_create_key_file(path, PASSPHRASE).fingerprint == keypair.fingerprint
    assert doc_of(path)["n"] >= 2**17  # re-encrypted, same identity
    assert mode(path) == 0o600
    with pytest.raises(ConfigurationError):
        load_or_create_key_file(path)


def _with_params(n: object, r: object = 8, p: object = 1) -> bytes:
    doc = {
        "format": keyfile.ENCRYPTED_FORMAT,
        "kdf": "scrypt",
        "n": n,
        "r": r,
        "p": p,
        "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
        "nonce": "AAAAAAAAAAAAAAAA",
        "ciphertext": "AAAAAAAAAAAAAAAAAAAAAA==",
    }
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("n", "r", "p", "why"),
    [
        (2**23, 8, 1, "memory"),
        (2**22, 1, 1, "memory"),
        (2**40, 1, 1, "memory"),
        (2**20, 8, 1, "memory"),
        (3 * 2**14, 8, 1, "power of two"),
        (1, 8, 1, "power of two"),
        (0, 8, 1, "power of two"),
        (-(2**15), 8, 1, "power of two"),
        (2**15, 0, 1, "at least 1"),
        (2**15, 8, -1, "at least 1"),
        (2**15, 8, 2**20, "work"),
        (2**14, 2**6, 2**5, "work"),
        (True, 8, 1, "integers"),
        ("32768", 8, 1, "integers"),
        (32768.0, 8, 1, "integers"),
        (None, 8, 1, "integers"),
    ],
)
def test_absurd_scrypt_parameters_are_refused_before_scrypt_runs(
    n: object, r: object, p: object, why: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_scrypt(*args: object) -> bytes:
        raise AssertionError("scrypt ran with parameters that should have been refused")

    monkeypatch.setattr(keyfile, "_scrypt_key", no_scrypt)
    data = _with_params(n, r, p)
    with pytest.raises(DecodeError, match=why):
        decode_key_file(data, PASSPHRASE)
    path = tmp_path / "alice.json"
    path.write_bytes(data)
    with pytest.raises(DecodeError, match="scrypt"):
        load_or_create_key_file(path, PASSPHRASE)
    assert path.read_bytes() == data  # never overwritten


def test_limits_admit_what_is_written() -> None:
    assert keyfile.check_scrypt_parameters(2**17, 8, 1) == (2**17, 8, 1)
    assert keyfile.check_scrypt_parameters(2**15, 8, 1) == (2**15, 8, 1)
