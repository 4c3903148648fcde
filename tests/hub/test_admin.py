"""``agentmesh-hub admin``: agents, stats, unbind and purge-expired, as subprocesses of
the real script on the database of a real hub (running, or set up through HubStore).

The unbind test is the operator's recovery after a lost key: the id is released,
its queued mail dropped (and counted), a new key registers the same id, and the
peer that pinned the old key trusts the new fingerprint and delivers.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from agentkit import Inbox
from hubproc import wait_until
from opskit import ScriptHub, fresh_pg_database, hub_cli

from agentmesh import Agent
from agentmesh.hub.store import HubStore, NewEnvelope

pytestmark = pytest.mark.timeout(120)


def migrated(path: Path) -> HubStore:
    store = HubStore(str(path))
    store.ensure_schema()
    return store


def test_agents_and_stats_on_a_running_hub(tmp_path: Path) -> None:
    hub = ScriptHub(tmp_path).start()
    try:
        with hub.client() as client:
            alice = Agent("alice", hub=client, keypair_path=tmp_path / "alice.json")
            bob = Agent("bob", hub=client, keypair_path=tmp_path / "bob.json")
            bob.close()
            alice.send("bob", text="one")
            alice.send("bob", text="two")
            fingerprints = {"alice": alice.fingerprint, "bob": bob.fingerprint}
            alice.close()

        listing = hub_cli("admin", "agents", "--db", "hub.sqlite", cwd=tmp_path)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert lines[0].split()[:3] == ["AGENT", "ID", "FINGERPRINT"]
        assert lines[1].split()[:2] == ["alice", fingerprints["alice"]]
        assert lines[2].split()[:2] == ["bob", fingerprints["bob"]]
        assert lines[2].split()[4] == "2"  # bob's queued messages (after the date and time)
        assert lines[-1] == "2 agents"

        rows = json.loads(hub_cli("admin", "agents", "--json", cwd=tmp_path).stdout)
        assert [(r["agent_id"], r["fingerprint"], r["queued_messages"]) for r in rows] == [
            ("alice", fingerprints["alice"], 0),
            ("bob", fingerprints["bob"], 2),
        ]
        assert all(r["has_bundle"] and r["one_time_prekeys"] > 0 for r in rows)

        stats = hub_cli("admin", "stats", cwd=tmp_path)  # hub.sqlite by default
        assert stats.returncode == 0, stats.stderr
        assert "bound agents:" in stats.stdout and "queued envelopes:" in stats.stdout
        values = json.loads(hub_cli("admin", "stats", "--json", cwd=tmp_path).stdout)
        assert values["agents"] == 2 and values["queued_envelopes"] == 2
        assert values["expired_envelopes"] == 0 and values["oldest_envelope_age_s"] >= 0
    finally:
        hub.stop()


def test_unbind_then_a_new_key_registers_the_id_and_the_peer_trusts_it(tmp_path: Path) -> None:
    hub = ScriptHub(tmp_path).start()
    try:
        with hub.client() as client:
            alice = Agent("alice", hub=client, keypair_path=tmp_path / "alice.json")
            old_bob = Agent("bob", hub=client, keypair_path=tmp_path / "lost" / "bob.json")
            old_fingerprint = old_bob.fingerprint
            to_old_bob = Inbox()
            old_bob.on_message(to_old_bob)
            alice.send("bob", text="before")  # a session with the old key
            # Read and deleted before the key is lost, so that exactly the next three
            # wait for it (closing at once would race the delivery of this one).
            wait_until(lambda: to_old_bob.texts == ["before"])
            wait_until(
                lambda: (
                    hub.query("SELECT COUNT(*) FROM envelopes WHERE recipient = 'bob'") == [(0,)]
                ),
                what="the hub deleted the acknowledged envelope",
            )
            old_bob.close()
            for i in range(3):
                alice.send("bob", text=f"queued-{i}")  # never read: the key is lost

            released = hub_cli("admin", "unbind", "bob", "--db", "hub.sqlite", cwd=tmp_path)
            assert released.returncode == 0, released.stderr
            assert "released agent 'bob'" in released.stdout
            assert "dropped 3 queued envelopes" in released.stdout
            assert old_fingerprint in released.stdout
            # The log line says who and when (an OS user, an ISO time in UTC).
            assert "unbound agent 'bob'" in released.stderr and "by OS user" in released.stderr
            assert "Z;" in released.stderr
            assert hub.query("SELECT COUNT(*) FROM envelopes WHERE recipient = 'bob'") == [(0,)]

            again = hub_cli("admin", "unbind", "bob", cwd=tmp_path)
            assert again.returncode == 1 and "not bound" in again.stderr
            invalid = hub_cli("admin", "unbind", "no such id!", cwd=tmp_path)
            assert invalid.returncode == 2

            new_bob = Agent("bob", hub=client, keypair_path=tmp_path / "new" / "bob.json")
            assert new_bob.fingerprint != old_fingerprint
            new_fingerprint = new_bob.fingerprint
            to_bob, to_alice = Inbox(), Inbox()
            new_bob.on_message(to_bob)
            alice.on_message(to_alice)
            # A peer that never pinned the old key just talks to the new one.
            carol = Agent("carol", hub=client, keypair_path=tmp_path / "carol.json")
            carol.send("bob", text="hi new bob")
            wait_until(lambda: to_bob.texts == ["hi new bob"])
            carol.close()
            # alice pinned the old key: the new bob's first message is held until she
            # verifies and trusts the new fingerprint, then arrives; her reply reaches him.
            new_bob.send("alice", text="my old key is gone")

            def trusted() -> bool:
                try:
                    alice.trust("bob", new_fingerprint)
                except ValueError:
                    return False  # alice has not seen the new key yet
                return True

            wait_until(trusted, what="alice saw the new key")
            wait_until(lambda: to_alice.texts == ["my old key is gone"])
            alice.send("bob", text="welcome back")
            wait_until(lambda: to_bob.texts == ["hi new bob", "welcome back"])
            alice.close()
            new_bob.close()
    finally:
        hub.stop()


def test_purge_expired_and_stats_count_expired_mail(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite"
    with migrated(path) as store:
        store.bind_agent("bob", bytes(range(32)), 1)
        batch = [NewEnvelope(bytes([i]) * 16, "alice", "bob", b"x" * 10, 5) for i in range(3)]
        batch.append(NewEnvelope(b"\xff" * 16, "alice", "bob", b"y", 2**62))  # not expired
        store.enqueue(batch, now_ms=1, max_count_per_recipient=10, max_bytes_per_recipient=10**6)

    before = json.loads(hub_cli("admin", "stats", "--json", cwd=tmp_path).stdout)
    assert before["expired_envelopes"] == 3 and before["queued_envelopes"] == 4
    purge = hub_cli("admin", "purge-expired", cwd=tmp_path)
    assert purge.returncode == 0, purge.stderr
    assert purge.stdout.strip() == "purged 3 expired envelopes"
    after = json.loads(hub_cli("admin", "stats", "--json", cwd=tmp_path).stdout)
    assert after["expired_envelopes"] == 0 and after["queued_envelopes"] == 1
    assert hub_cli("admin", "purge-expired", cwd=tmp_path).stdout.strip() == (
        "purged 0 expired envelopes"
    )


def test_admin_on_no_database_or_one_not_at_head_exits_2(tmp_path: Path) -> None:
    for action in (["agents"], ["stats"], ["unbind", "bob"], ["purge-expired"]):
        result = hub_cli("admin", *action, "--db", "absent.sqlite", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "no hub database at absent.sqlite" in result.stderr
    assert not (tmp_path / "absent.sqlite").exists()  # never created by a look

    sqlite3.connect(tmp_path / "empty.sqlite").close()  # a file, but no schema
    result = hub_cli("admin", "agents", "--db", "empty.sqlite", cwd=tmp_path)
    assert result.returncode == 2
    assert "not at head" in result.stderr and "agentmesh-hub migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_admin_on_postgresql(tmp_path: Path) -> None:
    with fresh_pg_database() as url:
        with HubStore(url) as store:
            store.ensure_schema()
            store.bind_agent("carol", bytes(range(32)), 1_700_000_000_000)
        listing = hub_cli("admin", "agents", "--db", url, cwd=tmp_path)
        assert listing.returncode == 0, listing.stderr
        assert "carol" in listing.stdout and "2023-11-14 22:13:20" in listing.stdout
        released = hub_cli("admin", "unbind", "carol", "--db", url, cwd=tmp_path)
        assert released.returncode == 0, released.stderr
        assert "dropped 0 queued envelopes" in released.stdout
        empty = hub_cli("admin", "agents", "--db", url, cwd=tmp_path)
        assert empty.stdout.strip() == "no agent is bound on this hub"


def test_admin_on_an_unreachable_database_exits_2(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # nothing listens on port 1
    result = hub_cli("admin", "stats", "--db", url, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"cannot use the database {url}" in result.stderr
    assert "Traceback" not in result.stderr
