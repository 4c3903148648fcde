"""Tests of agentmesh.hub.store.HubStore on SQLite and (when reachable) PostgreSQL.

PostgreSQL: ``AGENTMESH_TEST_PG`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``); each test gets a fresh
schema that is dropped afterwards. Tests are skipped with the reason when the
server or the psycopg driver is missing.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgschema import fresh_pg_schema
from sqlalchemy import func, select

from agentmesh.errors import (
    AuthFailedError,
    ConfigurationError,
    HubError,
    InvalidKeyError,
    LocalProtocolError,
)
from agentmesh.hub import models
from agentmesh.hub.store import (
    EnqueueResult,
    EnqueueStatus,
    FetchedBundle,
    HubStore,
    NewEnvelope,
    StoredEnvelope,
    resolve_db_url,
)
from agentmesh.ids import InvalidAgentIdError

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
NOW = 1_700_000_000_000
LATER = NOW + 3_600_000
BIG = 10**9

STORED = EnqueueStatus.STORED
DUPLICATE = EnqueueStatus.DUPLICATE
FULL = EnqueueStatus.MAILBOX_FULL
UNKNOWN = EnqueueStatus.UNKNOWN_RECIPIENT


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield str(tmp_path / "hub.sqlite")
        return
    with fresh_pg_schema() as url:
        yield url


@pytest.fixture
def store(db_url: str) -> Iterator[HubStore]:
    hub = HubStore(db_url)
    hub.ensure_schema()
    yield hub
    hub.close()


@pytest.fixture
def second_store(db_url: str, store: HubStore) -> Iterator[HubStore]:
    """Another store (own engine and pool) on the same database, like a second process."""
    hub = HubStore(db_url)
    yield hub
    hub.close()


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def env(
    n: int, recipient: str = "bob", body: bytes = b"x", *, sender: str = "alice", ttl: int = BIG
) -> NewEnvelope:
    return NewEnvelope(mid(n), sender, recipient, body, NOW + ttl)


def statuses(results: list[EnqueueResult]) -> list[EnqueueStatus]:
    return [r.status for r in results]


def enqueue(
    hub: HubStore, batch: list[NewEnvelope], count: int = BIG, size: int = BIG
) -> list[EnqueueResult]:
    return hub.enqueue(
        batch, now_ms=NOW, max_count_per_recipient=count, max_bytes_per_recipient=size
    )


def actual_counters(hub: HubStore) -> dict[str, tuple[int, int]]:
    """Recount envelopes per recipient the slow way, for comparison with the counters."""
    e = models.envelopes
    with hub.engine.connect() as conn:
        rows = conn.execute(
            select(e.c.recipient, func.count(), func.coalesce(func.sum(e.c.size), 0)).group_by(
                e.c.recipient
            )
        ).all()
    return {r: (int(c), int(b)) for r, c, b in rows}


def stored_counters(hub: HubStore) -> dict[str, tuple[int, int]]:
    m = models.mailboxes
    with hub.engine.connect() as conn:
        rows = conn.execute(select(m.c.recipient, m.c.msg_count, m.c.byte_count)).all()
    return {r: (int(c), int(b)) for r, c, b in rows if c or b}


def run_threads(count: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def body(index: int) -> None:
        try:
            barrier.wait()
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors


# --------------------------------------------------------------------------- engine


def test_plain_path_means_sqlite_and_init_does_not_touch_the_db(tmp_path: Path) -> None:
    path = tmp_path / "sub" / ".." / "hub.sqlite"
    hub = HubStore(str(path))
    assert hub.engine.dialect.name == "sqlite"
    assert not (tmp_path / "hub.sqlite").exists()
    hub.close()
    assert resolve_db_url("/var/lib/hub.sqlite") == "sqlite:////var/lib/hub.sqlite"
    assert resolve_db_url("hub.sqlite") == "sqlite:///hub.sqlite"
    assert resolve_db_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_database_setting_is_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        HubStore(bad)


def test_synchronous_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="synchronous"):
        HubStore(str(tmp_path / "a.sqlite"), synchronous="FAST")
    with pytest.raises(ConfigurationError, match="busy_timeout_ms"):
        HubStore(str(tmp_path / "a.sqlite"), busy_timeout_ms=-1)


@pytest.mark.parametrize(("mode", "level"), [("FULL", 2), ("normal", 1), ("OFF", 0)])
def test_sqlite_pragmas_on_every_connection(tmp_path: Path, mode: str, level: int) -> None:
    hub = HubStore(str(tmp_path / "p.sqlite"), synchronous=mode, busy_timeout_ms=1234)
    try:
        with hub.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == level
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        hub.close()


def test_data_survives_reopening(db_url: str) -> None:
    hub = HubStore(db_url)
    hub.ensure_schema()
    hub.bind_agent("bob", KEY_A, NOW)
    enqueue(hub, [env(1)])
    hub.close()
    with HubStore(db_url) as again:
        again.check_revision()
        assert [e.message_id for e in again.pending("bob", now_ms=NOW)] == [mid(1)]


# --------------------------------------------------------------------------- identities


def test_bind_agent_first_registration_binds(store: HubStore) -> None:
    assert store.agent_key("alice") is None
    assert store.bind_agent("alice", KEY_A, NOW) is True
    assert store.agent_key("alice") == KEY_A
    assert store.bind_agent("alice", KEY_A, LATER) is False
    a = models.agents
    with store.engine.connect() as conn:
        row = conn.execute(select(a).where(a.c.agent_id == "alice")).one()
    assert (row.created_at_ms, row.last_seen_ms) == (NOW, LATER)


def test_bind_agent_refuses_another_key(store: HubStore) -> None:
    store.bind_agent("alice", KEY_A, NOW)
    with pytest.raises(AuthFailedError) as info:
        store.bind_agent("alice", KEY_B, NOW)
    assert info.value.code == "identity_mismatch"
    assert "agent id 'alice' is bound to another identity key" in str(info.value)
    assert store.agent_key("alice") == KEY_A


def test_bind_agent_validates_input(store: HubStore) -> None:
    with pytest.raises(InvalidAgentIdError):
        store.bind_agent("../etc", KEY_A, NOW)
    with pytest.raises(InvalidKeyError):
        store.bind_agent("alice", b"short", NOW)
    assert store.list_agents() == []


def test_bind_agent_race_one_key_wins(store: HubStore, second_store: HubStore) -> None:
    keys = [bytes([i]) * 32 for i in range(8)]
    outcomes: list[object] = [None] * len(keys)

    def bind(i: int) -> None:
        hub = store if i % 2 else second_store
        try:
            outcomes[i] = hub.bind_agent("contested", keys[i], NOW)
        except AuthFailedError as exc:
            outcomes[i] = exc.code

    run_threads(len(keys), bind)
    assert outcomes.count(True) == 1
    assert outcomes.count("identity_mismatch") == len(keys) - 1
    assert store.agent_key("contested") == keys[outcomes.index(True)]


def test_rotate_agent_key(store: HubStore) -> None:
    store.bind_agent("alice", KEY_A, NOW)
    store.rotate_agent_key("alice", KEY_A, KEY_B, LATER)
    assert store.agent_key("alice") == KEY_B
    assert store.bind_agent("alice", KEY_B, LATER) is False
    with pytest.raises(AuthFailedError) as info:
        store.bind_agent("alice", KEY_A, LATER)
    assert info.value.code == "identity_mismatch"


def test_rotate_agent_key_needs_the_current_key(store: HubStore) -> None:
    store.bind_agent("alice", KEY_A, NOW)
    with pytest.raises(AuthFailedError) as info:
        store.rotate_agent_key("alice", KEY_B, bytes(32), NOW)
    assert info.value.code == "identity_mismatch"
    assert store.agent_key("alice") == KEY_A
    with pytest.raises(AuthFailedError) as unknown:
        store.rotate_agent_key("nobody", KEY_A, KEY_B, NOW)
    assert unknown.value.code == "unknown_agent"
    with pytest.raises(InvalidKeyError):
        store.rotate_agent_key("alice", KEY_A, b"", NOW)


def test_list_agents_sorted_and_stats(store: HubStore) -> None:
    for name in ["zed", "Bob", "alice", "a.b-c_1"]:
        store.bind_agent(name, KEY_A, NOW)
    assert store.list_agents() == ["Bob", "a.b-c_1", "alice", "zed"]
    assert store.stats() == {"agents": 4, "envelopes": 0, "bytes": 0}
    enqueue(store, [env(1, "zed", b"12345"), env(2, "alice", b"12")])
    assert store.stats() == {"agents": 4, "envelopes": 2, "bytes": 7}
    assert store.queued_count() == 2
    assert store.queued_count("zed") == 1
    assert store.queued_count("Bob") == 0
    assert store.queued_count("nobody") == 0


# --------------------------------------------------------------------------- prekeys


def test_publish_and_fetch_bundle(store: HubStore) -> None:
    assert store.fetch_bundle("alice", NOW) is None
    store.bind_agent("alice", KEY_A, NOW)
    assert store.fetch_bundle("alice", NOW) is None  # bound but nothing published
    store.publish_bundle("alice", b"bundle-1", NOW)
    assert store.fetch_bundle("alice", NOW) == FetchedBundle(b"bundle-1", None, None, 0, 0)
    store.publish_bundle("alice", b"bundle-2", LATER)
    fetched = store.fetch_bundle("alice", NOW)
    assert fetched is not None and fetched.bundle == b"bundle-2"


def test_publish_bundle_unknown_agent(store: HubStore) -> None:
    with pytest.raises(HubError) as info:
        store.publish_bundle("nobody", b"b", NOW)
    assert info.value.code == "unknown_agent"


def test_one_time_prekeys_are_handed_out_once_lowest_first(store: HubStore) -> None:
    store.bind_agent("alice", KEY_A, NOW)
    store.publish_bundle("alice", b"B", NOW)
    items = [(1, 7, b"x7"), (1, 3, b"x3"), (2, 5, b"k5"), (1, 5, b"x5")]
    assert store.add_one_time_prekeys("alice", items) == 4

    first = store.fetch_bundle("alice", NOW)
    assert first == FetchedBundle(b"B", b"x3", b"k5", 2, 0)
    second = store.fetch_bundle("alice", NOW)
    assert second == FetchedBundle(b"B", b"x5", None, 1, 0)
    third = store.fetch_bundle("alice", NOW)
    assert third == FetchedBundle(b"B", b"x7", None, 0, 0)
    assert store.fetch_bundle("alice", NOW) == FetchedBundle(b"B", None, None, 0, 0)


def test_add_one_time_prekeys_ignores_duplicates(store: HubStore) -> None:
    store.bind_agent("alice", KEY_A, NOW)
    store.publish_bundle("alice", b"B", NOW)
    assert store.add_one_time_prekeys("alice", [(1, 1, b"a"), (2, 1, b"k")]) == 2
    # Re-upload after a lost reply, plus a repeat inside the same call.
    assert store.add_one_time_prekeys("alice", [(1, 1, b"other"), (1, 2, b"b"), (1, 2, b"c")]) == 3
    assert store.add_one_time_prekeys("alice", []) == 3
    fetched = store.fetch_bundle("alice", NOW)
    assert fetched is not None
    assert (fetched.one_time_x25519, fetched.one_time_kem) == (b"a", b"k")  # not replaced
    fetched = store.fetch_bundle("alice", NOW)
    assert fetched is not None and fetched.one_time_x25519 == b"b"
    # A key handed out and then re-uploaded is stored again (the hub forgot it).
    assert store.add_one_time_prekeys("alice", [(1, 1, b"a")]) == 1


def test_add_one_time_prekeys_validation(store: HubStore) -> None:
    with pytest.raises(HubError) as info:
        store.add_one_time_prekeys("nobody", [(1, 1, b"a")])
    assert info.value.code == "unknown_agent"
    store.bind_agent("alice", KEY_A, NOW)
    with pytest.raises(LocalProtocolError):
        store.add_one_time_prekeys("alice", [(3, 1, b"a")])
    assert store.add_one_time_prekeys("alice", []) == 0


def test_fetch_bundle_race_each_prekey_once(store: HubStore, second_store: HubStore) -> None:
    per_kind = 40
    store.bind_agent("alice", KEY_A, NOW)
    store.publish_bundle("alice", b"B", NOW)
    items = [
        (kind, i, bytes([kind]) + i.to_bytes(4, "big")) for kind in (1, 2) for i in range(per_kind)
    ]
    assert store.add_one_time_prekeys("alice", items) == 2 * per_kind
    handed: list[bytes] = []
    lock = threading.Lock()

    def fetch(i: int) -> None:
        hub = store if i % 2 else second_store
        for _ in range(per_kind):  # more attempts in total than keys exist
            fetched = hub.fetch_bundle("alice", NOW)
            assert fetched is not None and fetched.bundle == b"B"
            with lock:
                handed.extend(k for k in (fetched.one_time_x25519, fetched.one_time_kem) if k)

    run_threads(6, fetch)
    assert len(handed) == len(set(handed)) == 2 * per_kind
    assert sorted(handed) == sorted(blob for _, _, blob in items)
    assert store.fetch_bundle("alice", NOW) == FetchedBundle(b"B", None, None, 0, 0)


# --------------------------------------------------------------------------- enqueue


def test_enqueue_stores_in_batch_order(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    store.bind_agent("carol", KEY_A, NOW)
    assert enqueue(store, []) == []
    results = enqueue(store, [env(1), env(2, "carol"), env(3)])
    assert statuses(results) == [STORED] * 3
    seqs = [r.seq or 0 for r in results]
    assert all(isinstance(r.seq, int) for r in results)
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert all(r.accepted for r in results)
    pending = store.pending("bob", now_ms=NOW)
    assert pending == [
        StoredEnvelope(results[0].seq or 0, mid(1), "alice", "bob", b"x"),
        StoredEnvelope(results[2].seq or 0, mid(3), "alice", "bob", b"x"),
    ]


def test_enqueue_duplicates(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    first = enqueue(store, [env(1, body=b"one")])
    again = enqueue(store, [env(1, body=b"changed"), env(2), env(2)])
    assert statuses(again) == [DUPLICATE, STORED, DUPLICATE]
    assert again[0].seq is None and again[0].accepted
    assert [e.body for e in store.pending("bob", now_ms=NOW)] == [b"one", b"x"]
    assert store.queued_count("bob") == 2
    assert first[0].seq is not None


def test_enqueue_unknown_recipient_does_not_fail_others(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    results = enqueue(store, [env(1, "ghost"), env(2), env(3, "ghost")])
    assert statuses(results) == [UNKNOWN, STORED, UNKNOWN]
    assert not results[0].accepted
    assert store.queued_count() == 1
    # The id was not taken by the refused envelope.
    store.bind_agent("ghost", KEY_B, NOW)
    assert statuses(enqueue(store, [env(1, "ghost")])) == [STORED]


def test_enqueue_count_quota(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    store.bind_agent("carol", KEY_A, NOW)
    assert statuses(enqueue(store, [env(1), env(2)], count=3)) == [STORED, STORED]
    results = enqueue(store, [env(3), env(4), env(5, "carol"), env(6)], count=3)
    assert statuses(results) == [STORED, FULL, STORED, FULL]
    assert store.queued_count("bob") == 3
    # A refused id is not held: it can be sent again once there is room.
    store.ack("bob", [mid(1)])
    assert statuses(enqueue(store, [env(4), env(6)], count=3)) == [STORED, FULL]


def test_enqueue_byte_quota(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    results = enqueue(
        store, [env(1, body=b"a" * 6), env(2, body=b"b" * 5), env(3, body=b"c" * 4)], size=10
    )
    assert statuses(results) == [STORED, FULL, STORED]
    assert store.stats()["bytes"] == 10
    assert statuses(enqueue(store, [env(4, body=b"")], size=10)) == [STORED]
    assert statuses(enqueue(store, [env(5, body=b"z")], size=10)) == [FULL]


def test_new_envelope_validation() -> None:
    with pytest.raises(LocalProtocolError):
        NewEnvelope(b"short", "a", "b", b"", NOW)
    with pytest.raises(LocalProtocolError):
        NewEnvelope(mid(1), "a", "b", "text", NOW)  # type: ignore[arg-type]


def test_concurrent_enqueue_of_one_message_id(store: HubStore, second_store: HubStore) -> None:
    """Senders racing with the same message ids to different recipients (so they do
    not serialise on one mailbox row): each id is stored once, the rest are duplicates."""
    recipients = [f"r{i}" for i in range(4)]
    for name in recipients:
        store.bind_agent(name, KEY_A, NOW)
    outcomes: list[EnqueueStatus] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        hub = store if i % 2 else second_store
        for n in range(20):
            result = enqueue(hub, [env(n, recipients[i]), env(1000 + 100 * i + n, recipients[i])])
            with lock:
                outcomes.append(result[0].status)
            assert result[1].status == STORED

    run_threads(len(recipients), send)
    assert outcomes.count(STORED) == 20
    assert outcomes.count(DUPLICATE) == 60
    assert store.queued_count() == 20 + 80
    assert actual_counters(store) == stored_counters(store)


def test_enqueue_large_batch(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    batch = [env(i, body=bytes(10)) for i in range(1200)]  # more than one IN chunk
    results = enqueue(store, batch, count=1100)
    assert statuses(results) == [STORED] * 1100 + [FULL] * 100
    assert len(store.pending("bob", now_ms=NOW, limit=5000)) == 1100


# --------------------------------------------------------------------------- pending / ack / purge


def test_pending_fifo_cursor_limit_and_ttl(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    store.bind_agent("carol", KEY_A, NOW)
    enqueue(store, [env(1), env(2, ttl=10), env(3, "carol"), env(4), env(5)])
    got = store.pending("bob", now_ms=NOW)
    assert [e.message_id for e in got] == [mid(1), mid(2), mid(4), mid(5)]
    assert [e.seq for e in got] == sorted(e.seq for e in got)
    later = store.pending("bob", now_ms=NOW + 10)  # expires_at_ms == now counts as expired
    assert [e.message_id for e in later] == [mid(1), mid(4), mid(5)]
    page = store.pending("bob", after_seq=got[0].seq, limit=2, now_ms=NOW)
    assert [e.message_id for e in page] == [mid(2), mid(4)]
    assert store.pending("bob", limit=0, now_ms=NOW) == []
    assert store.pending("nobody", now_ms=NOW) == []


def test_ack_deletes_only_own_mail(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    store.bind_agent("carol", KEY_A, NOW)
    enqueue(store, [env(1, body=b"aaa"), env(2, "carol"), env(3)])
    assert store.ack("carol", [mid(1), mid(3)]) == 0  # not carol's
    assert store.queued_count("bob") == 2
    assert store.ack("bob", [mid(1), mid(1), mid(2), mid(99)]) == 1
    assert [e.message_id for e in store.pending("bob", now_ms=NOW)] == [mid(3)]
    assert [e.message_id for e in store.pending("carol", now_ms=NOW)] == [mid(2)]
    assert store.stats() == {"agents": 2, "envelopes": 2, "bytes": 2}
    assert store.ack("bob", []) == 0
    assert store.ack("bob", [mid(1)]) == 0  # acking twice is harmless


def test_a_relaxed_ack_deletes_the_same_and_leaves_commits_durable(store: HubStore) -> None:
    """ack(durable=False) is only a cheaper commit: same rows, same counters, and the
    connection goes back to waiting for the disk for everything else."""
    store.bind_agent("bob", KEY_A, NOW)
    enqueue(store, [env(1), env(2), env(3)])
    assert store.ack("bob", [mid(1), mid(2)], durable=False) == 2
    assert [e.message_id for e in store.pending("bob", now_ms=NOW)] == [mid(3)]
    assert store.stats() == {"agents": 1, "envelopes": 1, "bytes": 1}
    if store.engine.dialect.name == "sqlite":
        for _ in range(3):  # every pooled connection is back at FULL (2)
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    else:
        with store.engine.connect() as conn:  # SET LOCAL ended with its transaction
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"


def test_seq_is_never_reused(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    first = enqueue(store, [env(1), env(2)])
    store.ack("bob", [mid(1), mid(2)])  # queue now empty
    second = enqueue(store, [env(3)])
    assert (second[0].seq or 0) > max(r.seq or 0 for r in first)
    assert [
        e.message_id for e in store.pending("bob", after_seq=first[1].seq or 0, now_ms=NOW)
    ] == [mid(3)]


def test_purge_expired(store: HubStore) -> None:
    store.bind_agent("bob", KEY_A, NOW)
    store.bind_agent("carol", KEY_A, NOW)
    enqueue(
        store,
        [env(1, ttl=5), env(2, "carol", b"cc", ttl=1), env(3, ttl=100), env(4, "carol", ttl=2)],
    )
    assert store.purge_expired(NOW) == 0
    assert store.purge_expired(NOW + 5, limit=2) == 2  # earliest expiries first: 2 and 4
    assert [e.message_id for e in store.pending("carol", now_ms=NOW)] == []
    assert store.queued_count("carol") == 0
    assert store.purge_expired(NOW + 5) == 1
    assert store.purge_expired(NOW + 5) == 0
    assert store.purge_expired(NOW + 1000, limit=0) == 0
    assert [e.message_id for e in store.pending("bob", now_ms=NOW)] == [mid(3)]
    assert store.stats() == {"agents": 2, "envelopes": 1, "bytes": 1}
    assert actual_counters(store) == stored_counters(store)


# --------------------------------------------------------------------------- property


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("enqueue"),
            st.lists(
                st.tuples(
                    st.integers(0, 2), st.integers(0, 30), st.integers(0, 12), st.integers(1, 20)
                ),
                max_size=8,
            ),
        ),
        st.tuples(st.just("ack"), st.integers(0, 2), st.lists(st.integers(0, 30), max_size=6)),
        st.tuples(st.just("purge"), st.integers(0, 25), st.integers(1, 4)),
    ),
    max_size=25,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(script=ops)
def test_counters_match_queue(store: HubStore, script: list[tuple[Any, ...]]) -> None:
    """Random enqueue/ack/purge sequences keep the counters equal to the real contents,
    never exceed the quota, and agree with a simple model of the queue."""
    store.purge_expired(NOW + 10**6, limit=10**6)  # drop earlier examples' leftovers
    tag = uuid.uuid4().hex[:8]  # each example uses fresh agents in the shared database
    names = [f"r{i}-{tag}" for i in range(3)]
    for name in names:
        store.bind_agent(name, KEY_A, NOW)
    base = int.from_bytes(uuid.uuid4().bytes[:8], "big") << 32
    model: dict[int, tuple[str, int, int]] = {}  # n -> (recipient, size, expires)
    max_count, max_bytes = 6, 40
    for op in script:
        if op[0] == "enqueue":
            batch = [
                NewEnvelope(mid(base + n), "s", names[r], bytes(size), NOW + ttl)
                for r, n, size, ttl in op[1]
            ]
            results = store.enqueue(
                batch,
                now_ms=NOW,
                max_count_per_recipient=max_count,
                max_bytes_per_recipient=max_bytes,
            )
            for item, result in zip(op[1], results, strict=True):
                r, n, size, ttl = item
                if result.status is STORED:
                    assert n not in model
                    model[n] = (names[r], size, NOW + ttl)
                elif result.status is DUPLICATE:
                    assert n in model
        elif op[0] == "ack":
            recipient = names[op[1]]
            deleted = store.ack(recipient, [mid(base + n) for n in op[2]])
            mine = {n for n in op[2] if n in model and model[n][0] == recipient}
            assert deleted == len(mine)
            for n in mine:
                del model[n]
        else:
            expired = sorted((e, n) for n, (_, _, e) in model.items() if e <= NOW + op[1])
            purged = store.purge_expired(NOW + op[1], limit=op[2])
            assert purged == min(op[2], len(expired))
            if purged == len(expired):
                for _, n in expired:
                    del model[n]
            else:
                still = {
                    int.from_bytes(e.message_id, "big") - base
                    for name in names
                    for e in store.pending(name, now_ms=0, limit=1000)
                }
                for _, n in expired:
                    if n not in still:
                        del model[n]
        for name in names:
            held = [v for v in model.values() if v[0] == name]
            assert store.queued_count(name) == len(held)
            assert len(held) <= max_count and sum(v[1] for v in held) <= max_bytes
    assert actual_counters(store) == stored_counters(store)


def test_one_time_prekeys_per_agent_are_bounded(store: HubStore) -> None:
    """An agent cannot fill the hub's database with one-time prekeys."""
    from agentmesh.hub.store import MAX_ONE_TIME_PREKEYS_PER_KIND

    store.bind_agent("alice", KEY_A, NOW)
    items = [(1, i, b"k%d" % i) for i in range(MAX_ONE_TIME_PREKEYS_PER_KIND)]
    assert store.add_one_time_prekeys("alice", items) == MAX_ONE_TIME_PREKEYS_PER_KIND
    with pytest.raises(HubError) as refused:
        store.add_one_time_prekeys("alice", [(1, 10**6, b"one too many")])
    assert refused.value.code == "too_many_prekeys"
    assert store.add_one_time_prekeys("alice", [(2, 1, b"other kind")]) == (
        MAX_ONE_TIME_PREKEYS_PER_KIND + 1
    )
