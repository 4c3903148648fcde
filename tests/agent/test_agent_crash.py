"""kill -9 a receiving agent at random points: no message lost, none handled twice
(except the one whose handler was running), and the conversation goes on."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentkit import Inbox

from agentmesh import Agent, LocalHub

HELPER = Path(__file__).with_name("_receiver_proc.py")
N = 200
KILLS = 6
SEED = 20240607
DEADLINE_S = 60  # generous safety net against hangs; not a performance assertion


def _complete_lines(log: Path) -> list[str]:
    if not log.exists():
        return []
    text = log.read_text(encoding="utf-8")
    lines = text.split("\n")
    return lines[:-1]  # the part after the last newline is empty (or still being written)


@pytest.mark.timeout(180)
def test_receiver_killed_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    db = str(tmp_path / "hub.sqlite")
    bob_key = tmp_path / "bob.json"
    log = tmp_path / "bob.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    starts = 0

    def start(wait_ready: bool = False) -> subprocess.Popen[str]:
        nonlocal starts
        starts += 1
        err = open(tmp_path / f"bob-{starts}.err", "w")
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), db, str(bob_key), str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if wait_ready else subprocess.DEVNULL,
            stderr=err,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        err.close()
        if wait_ready:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            proc.stdout.close()
            assert line.strip() == "ready", (tmp_path / f"bob-{starts}.err").read_text()
        return proc

    def stderr_of_last() -> str:
        return (tmp_path / f"bob-{starts}.err").read_text()

    hub = LocalHub(db=db)
    alice = Agent("alice", hub=hub, keypair_path=tmp_path / "alice.json")
    replies = Inbox()
    alice.on_message(replies)

    proc = start(wait_ready=True)  # bob exists on the hub (and has published his keys)
    sent = 0

    def send_up_to(count: int) -> None:
        nonlocal sent
        while sent < count:
            alice.send("bob", f"{sent:03d}", n=sent)
            sent += 1

    kill_points = sorted(rng.sample(range(3, N - 3), KILLS))
    try:
        for point in kill_points:
            send_up_to(min(N, point + rng.randint(1, 40)))
            deadline = time.monotonic() + DEADLINE_S
            while len(_complete_lines(log)) < point:
                assert proc.poll() is None, f"bob exited early: {stderr_of_last()}"
                assert time.monotonic() < deadline, "bob made no progress"
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.01))  # land somewhere inside receive/handle/ack
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=DEADLINE_S) == -signal.SIGKILL
            proc = start()
        send_up_to(N)
        alice.send("bob", "stop")
        rc = proc.wait(timeout=DEADLINE_S)
        assert rc == 0, stderr_of_last()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    lines = _complete_lines(log)
    assert log.read_text(encoding="utf-8").endswith("\n")  # no torn line
    numbers = [int(line) for line in lines]

    # Every message arrived...
    assert set(numbers) == set(range(N))
    # ...in order; a repeat can only be the message whose handler was interrupted,
    # handled again right after the restart...
    collapsed = [n for i, n in enumerate(numbers) if i == 0 or numbers[i - 1] != n]
    assert collapsed == list(range(N))
    # ...and there is at most one such repeat per kill.
    assert len(numbers) - N <= KILLS
    assert max(numbers.count(n) for n in range(N)) <= 1 + KILLS

    # bob replied after his last restart, and alice got it through the shared database.
    hub.register(alice)
    assert replies.texts == ["bye"]
    assert [m.sender for m in replies] == ["bob"]
    assert hub.queued_count() == 0

    # The state on disk is consistent: bob (now in this process) carries on.
    bob = Agent("bob", hub=hub, keypair_path=bob_key)
    inbox = Inbox()
    bob.on_message(inbox)
    assert inbox == []  # nothing left over
    alice.send("bob", "after the storm")
    assert inbox.texts == ["after the storm"]
    bob.send("alice", "all good")
    assert replies.texts == ["bye", "all good"]
    bob.close()
    alice.close()
    hub.close()
