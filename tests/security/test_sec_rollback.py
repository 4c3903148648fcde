"""Review finding F-3: a restored or cloned state file gave a two-time pad.

Protocol 1 derived the AES-GCM key *and* nonce from the ratchet message key
alone. An agent whose state file was restored from a backup (or a VM snapshot,
or a cloned container) reuses message keys, and so encrypted new plaintext
under a key and nonce it had used before. Protocol 2 salts the derivation with
the message's random id, and the receiver refuses the reused counter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from security_helpers import InterceptHub

from agentmesh import Agent
from agentmesh.errors import ReplayError
from agentmesh.state import state_path_for
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(60)


def _state_files(key: Path) -> list[Path]:
    base = state_path_for(key)
    return [base, Path(f"{base}-wal"), Path(f"{base}-shm")]


def _back_up(key: Path, into: Path) -> None:
    into.mkdir()
    for path in _state_files(key):
        if path.exists():
            shutil.copy2(path, into / path.name)


def _restore(key: Path, backup: Path) -> None:
    for path in _state_files(key):
        path.unlink(missing_ok=True)
        if (backup / path.name).exists():
            shutil.copy2(backup / path.name, path)


def test_restored_state_file_never_reuses_a_keystream__message_id_bound_keys(
    keydir: Path, tmp_path: Path
) -> None:
    """After a rollback the sender reuses a ratchet counter, but the two envelopes are
    encrypted under different keys and nonces (equal plaintexts give unrelated
    ciphertexts), and the recipient refuses the second with ReplayError, naming a
    possible state restore, without changing its state."""
    hub = InterceptHub()
    got: list[str] = []
    key = keydir / "alice.json"
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    bob.on_message(lambda m: got.append(m.text))
    alice = Agent("alice", hub=hub, keypair_path=key)
    alice.send("bob", text="hello")
    bob.send("alice", text="hi")
    alice.close()
    _back_up(key, tmp_path / "backup")

    alice = Agent("alice", hub=hub, keypair_path=key)
    first = hub.capture(lambda: alice.send("bob", text="the same secret text"))
    hub.inject(first)
    alice.close()

    _restore(key, tmp_path / "backup")
    alice = Agent("alice", hub=hub, keypair_path=key)
    second = hub.capture(lambda: alice.send("bob", text="the same secret text"))
    alice.close()

    one, two = decode_envelope(first), decode_envelope(second)
    assert one.ratchet == two.ratchet  # the rollback did reuse the message key...
    assert one.message_id != two.message_id
    # ...but not the keystream: the same inner plaintext prefix encrypts differently
    assert one.ciphertext[:40] != two.ciphertext[:40]
    with pytest.raises(ReplayError, match="restored an old copy of its state"):
        hub.inject(second)
    assert got == ["hello", "the same secret text"]
    bob.close()
