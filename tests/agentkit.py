"""Shared agent-side test support: a recording message handler and byte surgery.

Imported by name from every test folder, like ``hubproc`` (``tests/conftest.py``
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from agentmesh import Agent, Message
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.protocol.hub_interface import Hub


def labelled_keypair(label: str) -> AgentKeyPair:
    """A deterministic key pair: the same label always gives the same keys."""
    stream = hashlib.sha512(label.encode()).digest()
    return AgentKeyPair(IdentityKeyPair.from_private_bytes(stream[:32], stream[32:]))


def bundle_of(kp: AgentKeyPair, agent_id: str) -> dict[str, str]:
    """Version 1's bundle dict of ``kp`` under ``agent_id``."""
    return {**kp.public_bundle(), "agent_id": agent_id}


class Inbox(list):  # type: ignore[type-arg]
    """A message handler that records every message it is given."""

    def __call__(self, msg: Message) -> None:
        self.append(msg)

    @property
    def texts(self) -> list[str]:
        return [m.text for m in self]


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    """``data`` with the byte at ``index`` XORed with ``mask``."""
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def alice_and_bob(hub: Hub, keydir: Path) -> tuple[Agent, Agent, Inbox]:
    """Agents ``alice`` and ``bob`` on ``hub`` (key files ``<keydir>/<name>.json``)
    and the Inbox that records what bob handles."""
    alice = Agent("alice", hub=hub, keypair_path=keydir / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=keydir / "bob.json")
    inbox = Inbox()
    bob.on_message(inbox)
    return alice, bob, inbox


def restore_durable_image(images: Path, state: Path) -> Path:
    """What a power cut leaves of the state file ``state``: its files (database, WAL,
    shared memory, handled log) replaced by the last image ``AgentState._durable_image``
    recorded under ``images`` (the database and WAL as of its last durable point).
    ``state``'s folder may be new. Returns ``state``."""
    state.parent.mkdir(parents=True, exist_ok=True)
    for leftover in state.parent.glob(state.name + "*"):
        leftover.unlink()
    root = images / state.name
    current = root / (root / "CURRENT").read_text()
    for part in current.iterdir():
        shutil.copyfile(part, state.parent / part.name)
    return state
