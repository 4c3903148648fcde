"""Power cuts on a LocalHub fleet, whose receipts commit without an fsync (issue 15).

With LocalHub a ``send()`` returns after the recipient's handlers ran, so the
recipient commits without waiting for the disk (``Agent._receive_and_handle``): a
power cut can then lose its record of messages it already handled, rolling its
receiving chains back. What must still hold, checked here with real kills of a
subprocess (alice and bob on one in-memory LocalHub, bob answering every fifth
message) and the state files brought back to their last durable image each time
(``AgentState._durable_image``, as tests/reliability/test_power_cut.py does):

* every message whose ``send()`` returned was handled (before it returned);
* the sessions survive every cut in both directions: after each restart all of
  the next round's messages and replies are handled, none refused (a rolled-back
  receiving chain is skipped forward by the sender's next message);
* no two different messages were ever sealed under the same (ratchet key, counter).

A message handled before a cut may be handled again after it (its sender's outbox
row outlived the removal): at least once, as the docs promise after power loss.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from agentkit import restore_durable_image

from agentmesh.state import state_path_for

ROOT = Path(__file__).resolve().parents[2]
FLEET = Path(__file__).with_name("_power_cut_localhub.py")
ROUNDS = 5
PER_ROUND = 150


def _cut_power(directory: Path, images: Path) -> None:
    """Replace both agents' state files with their last durable images."""
    for name in ("alice", "bob"):
        restore_durable_image(images, state_path_for(directory / f"{name}.json"))
    shutil.rmtree(images)


def _run(directory: Path, images: Path, name: str, kill_after: int | None) -> tuple[list[str], str]:
    """One round; killed (SIGKILL) after ``kill_after`` acknowledgements, or left to
    finish. Returns its output lines and its stderr."""
    proc = subprocess.Popen(
        [sys.executable, str(FLEET), str(directory), str(images), name, str(PER_ROUND)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    acked = 0
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith("acked "):
            acked += 1
            if kill_after is not None and acked >= kill_after:
                proc.kill()
                break
    _, stderr = proc.communicate(timeout=60)
    if kill_after is None:
        assert proc.returncode == 0, stderr
    return lines, stderr


def test_power_cuts_on_a_localhub_lose_nothing_acknowledged_and_break_no_session(
    tmp_path: Path,
) -> None:
    seed = random.randrange(1 << 30)
    print(f"power-cut seed {seed}")
    rng = random.Random(seed)
    directory = tmp_path / "fleet"
    directory.mkdir()
    images = tmp_path / "images"
    acked: set[str] = set()
    handled: dict[str, tuple[str, str]] = {}  # message id -> (text, "key counter")
    handled_texts: list[str] = []
    keys: dict[str, str] = {}  # "kind key counter" -> message id
    reused = 0
    final: list[str] = []
    for number in range(ROUNDS):
        kill_after = rng.randrange(1, PER_ROUND) if number < ROUNDS - 1 else None
        lines, stderr = _run(directory, images, f"r{number}", kill_after)
        assert "dropping an envelope" not in stderr, stderr  # nothing refused, ever
        assert "Traceback" not in stderr or kill_after is not None, stderr
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "acked":
                acked.add(rest)
            elif kind in ("handled", "reply"):
                text, message_id, key, counter = rest.split(" ")
                slot = f"{kind} {key} {counter}"
                if keys.setdefault(slot, message_id) != message_id:
                    reused += 1
                handled[message_id] = (text, slot)
                if kind == "handled":
                    handled_texts.append(text)
                if kill_after is None:
                    final.append(text)
        if kill_after is not None:
            _cut_power(directory, images)
    missing = acked - set(handled_texts)
    last = [f"r{ROUNDS - 1}-{i}" for i in range(PER_ROUND)]
    replies = [f"re:{t}" for t in last if int(t.rsplit("-", 1)[1]) % 5 == 0]
    print(
        f"power cuts {ROUNDS - 1}, acknowledged {len(acked)}, handled {len(handled_texts)}, "
        f"missing {len(missing)}, handled again {len(handled_texts) - len(set(handled_texts))}, "
        f"reused keys {reused}"
    )
    assert not missing
    assert reused == 0
    assert set(last) <= set(final) and set(replies) <= set(final)
