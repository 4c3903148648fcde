"""The state file's format version: version 1 files (AgentMesh protocol version 1
sessions) and unknown versions are refused at open, with the file unchanged."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from agentmesh import Agent, ConfigurationError
from agentmesh import state as state_module
from agentmesh.state import AgentState, state_path_for


def make_state_file(path: Path, version: bytes, *, wal: bool) -> None:
    """A state file with this schema, one session, and ``version``, written by sqlite3."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        if wal:  # as AgentState writes them
            db.execute("PRAGMA journal_mode=WAL")
        db.executescript(state_module._SCHEMA)
        db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (version,))
        db.execute("INSERT INTO sessions (peer_id, record) VALUES ('bob', ?)", (b"v1 session",))
    finally:
        db.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_fresh_file_is_version_2(tmp_path: Path) -> None:
    assert state_module.SCHEMA_VERSION == b"2"
    path = tmp_path / "a.state.sqlite"
    AgentState(path).close()
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert bytes(row[0]) == b"2"
    AgentState(path).close()  # and it opens again


@pytest.mark.parametrize("wal", [True, False], ids=["wal", "rollback-journal"])
def test_version_1_file_is_refused_and_left_unchanged(tmp_path: Path, wal: bool) -> None:
    path = tmp_path / "a.state.sqlite"
    make_state_file(path, b"1", wal=wal)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigurationError) as info:
        AgentState(path)
    message = str(info.value)
    assert str(path) in message
    assert "protocol version 1" in message and "protocol version 2" in message
    assert "move it away" in message and "key file stays valid" in message
    assert snapshot(tmp_path) == before  # byte for byte, and no file added or removed


@pytest.mark.parametrize("version", [b"3", b"99", b"", b"\xff" * 40])
def test_unknown_version_is_refused_and_left_unchanged(tmp_path: Path, version: bytes) -> None:
    path = tmp_path / "a.state.sqlite"
    make_state_file(path, version, wal=True)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigurationError, match="does not know"):
        AgentState(path)
    assert snapshot(tmp_path) == before


def test_agent_with_a_version_1_state_file(tmp_path: Path) -> None:
    """The agent refuses, releases the identity, and starts afresh once the file is moved."""
    key = tmp_path / "alice.json"
    first = Agent("alice", keypair_path=key)
    fingerprint = first.fingerprint
    first.close()
    state_file = state_path_for(key)
    with sqlite3.connect(state_file, isolation_level=None) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"1",))
    db.close()
    key_before, state_before = key.read_bytes(), state_file.read_bytes()
    with pytest.raises(ConfigurationError, match="protocol version 1"):
        Agent("alice", keypair_path=key)
    assert key.read_bytes() == key_before and state_file.read_bytes() == state_before
    state_file.rename(tmp_path / "old.state.sqlite")
    again = Agent("alice", keypair_path=key)  # the lock was released; same identity
    assert again.fingerprint == fingerprint
    again.close()


def test_file_with_data_but_no_version_is_refused(tmp_path: Path) -> None:
    """Without a version it could be a version 1 file: not silently taken for version 2."""
    path = tmp_path / "a.state.sqlite"
    make_state_file(path, b"2", wal=False)
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("DELETE FROM meta WHERE key = 'schema_version'")
    db.close()
    before = path.read_bytes()
    with pytest.raises(state_module.DecodeError, match="schema_version"):
        AgentState(path)
    assert path.read_bytes() == before
