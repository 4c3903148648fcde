"""Review finding F-6: a pending identity was recorded before its bundle verified.

``Agent`` recorded the identity of a hub bundle that differed from the pinned one
as the peer's *pending* identity before checking the bundle's signatures, and
``trust()`` could then pin an identity that never verified. Bundles are now
verified first: a bundle that fails its own signatures is refused and leaves
nothing behind.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from security_helpers import InterceptHub, state_dump

from agentmesh import Agent
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle, PrekeySecrets
from agentmesh.errors import IdentityChangedError, SignatureError
from agentmesh.state import state_path_for

pytestmark = pytest.mark.timeout(60)


class ForgingHub(InterceptHub):
    """A hub that serves a forged bundle for ``bob`` once ``forged`` is set."""

    forged: bytes | None = None

    def fetch_prekey_bundle(self, agent_id: str) -> bytes:
        if agent_id == "bob" and self.forged is not None:
            return self.forged
        return super().fetch_prekey_bundle(agent_id)


def _alice_without_sessions(keydir: Path, agents, hub: ForgingHub) -> Agent:
    """alice, with bob pinned but no session with him (as after a reset): her next
    connect or send fetches bob's bundle from the hub."""
    alice = agents("alice", hub=hub, keypair_path=keydir / "alice.json")
    alice.connect("bob")  # bob is pinned
    alice.close()
    db = sqlite3.connect(state_path_for(keydir / "alice.json"))
    with db:
        db.execute("DELETE FROM sessions")
    db.close()
    return agents("alice", hub=hub, keypair_path=keydir / "alice.json")


def _forged_bundle_for_bob() -> tuple[bytes, str]:
    """Mallory's bundle under bob's id, with one signature broken; and its fingerprint."""
    mallory = IdentityKeyPair.generate()
    bundle = PrekeySecrets.create(mallory, 1_900_000_000_000).bundle("bob", mallory.public)
    spk = bundle.signed_prekey
    broken = replace(spk, signature=bytes([spk.signature[0] ^ 1]) + spk.signature[1:])
    return replace(bundle, signed_prekey=broken).encode(), bundle.fingerprint


def test_unverified_bundle_leaves_no_identity_to_trust__verify_before_pending(
    keydir: Path, agents
) -> None:
    """A hub bundle with a new identity whose signatures fail raises SignatureError,
    not IdentityChangedError; no pending identity is recorded (the state file is
    unchanged), and trust() refuses its fingerprint."""
    hub = ForgingHub()
    agents("bob", hub=hub, keypair_path=keydir / "bob.json")
    alice = _alice_without_sessions(keydir, agents, hub)
    forged, fingerprint = _forged_bundle_for_bob()
    hub.forged = forged
    before = state_dump(keydir / "alice.json")
    with pytest.raises(SignatureError):
        alice.connect("bob")
    assert state_dump(keydir / "alice.json") == before
    with pytest.raises(ValueError, match="does not match any identity"):
        alice.trust("bob", fingerprint)


def test_verified_new_identity_is_still_reported__identity_change(keydir: Path, agents) -> None:
    """The check stays: a *valid* bundle with another identity raises
    IdentityChangedError and can then be trusted."""
    hub = ForgingHub()
    agents("bob", hub=hub, keypair_path=keydir / "bob.json")
    alice = _alice_without_sessions(keydir, agents, hub)
    mallory = IdentityKeyPair.generate()
    bundle = PrekeySecrets.create(mallory, 1_900_000_000_000).bundle("bob", mallory.public)
    hub.forged = bundle.encode()
    with pytest.raises(IdentityChangedError):
        alice.connect("bob")
    alice.trust("bob", PrekeyBundle.decode(hub.forged).fingerprint)
