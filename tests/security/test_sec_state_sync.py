"""F-5: ``AgentState.sync()`` returns only after a successful fsync that started
after the caller's commit (the agent transmits an envelope right after it).

The disk is a fake ``fdatasync`` (``agentmesh.state._fdatasync``) that records
when each call starts and ends, can hold a call at a gate and can fail it.
Nothing here depends on timing: a caller of ``sync()`` takes the state lock
*before* announcing itself, so the gate holding the first fsync opens only
once that caller waits inside ``sync()`` (which releases the lock) or has
returned from it (in which case the gate is still closed when it looks).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentmesh import state as state_module
from agentmesh.state import AgentState

GATE_TIMEOUT_S = 30.0  # only ever reached if the code under test is broken


class FakeDisk:
    """An ``fdatasync`` that logs ``("start", n)`` and ``("ok"|"fail", n)`` per call."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.gates: dict[int, threading.Event] = {}
        self.entered: dict[int, threading.Event] = {}
        self.failing: set[int] = set()
        self.calls = 0
        self._lock = threading.Lock()

    def hold(self, call: int) -> threading.Event:
        """Make call number ``call`` wait until the returned event is set."""
        self.entered[call] = threading.Event()
        self.gates[call] = threading.Event()
        return self.gates[call]

    def mark(self, what: str) -> None:
        with self._lock:
            self.log.append((what, -1))

    def __call__(self, fd: int) -> None:
        with self._lock:
            n, self.calls = self.calls, self.calls + 1
            self.log.append(("start", n))
        if n in self.entered:
            self.entered[n].set()
            assert self.gates[n].wait(GATE_TIMEOUT_S), f"fsync {n} was never released"
        os.fsync(fd)
        with self._lock:
            if n in self.failing:
                self.log.append(("fail", n))
                raise OSError(errno.EIO, "Input/output error (injected)")
            self.log.append(("ok", n))


def durable_since(log: list[tuple[str, int]], marker: str) -> bool:
    """Whether an fsync that started after ``marker`` was logged has succeeded."""
    after = log[log.index((marker, -1)) + 1 :]
    started = {n for what, n in after if what == "start"}
    return any(what == "ok" and n in started for what, n in after)


class Caller(threading.Thread):
    """``state.sync()`` on a thread, keeping its outcome."""

    def __init__(self, state: AgentState, announce: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.state, self.announce = state, announce
        self.error: BaseException | None = None
        self.returned = False

    def run(self) -> None:
        try:
            if self.announce is None:
                self.state.sync()
            else:
                with self.state._lock:  # announced while holding it (see module docstring)
                    self.announce.set()
                    self.state.sync()
            self.returned = True
        except BaseException as exc:
            self.error = exc


def open_gate_once_waiting(
    state: AgentState, gate: threading.Event, *announced: threading.Event
) -> threading.Thread:
    """Open ``gate`` once every announced caller has let go of the state lock."""

    def run() -> None:
        for event in announced:
            assert event.wait(GATE_TIMEOUT_S)
        with state._lock:
            gate.set()

    opener = threading.Thread(target=run, daemon=True)
    opener.start()
    return opener


def sync_here(state: AgentState, disk: FakeDisk, gate: threading.Event) -> list[tuple[str, int]]:
    """``state.sync()`` on this thread while the held fsync waits at ``gate``; returns
    the disk log as it was when sync() returned (the lock still held)."""
    here = threading.Event()
    opener = open_gate_once_waiting(state, gate, here)
    try:
        with state._lock:
            here.set()
            try:
                state.sync()
            finally:
                seen = list(disk.log)
    finally:
        gate.set()  # never leave the first caller stuck, whatever happened
        opener.join(GATE_TIMEOUT_S)
    return seen


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> FakeDisk:
    fake = FakeDisk()
    monkeypatch.setattr(state_module, "_fdatasync", fake)
    return fake


@pytest.fixture
def make_state(tmp_path: Path) -> Iterator[Callable[[], AgentState]]:
    made: list[AgentState] = []

    def make() -> AgentState:
        # No scrub timer during the test: it would take the lock at a random moment.
        made.append(AgentState(tmp_path / "a.state.sqlite", scrub_interval_s=3600.0))
        return made[-1]

    yield make
    for state in made:
        state.close()


def relaxed_commit(state: AgentState, n: int) -> None:
    state.commit_sent("bob", b"record", n.to_bytes(16, "big"), b"envelope", 1, durable=False)


def start_first_sync(state: AgentState, disk: FakeDisk) -> tuple[Caller, threading.Event]:
    """A first caller whose fsync (call 0) is now in progress, held at the returned gate."""
    gate = disk.hold(0)
    first = Caller(state)
    first.start()
    assert disk.entered[0].wait(GATE_TIMEOUT_S)
    return first, gate


def test_second_caller_waits_for_the_fsync_in_progress(make_state, disk: FakeDisk) -> None:
    """The bug: the first caller cleared the flag before its fsync, so a second
    caller returned (and transmitted) while the data was not on disk yet."""
    state = make_state()
    disk.mark("commit")
    relaxed_commit(state, 1)
    first, gate = start_first_sync(state, disk)
    seen = sync_here(state, disk, gate)
    first.join(GATE_TIMEOUT_S)
    assert durable_since(seen, "commit"), f"sync() returned before the disk: {seen}"
    assert first.returned and first.error is None
    assert disk.calls == 1  # the second caller shared the first one's fsync
    assert not state.unsynced


def test_a_commit_during_an_fsync_needs_a_later_fsync(make_state, disk: FakeDisk) -> None:
    """An fsync that started before a commit does not cover it: sync() runs another."""
    state = make_state()
    relaxed_commit(state, 1)
    first, gate = start_first_sync(state, disk)
    disk.mark("commit during fsync 0")
    relaxed_commit(state, 2)  # goes through: sync() holds no lock while the disk works
    assert state.unsynced
    seen = sync_here(state, disk, gate)
    first.join(GATE_TIMEOUT_S)
    assert durable_since(seen, "commit during fsync 0"), seen
    assert ("ok", 0) in seen and ("start", 1) in seen  # waited for fsync 0, then ran 1
    assert first.returned and not state.unsynced


def test_concurrent_callers_share_one_fsync(make_state, disk: FakeDisk) -> None:
    """Group commit: callers covered by the fsync in progress all wait for it, none runs its own."""
    state = make_state()
    disk.mark("commit")
    relaxed_commit(state, 1)
    first, gate = start_first_sync(state, disk)
    announced = threading.Event()
    second = Caller(state, announced)
    second.start()
    assert announced.wait(GATE_TIMEOUT_S)
    seen = sync_here(state, disk, gate)  # the gate opens once both wait
    for caller in (first, second):
        caller.join(GATE_TIMEOUT_S)
        assert caller.returned and caller.error is None
    assert durable_since(seen, "commit"), seen
    assert disk.calls == 1


def test_failed_fsync_makes_its_callers_raise_and_the_next_sync_fsyncs_again(
    make_state, disk: FakeDisk
) -> None:
    state = make_state()
    relaxed_commit(state, 1)
    disk.failing.add(0)
    first, gate = start_first_sync(state, disk)
    with pytest.raises(OSError, match="Input/output error"):
        sync_here(state, disk, gate)
    first.join(GATE_TIMEOUT_S)
    assert isinstance(first.error, OSError) and not first.returned
    assert state.unsynced  # still counted as not on disk
    assert disk.calls == 1  # the waiter did not retry on its own and report success
    state.sync()  # the next call fsyncs again, and succeeds
    assert disk.calls == 2 and disk.log[-1] == ("ok", 1)
    assert not state.unsynced
    assert [m for m, _ in state.outbox()] == [(1).to_bytes(16, "big")]  # nothing lost


def test_failed_fsync_that_did_not_cover_a_caller_is_followed_by_its_own(
    make_state, disk: FakeDisk
) -> None:
    """A caller whose commit came after the failing fsync started runs the next one."""
    state = make_state()
    relaxed_commit(state, 1)
    disk.failing.add(0)
    first, gate = start_first_sync(state, disk)
    disk.mark("commit during fsync 0")
    relaxed_commit(state, 2)
    seen = sync_here(state, disk, gate)  # no exception: fsync 1 succeeded for it
    first.join(GATE_TIMEOUT_S)
    assert isinstance(first.error, OSError)
    assert ("fail", 0) in seen and durable_since(seen, "commit during fsync 0"), seen
    assert not state.unsynced  # fsync 1 covered commit 1 as well


def test_durable_commit_makes_everything_synced(make_state, disk: FakeDisk) -> None:
    state = make_state()
    relaxed_commit(state, 1)
    assert state.unsynced
    state.commit_sent("bob", b"record", bytes(16), b"envelope", 1)  # durable: syncs the WAL
    assert not state.unsynced and disk.calls == 1  # the commit's own fdatasync
    state.sync()
    assert disk.calls == 1


def test_a_full_transaction_that_writes_nothing_does_not_count_as_a_sync(
    make_state, disk: FakeDisk
) -> None:
    """SQLite syncs nothing for a commit without changes, so it cannot make earlier
    relaxed commits durable."""
    state = make_state()
    relaxed_commit(state, 1)
    assert state.forget_seen_before(0) == 0  # a FULL transaction that deletes no row
    assert state.unsynced
    state.sync()
    assert disk.calls == 1 and not state.unsynced
