"""Plumbing shared by the benchmark's orchestrator (``bench.run``) and its workers.

Every scenario runs its parties as separate processes (``python -m bench.worker
ROLE ...``, ``python -m bench.hubproc ...``, ``python -m bench.peers ROLE ...``).
They talk to the orchestrator in lines: the orchestrator writes commands
(``GO``, ``STOP``) to a worker's stdin, the worker prints ``WORD {json}`` lines
(``READY``, ``RESULT``) on stdout. Timestamps are ``time.monotonic()``, which on
Linux is ``CLOCK_MONOTONIC``: one clock for every process on the machine, so a
sender's "first send" and a receiver's "last handled" can be subtracted.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

#: The checkout holding ``bench/`` (and the ``agentmesh/`` the workers import).
ROOT = Path(__file__).resolve().parents[1]
#: Bytes of message text in every scenario (the issue's "200-byte text payloads").
PAYLOAD_SIZE = 200


def now() -> float:
    """Seconds on the machine-wide monotonic clock (comparable across processes)."""
    return time.monotonic()


def text_payload(prefix: str = "") -> str:
    """``prefix`` padded with ``x`` to exactly :data:`PAYLOAD_SIZE` characters."""
    if len(prefix) > PAYLOAD_SIZE:
        raise ValueError("prefix longer than the payload")
    return prefix + "x" * (PAYLOAD_SIZE - len(prefix))


def stamped_text(seq: int) -> str:
    """A payload carrying its sequence number and the send-call time (ns)."""
    return text_payload(f"{seq:09d} {time.monotonic_ns():020d} ")


def parse_stamp(text: str) -> tuple[int, int] | None:
    """``(seq, send_ns)`` of a :func:`stamped_text` payload, or None."""
    parts = text.split(" ", 2)
    if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1])


def raise_fd_limit(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, nearest rank."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when every value is equal, 1/n when one takes all."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` from /proc (0 if unavailable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """``(user, system)`` CPU seconds of ``pid`` so far, from /proc (zeros if unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks  # utime, stime


def child_env() -> dict[str, str]:
    """The environment of every worker: this checkout first on the import path."""
    env = dict(os.environ)
    previous = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + previous if previous else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- worker side ---------------------------------------------------------------------------------


def emit(word: str, **data: Any) -> None:
    """Worker: report ``WORD {json}`` to the orchestrator."""
    sys.stdout.write(f"{word} {json.dumps(data)}\n")
    sys.stdout.flush()


def run_role(role: Callable[[], None]) -> int:
    """Worker ``main``: run ``role``; a failure prints a traceback and ``ERROR {json}``: 1."""
    try:
        role()
    except Exception as exc:
        traceback.print_exc()
        emit("ERROR", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def wait_command(expected: str | None = None) -> str:
    """Worker: block until the orchestrator writes a line (``GO``, ``STOP``); return it."""
    while True:
        line = sys.stdin.readline()
        if not line:
            return "STOP"  # orchestrator gone
        word = line.strip()
        if expected is None or word == expected or word == "STOP":
            return word


# --- orchestrator side ---------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker died, timed out or reported an error."""


class Proc:
    """One worker process; see the module docstring for the line protocol."""

    def __init__(self, module: str, args: Sequence[str], name: str, log_dir: Path) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.err"
        self._stderr: IO[str] = open(self.stderr_path, "w", encoding="utf-8")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=child_env(),
            cwd=log_dir,
        )
        self.pid = self.popen.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._spy: subprocess.Popen[bytes] | None = None

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def send(self, command: str) -> None:
        stdin = self.popen.stdin
        if stdin is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(OSError):
            stdin.write(command + "\n")
            stdin.flush()

    def expect(self, word: str, timeout: float) -> dict[str, Any]:
        """Wait for the worker's ``word`` line; return its JSON. Raises WorkerError."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{self.name}: no {word} within {timeout:.0f}s\n{self.tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait()
                raise WorkerError(
                    f"{self.name}: exited ({self.popen.returncode}) before {word}\n{self.tail()}"
                )
            head, _, rest = line.partition(" ")
            if head == "ERROR":
                raise WorkerError(f"{self.name}: {rest}\n{self.tail()}")
            if head == word:
                data: dict[str, Any] = json.loads(rest) if rest else {}
                return data

    def profile(self, path: Path) -> None:
        """Attach py-spy (if installed) until this process ends or :meth:`stop_profile`."""
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            return
        self._spy = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(path),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_profile(self) -> None:
        spy, self._spy = self._spy, None
        if spy is not None and spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.wait()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def close(self, timeout: float = 20.0) -> None:
        """Ask the worker to stop (STOP, then SIGTERM, then SIGKILL) and reap it."""
        self.send("STOP")
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.stop_profile()
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        self._stderr.close()


class HubProc(Proc):
    """The hub under test (``python -m bench.hubproc``) on a fresh database."""

    def __init__(
        self, log_dir: Path, name: str = "hub", *extra: str, db: str | None = None
    ) -> None:
        """``db``: a database URL (several hubs on one PostgreSQL); default a new SQLite file."""
        self.db = db or str(log_dir / f"{name}.sqlite")
        super().__init__("bench.hubproc", ["--db", self.db, *extra], name, log_dir)
        ready = self.expect("READY", 60)
        self.port = int(ready["port"])

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def close(self, timeout: float = 30.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        super().close(timeout)


def summarize_profile(path: Path, top: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive time per function (percent of samples) from a py-spy raw file."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {"self": [], "inclusive": []}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(100.0 * c / total, 1)) for name, c in best] if total else []

    return {"self": ranked(self_counts), "inclusive": ranked(incl_counts)}


def _short_frame(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file_part = where.rsplit(":", 1)[0]
    for marker in ("/agentmesh/", "/bench/", "/site-packages/", "/lib/python3"):
        if marker in file_part:
            file_part = file_part.split(marker, 1)[1]
            break
    return f"{name} ({file_part})"
