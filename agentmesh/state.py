"""The agent's own durable state, in a SQLite file next to its key file.

``alice.json`` → ``alice.state.sqlite`` (and ``alice.state.lock``). It holds
ratchet sessions (active and archived, per peer), prekey private keys, pinned
peer identities, the replay window of seen message ids, the **outbox** of
envelopes the hub has not acknowledged, and the **inbox** of decrypted
messages whose handlers have not finished.

Each method that changes several things does so in ONE transaction, so after
a crash (even ``kill -9``) the state is either before or after the change.
SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when
the method returns.

This module is the agent side's only SQL. It uses the standard library's
``sqlite3`` rather than SQLAlchemy: the file is always local SQLite, private
to one process (see :class:`StateLock`), and sits on the per-message hot path.
Without a key file the same schema lives in an in-memory database.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from agentmesh.errors import StateLockedError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (peer_id TEXT PRIMARY KEY, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    identity BLOB NOT NULL,
    pending_identity BLOB,
    first_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (message_id BLOB PRIMARY KEY, seen_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS seen_by_time ON seen (seen_ms);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id BLOB NOT NULL UNIQUE,
    recipient TEXT NOT NULL,
    envelope BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id BLOB NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    payload BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    signature BLOB
);
"""
SCHEMA_VERSION = b"1"
_PIN_SQL = "INSERT OR IGNORE INTO peers (peer_id, identity, first_seen_ms) VALUES (?, ?, ?)"


def _write_session(
    db: sqlite3.Connection, peer_id: str, record: bytes, pin_identity: bytes | None, now_ms: int
) -> None:
    """Inside a transaction: store a peer's session record, pinning its identity if new."""
    if pin_identity is not None:
        db.execute(_PIN_SQL, (peer_id, pin_identity, now_ms))
    db.execute("INSERT OR REPLACE INTO sessions (peer_id, record) VALUES (?, ?)", (peer_id, record))


def state_path_for(keypair_path: str | os.PathLike[str]) -> Path:
    """``alice.json`` → ``alice.state.sqlite`` beside it."""
    path = Path(keypair_path)
    return path.with_name(path.stem + ".state.sqlite")


class StateLock:
    """An exclusive ``flock`` on ``<state>.lock``: one process (and one Agent) per identity."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StateLockedError naming the file."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StateLockedError(
                f"another process (or Agent) already uses this identity: {self.path} is locked"
            ) from exc
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@dataclass(frozen=True, slots=True)
class InboxRow:
    seq: int
    message_id: bytes
    sender: str
    payload: bytes
    timestamp_ms: int
    signature: bytes | None


class AgentState:
    """Durable (or in-memory) agent state. Thread-safe: one internal lock."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        target = str(path) if path is not None else ":memory:"
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        if path is not None:
            os.chmod(path, 0o600)  # WAL and SHM files inherit the database file's mode
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (SCHEMA_VERSION,),
        )

    # -- transactions -----------------------------------------------------

    class _Tx:
        def __init__(self, state: AgentState) -> None:
            self.state = state

        def __enter__(self) -> sqlite3.Connection:
            self.state._lock.acquire()
            self.state._db.execute("BEGIN IMMEDIATE")
            return self.state._db

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            try:
                self.state._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.state._lock.release()

    def _tx(self) -> AgentState._Tx:
        return AgentState._Tx(self)

    def _one(self, sql: str, args: tuple[object, ...] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta (prekeys) ---------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- sessions and peers -----------------------------------------------

    def session_record(self, peer_id: str) -> bytes | None:
        row = self._one("SELECT record FROM sessions WHERE peer_id = ?", (peer_id,))
        return None if row is None else bytes(row[0])

    def session_peers(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT peer_id FROM sessions ORDER BY peer_id")]

    def save_session(self, peer_id: str, record: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO sessions (peer_id, record) VALUES (?, ?)", (peer_id, record)
            )

    def pinned_identity(self, peer_id: str) -> tuple[bytes, bytes | None] | None:
        """``(pinned identity, pending new identity or None)`` for a peer, or None."""
        row = self._one(
            "SELECT identity, pending_identity FROM peers WHERE peer_id = ?", (peer_id,)
        )
        if row is None:
            return None
        pending = row[1]
        return bytes(row[0]), None if pending is None else bytes(pending)

    def known_peers(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT peer_id FROM peers ORDER BY peer_id")]

    def pin(self, peer_id: str, identity: bytes, now_ms: int) -> None:
        with self._tx() as db:
            db.execute(_PIN_SQL, (peer_id, identity, now_ms))

    def set_pending_identity(self, peer_id: str, identity: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE peers SET pending_identity = ? WHERE peer_id = ?", (identity, peer_id)
            )

    def repin(self, peer_id: str, identity: bytes, now_ms: int) -> None:
        """Trust a new identity for ``peer_id``: replace the pin and drop its old sessions."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO peers (peer_id, identity, pending_identity, first_seen_ms) "
                "VALUES (?, ?, NULL, ?)",
                (peer_id, identity, now_ms),
            )
            db.execute("DELETE FROM sessions WHERE peer_id = ?", (peer_id,))

    # -- send path --------------------------------------------------------

    def commit_sent(
        self,
        peer_id: str,
        record: bytes,
        message_id: bytes,
        envelope: bytes,
        now_ms: int,
        *,
        pin_identity: bytes | None = None,
    ) -> None:
        """Send order step 2: the new session state and the outbox row, in one transaction."""
        with self._tx() as db:
            _write_session(db, peer_id, record, pin_identity, now_ms)
            db.execute(
                "INSERT INTO outbox (message_id, recipient, envelope, created_ms) "
                "VALUES (?, ?, ?, ?)",
                (message_id, peer_id, envelope, now_ms),
            )

    def outbox(self) -> list[tuple[bytes, bytes]]:
        """Unacknowledged ``(message_id, envelope)`` pairs, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT message_id, envelope FROM outbox ORDER BY seq"
            ).fetchall()
        return [(bytes(m), bytes(e)) for m, e in rows]

    def outbox_size(self) -> int:
        row = self._one("SELECT COUNT(*) FROM outbox")
        return int(row[0]) if row else 0

    def remove_from_outbox(self, message_id: bytes) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM outbox WHERE message_id = ?", (message_id,))

    # -- receive path -----------------------------------------------------

    def seen(self, message_id: bytes) -> bool:
        return self._one("SELECT 1 FROM seen WHERE message_id = ?", (message_id,)) is not None

    def commit_received(
        self,
        peer_id: str,
        record: bytes,
        prekeys: bytes | None,
        message_id: bytes,
        payload: bytes,
        timestamp_ms: int,
        signature: bytes | None,
        now_ms: int,
        *,
        pin_identity: bytes | None = None,
    ) -> None:
        """Receive order step 2: session, replay record and inbox row in one transaction."""
        with self._tx() as db:
            _write_session(db, peer_id, record, pin_identity, now_ms)
            if prekeys is not None:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('prekeys', ?)", (prekeys,)
                )
            db.execute("INSERT INTO seen (message_id, seen_ms) VALUES (?, ?)", (message_id, now_ms))
            db.execute(
                "INSERT INTO inbox (message_id, sender, payload, timestamp_ms, signature) "
                "VALUES (?, ?, ?, ?, ?)",
                (message_id, peer_id, payload, timestamp_ms, signature),
            )

    def unhandled(self, limit: int = 1000) -> list[InboxRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, message_id, sender, payload, timestamp_ms, signature FROM inbox "
                "ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            InboxRow(s, bytes(m), snd, bytes(pl), ts, None if sig is None else bytes(sig))
            for s, m, snd, pl, ts, sig in rows
        ]

    def mark_handled(self, seq: int) -> None:
        """Receive order step 5: a handled row is deleted, so no handled plaintext stays at rest."""
        with self._tx() as db:
            db.execute("DELETE FROM inbox WHERE seq = ?", (seq,))

    def inbox_pending(self) -> int:
        row = self._one("SELECT COUNT(*) FROM inbox")
        return int(row[0]) if row else 0

    def forget_seen_before(self, cutoff_ms: int) -> int:
        """Trim the replay window (ids older than ``cutoff_ms``)."""
        with self._tx() as db:
            return db.execute("DELETE FROM seen WHERE seen_ms < ?", (cutoff_ms,)).rowcount
