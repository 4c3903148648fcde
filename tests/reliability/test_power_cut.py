"""Power cuts on the sender: no message key is ever used twice, nothing acked is lost.

Sends commit without waiting for the disk below a *reservation* of sending
counters that is itself durable (docs/PERFORMANCE.md, "Reserved counters"); after an
unclean restart the sender jumps past it. This test cuts the power for real, as far
as a test can: alice runs in a subprocess, records an image of her state file at
every durable point (a FULL commit or a completed fsync, ``AgentState._durable_image``),
and is killed with SIGKILL at a random moment; then her files are replaced by the last
image, which is exactly what the disk would hold after a power cut (everything after
the last fsync discarded), and she starts again. Bob and the hub keep running.

Checked over every round: every message whose acknowledgement alice printed reaches
bob's handler exactly once (the hub committed it; a reused counter would make bob
refuse it as a replay, and it would be lost), and the ratchet headers of all messages
bob handled are unique per (chain, counter). With the jump disabled
(``AGENTMESH_TEST_NO_JUMP=1`` in the sender) the same run loses messages to
``ReplayError``: see docs/PERFORMANCE.md for that run.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from agentkit import restore_durable_image
from hubproc import ROOT, HubProcess, wait_until

from agentmesh import Agent
from agentmesh.wire.envelope import decode_envelope

SENDER = Path(__file__).with_name("_power_cut_sender.py")
ROUNDS = 6
PER_ROUND = 400


def _cut_power(alice_dir: Path, images: Path) -> None:
    """Replace alice's state files with the last durable image."""
    restore_durable_image(images, alice_dir / "alice.state.sqlite")
    shutil.rmtree(images)


def _run_sender(
    port: int, alice_dir: Path, images: Path, name: str, kill_after: int | None
) -> tuple[list[str], str]:
    """Run alice for one round; kill her after ``kill_after`` acknowledgements (None:
    let her finish). Returns the acknowledged texts and her stderr."""
    keyfile = str(alice_dir / "alice.json")
    proc = subprocess.Popen(
        [sys.executable, str(SENDER), str(port), keyfile, str(images), name, str(PER_ROUND)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    acked: list[str] = []
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    for line in proc.stdout:
        if line.startswith("acked "):
            acked.append(line.split(" ", 1)[1].strip())
            if kill_after is not None and len(acked) >= kill_after:
                proc.kill()
                break
    proc.wait(60)
    reader.join(10)
    if kill_after is None:
        assert proc.returncode == 0, errors
    return acked, "".join(errors)


def test_power_cuts_never_reuse_a_message_key(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    print(f"power-cut seed {seed}")
    rng = random.Random(seed)
    hub = HubProcess(tmp_path / "hub").start()
    alice_dir = tmp_path / "alice"
    alice_dir.mkdir()
    images = tmp_path / "images"
    handled: list[tuple[str, bytes, int, str]] = []
    lock = threading.Lock()
    bob = Agent("bob", hub=hub.client(), keypair_path=tmp_path / "bob" / "bob.json")

    @bob.on_message
    def record(msg: object) -> None:
        envelope = decode_envelope(msg.raw_envelope)  # type: ignore[attr-defined]
        with lock:
            handled.append(
                (msg.text, envelope.ratchet.dh, envelope.ratchet.n, msg.message_id)  # type: ignore[attr-defined]
            )

    try:
        acked: list[str] = []
        cuts = 0
        for number in range(ROUNDS):
            kill_after = rng.randrange(1, PER_ROUND) if number < ROUNDS - 1 else None
            got, stderr = _run_sender(hub.port, alice_dir, images, f"r{number}", kill_after)
            acked += got
            if kill_after is not None:
                _cut_power(alice_dir, images)
                cuts += 1
            else:
                shutil.rmtree(images, ignore_errors=True)
            assert "Traceback" not in stderr or kill_after is not None, stderr
        with contextlib.suppress(AssertionError):  # counted and reported below either way
            wait_until(lambda: {t for t, *_ in handled} >= set(acked), 60)
        time.sleep(0.5)  # let stragglers (resent outbox rows) arrive before counting
        with lock:
            texts = [t for t, *_ in handled]
            headers = [(dh, n) for _, dh, n, _ in handled]
        missing = set(acked) - set(texts)
        duplicates = len(texts) - len(set(texts))
        reused = len(headers) - len(set(headers))
        print(
            f"power cuts {cuts}, acknowledged {len(acked)}, handled {len(texts)}, "
            f"missing {len(missing)}, handled twice {duplicates}, reused keys {reused}"
        )
        assert not missing
        assert duplicates == 0
        assert reused == 0
        assert hub.queued_for("bob") == 0  # nothing refused and left behind
    finally:
        bob.close()
        hub.stop()


def test_the_image_is_what_the_last_fsync_covered(tmp_path: Path) -> None:
    """The test's model of a power cut: an image is taken at FULL commits and completed
    syncs, never at a relaxed commit, so relaxed commits after it are discarded."""
    from agentmesh.state import AgentState

    images = tmp_path / "images"
    name = "alice.state.sqlite"
    AgentState._durable_image = images
    try:
        state = AgentState(tmp_path / name, scrub_interval_s=3600)
        state.set_meta("durable", b"1")  # FULL commit: imaged
        state.commit_sent("bob", b"r", b"\x01" * 16, b"e", 1, durable=False)  # relaxed
        first = (images / name / "CURRENT").read_text()
        state.sync()  # covers the relaxed commit: imaged
        second = (images / name / "CURRENT").read_text()
        state.close()
    finally:
        AgentState._durable_image = None
    assert first != second
    for folder, outbox in ((first, 0), (second, 1)):
        copy = tmp_path / f"copy-{folder}"
        copy.mkdir()
        for part in (images / name / folder).iterdir():
            shutil.copyfile(part, copy / part.name)
        restored = AgentState(copy / name)
        assert restored.get_meta("durable") == b"1"
        assert restored.outbox_size() == outbox
        restored.close()
