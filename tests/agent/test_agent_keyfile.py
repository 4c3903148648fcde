"""The identity key file: permissions, atomic writes, passphrases, bad files."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from agentmesh import (
    Agent,
    AgentMeshError,
    AuthenticationError,
    ConfigurationError,
    CryptoError,
    DecodeError,
)
from agentmesh.keyfile import atomic_write, decode_key_file, encode_key_file


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_key_file_is_0600(keydir) -> None:
    old_umask = os.umask(0o022)
    try:
        agent = Agent("alice", keypair_path=keydir / "alice.json")
    finally:
        os.umask(old_umask)
    try:
        assert mode(keydir / "alice.json") == 0o600
        assert mode(keydir / "alice.state.sqlite") == 0o600
    finally:
        agent.close()


def test_key_file_written_atomically_no_temp_files(keydir) -> None:
    agent = Agent("alice", keypair_path=keydir / "alice.json")
    agent.close()
    names = sorted(os.listdir(keydir))
    assert "alice.json" in names
    leftovers = [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    assert leftovers == []
    assert {n for n in names} <= {
        "alice.json",
        "alice.state.sqlite",
        "alice.state.sqlite-wal",
        "alice.state.sqlite-shm",
        "alice.state.lock",
    }


def test_atomic_write_failure_keeps_old_file_and_cleans_up(tmp_path, monkeypatch) -> None:
    target = tmp_path / "key.json"
    atomic_write(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["key.json"]


def test_passphrase_round_trip(keydir) -> None:
    path = keydir / "alice.json"
    agent = Agent("alice", keypair_path=path, passphrase="correct horse")
    fingerprint = agent.fingerprint
    agent.close()

    text = path.read_text()
    doc = json.loads(text)
    assert doc["format"] == "agentmesh-key-v2"
    assert "identity_private" not in text and "exchange_private" not in text
    assert mode(path) == 0o600

    again = Agent("alice", keypair_path=path, passphrase="correct horse")
    assert again.fingerprint == fingerprint
    again.close()


def test_wrong_passphrase(keydir) -> None:
    path = keydir / "alice.json"
    Agent("alice", keypair_path=path, passphrase="right").close()
    with pytest.raises(AuthenticationError) as info:
        Agent("alice", keypair_path=path, passphrase="wrong")
    assert isinstance(info.value, CryptoError)
    # The failed attempt released the identity: the right passphrase still works.
    Agent("alice", keypair_path=path, passphrase="right").close()


def test_missing_passphrase(keydir) -> None:
    path = keydir / "alice.json"
    Agent("alice", keypair_path=path, passphrase="secret").close()
    with pytest.raises(ConfigurationError, match="passphrase"):
        Agent("alice", keypair_path=path)
    Agent("alice", keypair_path=path, passphrase="secret").close()


def test_world_readable_key_file_is_restricted_on_load(keydir, caplog) -> None:
    path = keydir / "alice.json"
    Agent("alice", keypair_path=path).close()
    fingerprint_doc = path.read_text()
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="agentmesh.keyfile"):
        agent = Agent("alice", keypair_path=path)
    agent.close()
    assert mode(path) == 0o600
    assert path.read_text() == fingerprint_doc
    assert any("0600" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"identity_private": "AAAA"}',
        b'{"identity_private": 1, "exchange_private": 2}',
        b'{"format": "agentmesh-key-v2"}',
        b"\xff\xfe",
    ],
    ids=["empty", "text", "list", "short", "types", "encrypted-no-fields", "binary"],
)
def test_corrupt_key_file(keydir, content) -> None:
    path = keydir / "alice.json"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(AgentMeshError):
        Agent("alice", keypair_path=path, passphrase="x" if b"v2" in content else None)
    assert path.read_bytes() == content  # never overwritten
    # The identity lock was released.
    path.unlink()
    Agent("alice", keypair_path=path).close()


def test_oversized_key_file(keydir) -> None:
    path = keydir / "alice.json"
    path.write_bytes(b" " * (65 * 1024))
    with pytest.raises(DecodeError):
        Agent("alice", keypair_path=path)


def test_encode_decode_key_file(make_agent) -> None:
    keypair = make_agent("alice").keypair
    plain = encode_key_file(keypair)
    assert set(json.loads(plain)) == {"identity_private", "exchange_private"}
    assert decode_key_file(plain).fingerprint == keypair.fingerprint
    sealed = encode_key_file(keypair, "pw")
    assert decode_key_file(sealed, "pw").fingerprint == keypair.fingerprint
    with pytest.raises(AuthenticationError):
        decode_key_file(sealed, "other")
    with pytest.raises(ConfigurationError):
        decode_key_file(sealed)


def test_state_file_of_another_identity_is_refused(tmp_path):
    """A key file replaced under an existing state file gives a clear error, not a bad signature."""
    import pytest

    from agentmesh import Agent
    from agentmesh.errors import ConfigurationError

    key = tmp_path / "alice.json"
    Agent("alice", keypair_path=key).close()
    key.unlink()  # a new identity, but the old alice.state.sqlite stays
    with pytest.raises(ConfigurationError, match="belongs to identity"):
        Agent("alice", keypair_path=key)
    Agent("alice", keypair_path=key.with_name("other.json")).close()
