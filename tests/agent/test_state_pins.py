"""The in-memory pin cache of AgentState never answers differently from the file.

Every send and every received batch asks ``pinned_identity``, so AgentState
answers it from memory; these tests check that after any sequence of pin
writes (and of rolled-back transactions) the answer equals what a fresh
read of the state file says.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from agentmesh.state import AgentState, InboxRow

PEERS = ("bob", "carol")
IDENTITIES = (b"I" * 8, b"J" * 8, b"K" * 8)


def _on_disk(path: Path, peer: str) -> tuple[bytes, bytes | None] | None:
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT identity, pending_identity FROM peers WHERE peer_id = ?", (peer,)
        ).fetchone()
    if row is None:
        return None
    return bytes(row[0]), None if row[1] is None else bytes(row[1])


def _receive(state: AgentState, peer: str, identity: bytes, n: int) -> None:
    row = InboxRow(0, n.to_bytes(16, "big"), peer, b"{}", 1, None)
    state.commit_received_batch({peer: b"record"}, {peer: identity}, None, [row], 1)


def _rolled_back_repin(state: AgentState, peer: str, identity: bytes, n: int) -> None:
    """A transaction that changes a pin, reads it, then fails."""
    with pytest.raises(RuntimeError), state._tx() as db:
        db.execute(
            "INSERT OR REPLACE INTO peers (peer_id, identity, first_seen_ms) VALUES (?, ?, 0)",
            (peer, identity),
        )
        state.pinned_identity(peer)  # sees the uncommitted pin
        raise RuntimeError("abort")


OPERATIONS = {
    "read": lambda s, peer, ident, n: s.pinned_identity(peer),
    "pin": lambda s, peer, ident, n: s.pin(peer, ident, n),
    "pending": lambda s, peer, ident, n: s.set_pending_identity(peer, ident),
    "repin": lambda s, peer, ident, n: s.repin(peer, ident, n),
    "send_with_pin": lambda s, peer, ident, n: s.commit_sent(
        peer, b"record", n.to_bytes(16, "big"), b"env", n, pin_identity=ident
    ),
    "receive_with_pin": _receive,
    "rolled_back": _rolled_back_repin,
}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(sorted(OPERATIONS)),
            st.sampled_from(PEERS),
            st.sampled_from(IDENTITIES),
        ),
        max_size=25,
    )
)
def test_cached_pins_match_the_file(tmp_path_factory: pytest.TempPathFactory, steps) -> None:
    path = tmp_path_factory.mktemp("pins") / "a.state.sqlite"
    state = AgentState(path)
    try:
        for n, (name, peer, identity) in enumerate(steps, start=1):
            OPERATIONS[name](state, peer, identity, n)
            for other in PEERS:
                assert state.pinned_identity(other) == _on_disk(path, other)
    finally:
        state.close()


def test_a_pending_identity_is_seen_at_once(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "a.state.sqlite")
    assert state.pinned_identity("bob") is None  # cached as "not pinned"
    state.pin("bob", b"old", 1)
    assert state.pinned_identity("bob") == (b"old", None)
    state.set_pending_identity("bob", b"new")
    assert state.pinned_identity("bob") == (b"old", b"new")
    state.repin("bob", b"new", 2)
    assert state.pinned_identity("bob") == (b"new", None)
    state.close()
