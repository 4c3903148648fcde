"""Deleted secrets do not stay in the agent's state file or its WAL.

A secret is written into a row, then overwritten or deleted; after the scrub
(called, or run by AgentState itself after such a deletion) its bytes are in
neither ``<state>`` nor ``<state>-wal``, read raw from the disk. ``kill -9``
leaves exactly these files, so reading them while the state is open is what
an attacker with the disk would see after a kill.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubproc import wait_until

from agentmesh import Agent, LocalHub
from agentmesh.state import AgentState, InboxRow

SCRUB_INTERVAL_S = 60.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def secret(size: int = 48) -> bytes:
    return b"SECRET:" + os.urandom(size)


def leaks(path: Path, blob: bytes) -> list[str]:
    """Which of the state file and its WAL hold any 24-byte piece of ``blob``."""
    pieces = [blob[i : i + 24] for i in range(0, len(blob) - 23, 24)]
    found = []
    for name in (path.name, path.name + "-wal"):
        try:
            data = (path.parent / name).read_bytes()
        except FileNotFoundError:
            continue
        if any(piece in data for piece in pieces):
            found.append(name)
    return found


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(tmp_path: Path, clock: Clock) -> Iterator[AgentState]:
    opened = AgentState(tmp_path / "b.state.sqlite", clock=clock, scrub_interval_s=SCRUB_INTERVAL_S)
    yield opened
    opened.close()


def row(n: int, payload: bytes) -> InboxRow:
    return InboxRow(0, n.to_bytes(16, "big"), "alice", payload, 1, None)


@pytest.mark.parametrize("size", [48, 6000], ids=["in-page", "overflow-pages"])
def test_overwritten_meta_secret_is_gone_after_scrub(state: AgentState, size: int) -> None:
    old = secret(size)
    state.set_meta("prekeys", old)
    state.set_meta("prekeys", secret(size))
    assert state.path is not None
    assert leaks(state.path, old)  # the precondition: without a scrub it is there
    assert state.scrub()
    assert leaks(state.path, old) == []
    assert os.path.getsize(f"{state.path}-wal") == 0


def test_overwritten_ratchet_state_is_gone_after_scrub(state: AgentState) -> None:
    old = secret(300)
    state.save_session("alice", old)
    state.commit_sent("alice", secret(300), bytes(16), b"envelope", 1)
    state.scrub()
    assert state.path is not None and leaks(state.path, old) == []


def test_consumed_prekey_triggers_the_scrub(state: AgentState, clock: Clock) -> None:
    """commit_received_batch rewrites the prekeys row after a consumption: AgentState
    scrubs by itself once the interval since the last scrub has passed."""
    assert state.path is not None
    consumed = secret(200)
    state.set_meta("prekeys", consumed)
    clock.now += SCRUB_INTERVAL_S
    state.commit_received_batch({"alice": b"record"}, {}, secret(200), [row(1, b"{}")], 1)
    assert leaks(state.path, consumed) == []


def test_handled_plaintext_is_scrubbed_when_its_row_is_deleted(
    state: AgentState, clock: Clock
) -> None:
    assert state.path is not None
    plaintext = secret(400)
    state.commit_received_batch({"alice": b"record"}, {}, None, [row(1, plaintext)], 1)
    (handled,) = state.unhandled()
    state.mark_handled(handled.seq)
    clock.now += SCRUB_INTERVAL_S
    assert state.unhandled() == []  # deletes the handled row, then scrubs
    assert leaks(state.path, plaintext) == []


@pytest.mark.parametrize("size", [400, 6000], ids=["in-page", "overflow-pages"])
def test_deleted_row_is_zeroed_in_the_database_file(state: AgentState, size: int) -> None:
    """A row already checkpointed into the database file, deleted among others that
    stay: ``secure_delete`` zeroes its cell (or its overflow pages) there. (Some
    SQLite builds turn it on by default, others do not: AgentState sets it.)"""
    assert state.path is not None
    assert state._db.execute("PRAGMA secure_delete").fetchone() == (1,)
    plaintexts = [secret(size) for _ in range(3)]
    state.commit_received_batch(
        {"alice": b"record"}, {}, None, [row(n, text) for n, text in enumerate(plaintexts)], 1
    )
    state.scrub()
    assert leaks(state.path, plaintexts[1]) == [state.path.name]  # now in the file itself
    middle = state.unhandled()[1]
    state.mark_handled(middle.seq)
    state.unhandled()  # deletes the handled row
    state.scrub()
    assert leaks(state.path, plaintexts[1]) == []
    assert leaks(state.path, plaintexts[0]) == [state.path.name]  # the others are still there


def test_scrub_is_rate_limited(state: AgentState, clock: Clock) -> None:
    """Within the interval a deletion does not checkpoint (throughput); after it, one does."""
    assert state.path is not None
    first = secret()
    state.set_meta("prekeys", first)  # within the interval since the scrub at open
    clock.now += SCRUB_INTERVAL_S
    state.set_meta("prekeys", secret())  # scrubs: the interval has passed
    assert leaks(state.path, first) == []
    second = secret()
    state.set_meta("prekeys", second)
    state.set_meta("prekeys", secret())  # within the interval: left for later
    assert leaks(state.path, second)
    clock.now += SCRUB_INTERVAL_S
    state.save_session("alice", b"record")  # the next secret-deleting commit scrubs
    assert leaks(state.path, second) == []


def test_a_deferred_scrub_runs_by_itself(tmp_path: Path) -> None:
    """The rate limit defers the scrub; a timer runs it even if nothing else happens."""
    state = AgentState(tmp_path / "b.state.sqlite", scrub_interval_s=0.2)
    try:
        assert state.path is not None
        old = secret()
        state.set_meta("prekeys", old)
        state.set_meta("prekeys", secret())
        wait_until(lambda: not leaks(state.path, old), 10, "the deferred scrub")
    finally:
        state.close()


def test_close_scrubs(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "b.state.sqlite"
    state = AgentState(path, clock=clock, scrub_interval_s=SCRUB_INTERVAL_S)
    old = secret(500)
    state.set_meta("prekeys", old)
    state.set_meta("prekeys", secret(500))
    state.close()
    assert leaks(path, old) == []


def test_open_scrubs_what_a_killed_process_left(tmp_path: Path, clock: Clock) -> None:
    """A WAL full of deleted secrets left by ``kill -9`` is emptied at the next open."""
    path = tmp_path / "b.state.sqlite"
    state = AgentState(path, clock=clock, scrub_interval_s=SCRUB_INTERVAL_S)
    old = secret(500)
    state.set_meta("prekeys", old)
    state.set_meta("prekeys", secret(500))
    killed = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    state.close()
    for name, data in killed.items():  # the files exactly as the kill left them
        (tmp_path / name).write_bytes(data)
    assert leaks(path, old)
    AgentState(path).close()
    reopened = AgentState(path)
    try:
        assert leaks(path, old) == []
    finally:
        reopened.close()


def test_handled_plaintexts_of_an_agent(tmp_path: Path) -> None:
    """SECURITY.md limitation 9, measured again: 30 messages handled by bob (LocalHub,
    keypair_path), then the files as a kill would leave them; no plaintext is left
    once the deferred scrub ran (at most a second after the last one was handled)."""
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=tmp_path / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=tmp_path / "bob.json")
    try:
        got: list[str] = []
        bob.on_message(lambda message: got.append(message.payload["text"]))
        texts = [f"plaintext-{n:02d}-{os.urandom(12).hex()}" for n in range(30)]
        for text in texts:
            alice.send("bob", text)
        wait_until(lambda: len(got) == 30, 30, "30 messages handled")
        path = tmp_path / "bob.state.sqlite"

        def remaining() -> int:
            return sum(1 for text in texts if leaks(path, text.encode()))

        at_once = remaining()
        wait_until(lambda: remaining() == 0, 10, "every handled plaintext scrubbed")
        print(f"\nplaintexts in bob's state files: {at_once}/30 at once, 0/30 after the scrub")
    finally:
        alice.close()
        bob.close()
