"""The hub's database in trouble: a full disk, a locked file, a read-only file system.

In each case a real hub process serves real agents: alice sends to bob (who
is offline, so everything stays queued on the hub), the fault starts, alice's
sends are refused with an error that names the cause (``send()`` raises; no
SEND_ACK), the hub stays up, the fault is cleared, and bob then receives every
message the hub acknowledged, exactly once. The refused ones are still in
alice's outbox: the hub closes the connection of a SEND it could not store,
alice logs in again by herself once the fault cleared and re-sends them before
anything newer, so nothing at all is lost and bob gets everything in order.

Full disk: an 8 MiB tmpfs holds the database and a filler file takes the rest.
Locked: another process holds ``BEGIN EXCLUSIVE`` on the database.
Read-only: the database sits on an ext4 loop device mounted
``errors=remount-ro``; ``trigger_fs_error`` makes the kernel refuse every
write under the running hub (what a failing disk does). After ``e2fsck``, a
hub started on a read-only (bind) mount of it refuses to start (exit status 2,
"read-only"); on the read-write mount it delivers everything.

The full-disk and read-only tests mount file systems, so they need root and
skip elsewhere; the locked-database test runs everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hubproc import HubProcess, wait_until

from agentmesh import Agent, Message
from agentmesh.errors import HubError

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting needs root"
)
BEFORE = 20  # acknowledged before the fault
MAX_TRIES = 400  # sends during the fault, until the first refusal (bounded)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))


@contextmanager
def ext4_loop(image: Path, path: Path, size_mb: int = 32) -> Iterator[str]:
    """An ext4 file system in ``image`` mounted on ``path`` with errors=remount-ro;
    yields the loop device's name (``loop3``)."""
    if shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None:
        pytest.skip("e2fsprogs are not installed")
    path.mkdir()
    with image.open("wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    assert _run("mkfs.ext4", "-q", "-F", str(image)).returncode == 0
    done = _run("mount", "-o", "loop,errors=remount-ro", str(image), str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a loop device: {done.stderr.strip()}")
    device = _run("findmnt", "-n", "-o", "SOURCE", str(path)).stdout.strip()
    try:
        yield os.path.basename(device)
    finally:
        _run("umount", "-l", str(path))


class Traffic:
    """alice sends numbered messages to bob; bob is offline until :meth:`drain`."""

    def __init__(self, hub: HubProcess, keys: Path) -> None:
        self.hub, self.keys = hub, keys
        self.acked: list[int] = []
        self.refused: list[int] = []
        #: send() returned with the envelope in the outbox: after a refusal the hub
        #: closed alice's connection, and she is logging in again (or cannot yet).
        self.kept: list[int] = []
        self.errors: list[str] = []
        self._next = 0
        first = hub.client()
        Agent("bob", hub=first, keypair_path=keys / "bob.json").close()  # bind bob
        first.close()
        self.alice_hub = hub.client(ack_timeout=20.0)
        self.alice = Agent("alice", hub=self.alice_hub, keypair_path=keys / "alice.json")

    def send(self) -> bool:
        """Send one message; True if the hub acknowledged it."""
        n, self._next = self._next, self._next + 1
        before = self.alice.status()["outbox"]
        try:
            self.alice.send("bob", f"m{n}", n=n)
        except HubError as exc:
            self.refused.append(n)
            self.errors.append(str(exc))
            return False
        if self.alice.status()["outbox"] != before:
            assert self.refused, "send() returned without an ack"
            self.kept.append(n)
            return False
        self.acked.append(n)
        return True

    def resent(self) -> None:
        """The fault cleared: wait until alice logged in again and her outbox (the
        refused and kept messages) was taken, before anything newer is sent."""
        wait_until(lambda: self.alice.status()["outbox"] == 0, 30)

    def send_until_refused(self) -> None:
        for _ in range(MAX_TRIES):
            if not self.send():
                return
        raise AssertionError(f"the hub acknowledged {MAX_TRIES} sends during the fault")

    def drain(self) -> list[int]:
        """bob comes back: every message arrives, the refused ones included (alice
        re-sent them when she logged in again), in the order alice sent them;
        returns what bob got."""
        got: list[int] = []
        bob_hub = self.hub.client()
        bob = Agent("bob", hub=bob_hub, keypair_path=self.keys / "bob.json")

        def handle(msg: Message) -> None:
            got.append(int(msg.payload["n"]))

        bob.on_message(handle)
        try:
            wait_until(lambda: set(self.acked + self.refused + self.kept) <= set(got), 60)
            wait_until(lambda: self.alice.status()["outbox"] == 0, 30)
        finally:
            bob.close()
            bob_hub.close()
            self.alice.close()
            self.alice_hub.close()
        assert len(got) == len(set(got)), "a message was handled twice"
        # A refused message is not overtaken: the hub closes the connection of a
        # SEND it could not store, and alice re-sends her outbox before anything newer.
        assert got == sorted(got), "a message arrived after a later one"
        return got


@needs_root
def test_full_disk_refuses_sends_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "8m") as disk:
        hub = HubProcess(tmp_path, db=None)
        hub.args += ["--db", str(disk / "hub.sqlite")]
        hub.start()
        try:
            traffic = Traffic(hub, tmp_path)
            for _ in range(BEFORE):
                assert traffic.send()
            filler = disk / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while True:
                    os.write(fd, bytes(4096))
            except OSError:
                pass  # ENOSPC: the disk is full
            finally:
                os.close(fd)
            traffic.send_until_refused()
            assert "disk is full" in traffic.errors[0], traffic.errors[0]
            assert not traffic.send()  # still refused, and the hub is still up
            assert hub.proc is not None and hub.proc.poll() is None
            filler.unlink()
            traffic.resent()
            assert traffic.send()  # the condition cleared: new work is accepted again
            got = traffic.drain()
        finally:
            hub.stop()
    print(
        f"\nfull disk: {len(traffic.acked)} acknowledged, {len(traffic.refused)} refused "
        f"({traffic.errors[0]!r}), {len(got)} delivered"
    )


def test_locked_database_refuses_sends_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path)
    hub.start()
    locker: subprocess.Popen[str] | None = None
    try:
        traffic = Traffic(hub, tmp_path)
        for _ in range(BEFORE):
            assert traffic.send()
        locker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys\n"
                "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "db.execute('BEGIN EXCLUSIVE')\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n",
                str(hub.db),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        assert not traffic.send()  # refused once the hub's busy timeout (5 s) ran out
        assert "locked" in traffic.errors[0], traffic.errors[0]
        assert hub.proc is not None and hub.proc.poll() is None
        assert locker.stdin is not None
        locker.stdin.close()
        assert locker.wait(10) == 0
        locker = None
        traffic.resent()
        assert traffic.send()
        got = traffic.drain()
    finally:
        if locker is not None:
            locker.kill()
            locker.wait(10)
        hub.stop()
    print(f"\nlocked: {len(traffic.acked)} acked, {traffic.errors[0]!r}, {len(got)} delivered")


def _writable(folder: Path) -> bool:
    try:
        (folder / "probe").write_bytes(b"x")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@needs_root
def test_read_only_file_system_refuses_sends_and_start(tmp_path: Path) -> None:
    image, disk, view = tmp_path / "fs.img", tmp_path / "disk", tmp_path / "view"
    with ext4_loop(image, disk) as device:
        trigger = Path("/sys/fs/ext4") / device / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip("this kernel has no ext4 trigger_fs_error")
        hub = HubProcess(tmp_path, db=None)
        hub.args += ["--db", str(disk / "hub.sqlite")]
        hub.start()
        try:
            traffic = Traffic(hub, tmp_path)
            for _ in range(BEFORE):
                assert traffic.send()
            trigger.write_text("agentmesh reliability test\n")  # the kernel stops all writes
            wait_until(lambda: not _writable(disk), 10)
            assert not traffic.send()
            assert "read-only" in traffic.errors[0], traffic.errors[0]
            assert hub.proc is not None and hub.proc.poll() is None
        finally:
            hub.kill()
    # Check the file system and mount it again; show it to a hub read-only first.
    assert _run("e2fsck", "-fy", str(image)).returncode in (0, 1)
    done = _run("mount", "-o", "loop", str(image), str(disk))
    assert done.returncode == 0, done.stderr
    try:
        view.mkdir()
        assert _run("mount", "--bind", str(disk), str(view)).returncode == 0
        assert _run("mount", "-o", "remount,bind,ro", str(view)).returncode == 0
        ro_hub = HubProcess(tmp_path, db=None)
        ro_hub.args += ["--db", str(view / "hub.sqlite")]
        ro_hub.port = hub.port
        # A hub started on a read-only database refuses to start, and says why.
        with pytest.raises(AssertionError, match="hub did not start"):
            ro_hub.start()
            ro_hub.stop()  # it started: the test fails
        assert ro_hub.proc is not None and ro_hub.proc.wait(10) == 2
        assert "is read-only" in ro_hub.log(), ro_hub.log()[-2000:]
        _run("umount", str(view))
        hub.start()  # the condition cleared
        traffic.resent()  # alice reconnects by herself and re-sends her outbox
        assert traffic.send()
        got = traffic.drain()
    finally:
        hub.stop()
        _run("umount", "-l", str(view))
        _run("umount", "-l", str(disk))
    print(f"\nread-only: {len(traffic.acked)} acked, {traffic.errors[0]!r}, {len(got)} delivered")
