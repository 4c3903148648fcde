"""On SQLite, ``enqueue`` and ``ack`` run on the driver cursor; they must match the Core path.

The same random script runs against two fresh SQLite stores, one with the
driver fast path and one forced onto the portable SQLAlchemy Core path (what
PostgreSQL uses), and every result and the final queue must be identical.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

from agentmesh.hub import store as store_module
from agentmesh.hub.store import HubStore, NewEnvelope

NOW = 1_700_000_000_000
AGENTS = ["a", "b", "c"]


def _store(path: Path) -> HubStore:
    hub = HubStore(str(path))
    hub.ensure_schema()
    for i, agent_id in enumerate(AGENTS):
        hub.bind_agent(agent_id, bytes([i + 1]) * 32, NOW)
    return hub


def _run(hub: HubStore, script: list[tuple[Any, ...]]) -> list[Any]:
    out: list[Any] = []
    for step in script:
        if step[0] == "enqueue":
            batch = [
                NewEnvelope(bytes([n]) * 16, "a", recipient, b"x" * size, NOW + 10**6)
                for n, recipient, size in step[1]
            ]
            out.append(
                hub.enqueue(
                    batch, now_ms=NOW, max_count_per_recipient=4, max_bytes_per_recipient=60
                )
            )
        elif step[0] == "ack":
            out.append(hub.ack_many({r: [bytes([n]) * 16 for n in ids] for r, ids in step[1]}))
        out.append(hub.stats())
    out.append(
        [
            (e.seq, e.message_id, e.recipient)
            for r in [*AGENTS, "zz"]
            for e in hub.pending(r, now_ms=NOW)
        ]
    )
    return out


ids = st.integers(min_value=0, max_value=12)
recipients = st.sampled_from([*AGENTS, "zz"])  # zz is never bound
SCRIPT = st.lists(
    st.one_of(
        st.tuples(
            st.just("enqueue"), st.lists(st.tuples(ids, recipients, st.integers(1, 30)), max_size=8)
        ),
        st.tuples(
            st.just("ack"), st.lists(st.tuples(recipients, st.lists(ids, max_size=5)), max_size=3)
        ),
    ),
    max_size=8,
)


@pytest.fixture
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    def make() -> tuple[HubStore, HubStore]:
        d = tmp_path_factory.mktemp("fast")
        return _store(d / "fast.sqlite"), _store(d / "core.sqlite")

    yield make


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(SCRIPT)
def test_driver_fast_path_matches_the_core_path(
    stores: Any, monkeypatch: pytest.MonkeyPatch, script: list[tuple[Any, ...]]
) -> None:
    fast, core = stores()
    try:
        expected_fast = _run(fast, script)
        with monkeypatch.context() as patch:
            patch.setattr(store_module, "_SQLITE_FAST", False)
            expected_core = _run(core, script)
        assert expected_fast == expected_core
    finally:
        fast.close()
        core.close()


def test_driver_errors_surface_as_sqlalchemy_errors() -> None:
    for raw, kind in (
        (sqlite3.IntegrityError("x"), IntegrityError),
        (sqlite3.OperationalError("database is locked"), OperationalError),
    ):
        with pytest.raises(kind) as caught, store_module._as_sqlalchemy_errors():
            raise raw
        assert caught.value.orig is raw


def test_a_failed_driver_transaction_leaves_nothing_and_the_next_one_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = _store(tmp_path / "h.sqlite")
    try:
        first = NewEnvelope(b"\x01" * 16, "a", "b", b"x" * 10, NOW + 10**6)
        assert hub.enqueue([first], now_ms=NOW, max_count_per_recipient=9,
                           max_bytes_per_recipient=999)[0].accepted  # fmt: skip
        before = hub.stats()
        # Fail the last statement of the transaction: the rows inserted before it
        # must be rolled back with it, and the pooled connection left usable.
        monkeypatch.setattr(store_module, "_ADD_TO_COUNTERS_SQL", "UPDATE no_such_table SET x = 1")
        second = NewEnvelope(b"\x02" * 16, "a", "b", b"y" * 10, NOW + 10**6)
        with pytest.raises(DatabaseError):
            hub.enqueue([second], now_ms=NOW, max_count_per_recipient=9,
                        max_bytes_per_recipient=999)  # fmt: skip
        with pytest.raises(DatabaseError):
            hub.ack_many({"b": [first.message_id]})
        assert hub.stats() == before
        assert [e.message_id for e in hub.pending("b", now_ms=NOW)] == [first.message_id]
        monkeypatch.undo()
        assert hub.enqueue([second], now_ms=NOW, max_count_per_recipient=9,
                           max_bytes_per_recipient=999)[0].accepted  # fmt: skip
        assert hub.ack_many({"b": [first.message_id, second.message_id]}) == 2
        assert hub.stats()["envelopes"] == 0
        assert hub.pending("b", now_ms=NOW) == []
    finally:
        hub.close()
