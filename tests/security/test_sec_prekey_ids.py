"""Finding F-9: prekey ids after a lost state file.

An agent whose state file was lost restarted its prekey ids at 1. The hub still
held the old one-time prekeys under those ids and ignores a re-upload of an id it
holds (``HubStore.add_one_time_prekeys``: ``ON CONFLICT DO NOTHING``;
``MemoryMailboxes``: ``setdefault``), so it kept handing out keys whose private
halves were gone and every first message on them failed. Now a new PrekeySecrets
draws a random id epoch (and counter start), and hubs leave one-time keys of a
stale epoch out of the bundles they compose.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from agentkit import Inbox
from deterministic import Rng
from security_helpers import InterceptHub

from agentmesh import Agent, LocalHub
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle, PrekeySecrets, prekey_epoch
from agentmesh.hub.local import MemoryMailboxes
from agentmesh.state import state_path_for
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(120)

NOW = 1_700_000_000_000
BOB = IdentityKeyPair.generate(Rng("prekey-ids"))


def _all_ids(secrets: PrekeySecrets) -> set[int]:
    return {*secrets.signed, *secrets.last_resort, *secrets.one_time, *secrets.one_time_kem}


def test_new_prekey_states_have_disjoint_ids__random_id_epoch() -> None:
    """Two states made for the same identity (as before and after a lost state
    file) share no prekey id: signed, last-resort KEM and one-time of both kinds."""
    made = []
    for label in ("before-the-loss", "after-the-loss"):
        rng = Rng(label)
        secrets = PrekeySecrets.create(BOB, NOW, rng)
        secrets.top_up(BOB, NOW, rng, pool_size=100)
        secrets.rotate(BOB, NOW + 1, rng, force=True)
        made.append(secrets)
    first, second = made
    for secrets in made:
        assert len(secrets.signed) == 2 and len(secrets.last_resort) == 2
        assert len(secrets.one_time) == 100 and len(secrets.one_time_kem) == 100
        assert len({prekey_epoch(i) for i in _all_ids(secrets)}) == 1
    assert _all_ids(first).isdisjoint(_all_ids(second))
    assert prekey_epoch(first.next_id) != prekey_epoch(second.next_id)


def _stale_one_time_ids(hub: LocalHub, db: Path | None) -> set[int]:
    """Ids of the X25519 one-time prekeys the hub holds for bob."""
    if db is None:
        store = hub._store
        assert isinstance(store, MemoryMailboxes)
        return set(store._agents["bob"].prekeys[1])  # MemoryMailboxes: kind -> {id: blob}
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT prekey_id FROM one_time_prekeys WHERE agent_id = 'bob' AND kind = 1"
        ).fetchall()
    finally:
        conn.close()
    return {int(row[0]) for row in rows}


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_first_messages_work_after_the_state_file_was_lost__random_id_epoch(
    store: str, tmp_path: Path
) -> None:
    """Bob publishes, loses his state file (the key file stays), starts again on the
    same hub; new senders' first messages reach him, although the hub still holds
    every one-time prekey of his lost state."""
    db = tmp_path / "hub.sqlite" if store == "sqlite" else None
    hub = InterceptHub(None if db is None else str(db))
    bob_key = tmp_path / "bob.json"
    bob = Agent("bob", hub=hub, keypair_path=bob_key)
    before = PrekeyBundle.decode(bob.endpoint.prekey_bundle_bytes())
    lost = _stale_one_time_ids(hub, db)
    assert len(lost) == 100
    bob.close()
    state = state_path_for(bob_key)
    assert state.exists()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)

    bob = Agent("bob", hub=hub, keypair_path=bob_key)  # same key file, new state
    try:
        inbox = Inbox()
        bob.on_message(inbox)
        after = PrekeyBundle.decode(bob.endpoint.prekey_bundle_bytes())
        assert after.identity == before.identity
        if prekey_epoch(after.signed_prekey.prekey_id) == prekey_epoch(
            before.signed_prekey.prekey_id
        ) and prekey_epoch(before.signed_prekey.prekey_id):
            pytest.skip("both states drew the same random epoch (probability 1/65535)")
        held = _stale_one_time_ids(hub, db)
        assert lost <= held  # the stale keys are all still on the hub ...
        assert len(held) == 200  # ... next to the new ones, none of which was ignored

        senders = []
        for i in range(3):
            alice = Agent(f"alice{i}", hub=hub)  # never talked to bob
            senders.append(alice)
            alice.send("bob", f"hello {i}")
            initial = decode_envelope(hub.envelopes[-1]).prekey
            assert initial is not None
            assert initial.one_time_prekey_id not in lost
        assert inbox.texts == [f"hello {i}" for i in range(3)]
        for alice in senders:
            alice.close()
    finally:
        bob.close()
