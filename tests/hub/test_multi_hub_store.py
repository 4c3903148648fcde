"""The store's side of several hubs on one PostgreSQL: cursors, leases, NOTIFY.

The cursor tests pause transactions at chosen points (a second connection, or a
trigger waiting on an advisory lock the test holds) so the interleavings are
deterministic: first that a cursor trusting the sequence skips a row when two
writers commit out of ``seq`` order, then that ``HubStore.enqueue`` cannot be
overtaken that way (docs in agentmesh/hub/store.py, "Cursors").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hubproc import wait_until
from pgschema import fresh_pg_database, fresh_pg_schema
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from agentmesh.errors import AuthFailedError
from agentmesh.hub.store import EnqueueStatus, HubStore, NewEnvelope

pytestmark = pytest.mark.timeout(60)
KEY = bytes(range(32))
FAR = 10**15


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_schema() as url:
        yield url


@pytest.fixture
def store(pg_url: str) -> Iterator[HubStore]:
    with HubStore(pg_url) as hub:
        hub.ensure_schema()
        for agent in ("alice", "bob"):
            hub.bind_agent(agent, KEY, 1)
        yield hub


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def envelope(n: int, recipient: str = "bob", body: bytes = b"x") -> NewEnvelope:
    return NewEnvelope(n.to_bytes(16, "big"), "alice", recipient, body, FAR)


def enqueue(hub: HubStore, items: list[NewEnvelope], **kw: Any) -> list[Any]:
    return hub.enqueue(
        items, now_ms=1, max_count_per_recipient=1000, max_bytes_per_recipient=10**9, **kw
    )


def raw_insert(conn: Any, n: int) -> int:
    """Insert an envelope for bob the naive way (no mailbox lock); return its seq."""
    return int(
        conn.execute(
            text(
                "INSERT INTO envelopes (message_id, sender, recipient, body, size, "
                "created_at_ms, expires_at_ms) VALUES (:m, 'alice', 'bob', 'x', 1, 1, :far) "
                "RETURNING seq"
            ),
            {"m": n.to_bytes(16, "big"), "far": FAR},
        ).scalar_one()
    )


def seqs(hub: HubStore, after: int) -> list[int]:
    return [row.seq for row in hub.pending("bob", after_seq=after, now_ms=1)]


def test_a_cursor_trusting_the_sequence_skips_rows(store: HubStore, engine: Engine) -> None:
    # Two writers that do not serialise per recipient: the first draws seq s1,
    # the second draws s2 > s1 and commits first.
    with engine.connect() as slow, engine.connect() as fast:
        slow.begin()
        s1 = raw_insert(slow, 1)
        fast.begin()
        s2 = raw_insert(fast, 2)
        fast.commit()
        assert s2 > s1
        cursor = max(seqs(store, 0))  # a page sees s2 only and moves the cursor to it
        assert cursor == s2
        slow.commit()
    assert seqs(store, cursor) == []  # s1 is committed now, and behind the cursor
    assert s1 in seqs(store, 0)  # it is there: the naive cursor skipped it


def test_enqueue_serialises_each_recipients_commits(store: HubStore, engine: Engine) -> None:
    # A trigger pauses the insert of body b'slow' on an advisory lock the test
    # holds: that enqueue has drawn its seq and sits inside its transaction.
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION pause_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.body = 'slow'::bytea THEN PERFORM pg_advisory_lock(4242); "
                "PERFORM pg_advisory_unlock(4242); END IF; RETURN NEW; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER pause_slow AFTER INSERT ON envelopes "
                "FOR EACH ROW EXECUTE FUNCTION pause_slow()"
            )
        )
    results: queue.Queue[tuple[str, Any]] = queue.Queue()

    def run(name: str, item: NewEnvelope) -> None:
        results.put((name, enqueue(store, [item])[0]))

    def waiting() -> int:
        with engine.connect() as conn:
            return int(
                conn.scalar(
                    text(
                        "SELECT COUNT(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
                or 0
            )

    with engine.connect() as gate:
        gate.execute(text("SELECT pg_advisory_lock(4242)"))
        slow = threading.Thread(target=run, args=("slow", envelope(1, body=b"slow")))
        slow.start()
        wait_until(lambda: waiting() == 1, what="the slow enqueue paused after its insert")
        fast = threading.Thread(target=run, args=("fast", envelope(2)))
        fast.start()
        wait_until(lambda: waiting() == 2, what="the fast enqueue waiting for bob's mailbox")
        assert seqs(store, 0) == []  # nothing committed, nothing for a page to skip
        with engine.connect() as conn:  # the newest seq drawn so far, by anyone
            drawn = conn.scalar(text("SELECT last_value FROM envelopes_seq_seq"))
        gate.execute(text("SELECT pg_advisory_unlock(4242)"))
        gate.commit()
    slow.join(10)
    fast.join(10)
    done = dict(results.get_nowait() for _ in range(2))
    assert done["slow"].status is done["fast"].status is EnqueueStatus.STORED
    # The fast writer had drawn no seq while it waited; it drew one after the slow
    # writer committed ...
    assert drawn == done["slow"].seq < done["fast"].seq
    # ... and knows what came before it, so a hub that saw seq slow may push it.
    assert done["fast"].prev_seq == done["slow"].seq
    assert seqs(store, 0) == [done["slow"].seq, done["fast"].seq]


def test_prev_seq_chains_within_a_batch(store: HubStore) -> None:
    first = enqueue(store, [envelope(1)])[0]
    assert first.prev_seq == 0
    batch = enqueue(store, [envelope(2), envelope(3, "alice"), envelope(4)])
    assert [r.prev_seq for r in batch] == [first.seq, 0, batch[0].seq]


def test_recipients_with_mail(store: HubStore) -> None:
    stored = enqueue(store, [envelope(1), envelope(2)])
    cursors = {"alice": 0, "bob": 0}
    assert store.recipients_with_mail(cursors, now_ms=1) == {"bob"}
    cursors["bob"] = stored[1].seq
    assert store.recipients_with_mail(cursors, now_ms=1) == set()
    assert store.recipients_with_mail({"bob": 0}, now_ms=FAR) == set()  # expired


def test_leases(store: HubStore) -> None:
    claim = store.claim_lease("bob", "hub-a", 1, now_ms=1000, ttl_ms=500)
    assert (claim.granted, claim.expires_at_ms) == (True, 1500)
    refused = store.claim_lease("bob", "hub-b", 2, now_ms=1100, ttl_ms=500)
    assert (refused.granted, refused.hub_id, refused.expires_at_ms) == (False, "hub-a", 1500)
    assert store.claim_lease("bob", "hub-a", 3, now_ms=1100, ttl_ms=500).granted  # same hub
    assert store.renew_leases("hub-a", {"bob": 3}, now_ms=1400, ttl_ms=500) == set()
    assert store.lease_holder("bob") == ("hub-a", 3, 1900)
    assert store.renew_leases("hub-a", {"bob": 1}, now_ms=1400, ttl_ms=500) == {"bob"}
    assert not store.claim_lease("bob", "hub-b", 2, now_ms=1899, ttl_ms=500).granted
    assert store.claim_lease("bob", "hub-b", 2, now_ms=1900, ttl_ms=500).granted  # expired
    assert store.renew_leases("hub-a", {"bob": 3}, now_ms=2000, ttl_ms=500) == {"bob"}
    assert not store.release_lease("bob", "hub-a")
    assert store.release_lease("bob", "hub-b", 2)
    assert store.lease_holder("bob") is None
    store.claim_lease("alice", "hub-c", 5, now_ms=1, ttl_ms=FAR)
    store.claim_lease("bob", "hub-c", 6, now_ms=1, ttl_ms=FAR)
    assert store.release_hub_leases("hub-c") == 2
    assert store.lease_holder("alice") is None


def test_listener_hears_commits_with_ids_only() -> None:
    with fresh_pg_database() as url, HubStore(url) as hub:
        hub.ensure_schema()
        hub.bind_agent("bob", KEY, 1)
        heard: queue.Queue[str] = queue.Queue()
        connected = threading.Event()
        listener = hub.listen(heard.put, connected.set, name="test-listener")
        listener.start()
        try:
            assert connected.wait(10)
            assert any(t.name == "test-listener" for t in threading.enumerate())
            enqueue(hub, [envelope(1), envelope(2)], notify_from="hub-a")
            assert heard.get(timeout=10) == "m hub-a bob"  # one per recipient and commit
            hub.claim_lease("bob", "hub-a", 1, now_ms=1, ttl_ms=FAR)
            hub.claim_lease("bob", "hub-b", 2, now_ms=2, ttl_ms=FAR)
            assert heard.get(timeout=10) == "r hub-a bob"
            hub.release_lease("bob", "hub-a")
            assert heard.get(timeout=10) == "f bob"
            assert heard.empty()
        finally:
            listener.close()
        assert not any(t.name == "test-listener" for t in threading.enumerate())


def test_an_ephemeral_id_is_not_taken_over_while_another_hub_holds_its_lease(
    store: HubStore,
) -> None:
    old, new = bytes(32), bytes([7]) * 32
    assert store.bind_agent("eve", old, 1, ephemeral=True)
    store.claim_lease("eve", "hub-a", 1, now_ms=1000, ttl_ms=500)
    # Hub B sees no live session of eve itself, but hub A's lease is live.
    with pytest.raises(AuthFailedError):
        store.bind_agent("eve", new, 1200, ephemeral=True, holder_live=False)
    assert store.bind_agent("eve", new, 1500, ephemeral=True, holder_live=False)  # expired
    assert store.agent_key("eve") == new


def test_group_commits_with_acks_for_each_others_recipients_do_not_deadlock(
    store: HubStore, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 13 (the two-hub crash matrix's order violations): hub A's group commit
    # deletes an acknowledged envelope of bob's and queues one for alice, while
    # hub B's deletes one of alice's and queues one for bob. Each used to lock the
    # mailbox rows of its acks first (the counter update) and then those of its
    # batch: A held bob and wanted alice, B held alice and wanted bob. PostgreSQL
    # aborted one of them; the hub answered its SENDs with ``internal``, the agents
    # kept those envelopes in their outboxes and re-sent them only at their next
    # login, after later messages. A trigger pauses A right after its ack updated
    # bob's counter (a decrement of bob's count), on an advisory lock the test holds.
    acked_bob, acked_alice = envelope(1, "bob"), envelope(2, "alice")
    enqueue(store, [acked_bob, acked_alice])
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION pause_bob_ack() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.recipient = 'bob' AND NEW.msg_count < OLD.msg_count THEN "
                "PERFORM pg_advisory_lock(4243); PERFORM pg_advisory_unlock(4243); END IF; "
                "RETURN NEW; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER pause_bob_ack AFTER UPDATE ON mailboxes "
                "FOR EACH ROW EXECUTE FUNCTION pause_bob_ack()"
            )
        )
    outcomes: queue.Queue[tuple[str, Any]] = queue.Queue()

    def run(name: str, item: NewEnvelope, acks: dict[str, list[bytes]]) -> None:
        try:
            outcomes.put((name, enqueue(store, [item], acks=acks)[0]))
        except Exception as exc:
            outcomes.put((name, exc))

    def waiting() -> int:
        with engine.connect() as conn:
            return int(
                conn.scalar(
                    text(
                        "SELECT COUNT(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
                or 0
            )

    hub_a = threading.Thread(
        target=run, args=("a", envelope(3, "alice"), {"bob": [acked_bob.message_id]})
    )
    hub_b = threading.Thread(
        target=run, args=("b", envelope(4, "bob"), {"alice": [acked_alice.message_id]})
    )
    with engine.connect() as gate:
        gate.execute(text("SELECT pg_advisory_lock(4243)"))
        hub_a.start()
        wait_until(lambda: waiting() == 1, what="hub A paused inside its group commit")
        hub_b.start()
        wait_until(lambda: waiting() == 2, what="hub B waiting for a mailbox hub A holds")
        gate.execute(text("SELECT pg_advisory_unlock(4243)"))
        gate.commit()
    hub_a.join(30)
    hub_b.join(30)
    done = dict(outcomes.get_nowait() for _ in range(2))
    assert not any(isinstance(result, Exception) for result in done.values()), done
    assert "aborted by the database" not in caplog.text  # no deadlock, not even a retried one
    assert done["a"].status is done["b"].status is EnqueueStatus.STORED
    assert [row.message_id for row in store.pending("bob", now_ms=1)] == [envelope(4).message_id]
    assert [row.message_id for row in store.pending("alice", now_ms=1)] == [envelope(3).message_id]


class _Aborted(Exception):
    sqlstate = "40P01"  # what psycopg's DeadlockDetected carries


def test_enqueue_retries_a_transaction_the_database_aborted(
    store: HubStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever else makes PostgreSQL pick this commit as a deadlock victim (or fail
    # it for serialisation), the batch is run again rather than refused.
    real = HubStore._enqueue
    calls: list[int] = []

    def flaky(conn: Any, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT ... FOR UPDATE", {}, _Aborted())
        return real(conn, *args)

    monkeypatch.setattr(HubStore, "_enqueue", staticmethod(flaky))
    [result] = enqueue(store, [envelope(1)])
    assert result.status is EnqueueStatus.STORED and len(calls) == 2
    assert seqs(store, 0) == [result.seq]
