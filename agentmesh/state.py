"""The agent's own durable state, in a SQLite file next to its key file.

``alice.json`` → ``alice.state.sqlite`` (and ``alice.state.lock``). It holds
ratchet sessions (active and archived, per peer), prekey private keys, pinned
peer identities, the replay window of seen message ids, the **outbox** of
envelopes the hub has not acknowledged, and the **inbox** of decrypted
messages whose handlers have not finished.

Each method that changes several things does so in ONE transaction, so after
a crash (even ``kill -9``) the state is either before or after the change.
SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when
the method returns. Three exceptions, each safe against a process crash and
documented where it happens: ``commit_sent(durable=False)`` (pipelined sends:
on disk after the next :meth:`AgentState.sync`, which runs before the
envelope is transmitted), the hub's acknowledgements (outbox rows deleted with
the next write), and handled inbox rows (logged in ``<file>-handled``, deleted
with the next page). None of them can lose a message; a power failure can at
worst resend one or run a handler again.

This module is the agent side's only SQL. It uses the standard library's
``sqlite3`` rather than SQLAlchemy: the file is always local SQLite, private
to one process (see :class:`StateLock`), and sits on the per-message hot path.
Without a key file the same schema lives in an in-memory database.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from agentmesh.errors import DecodeError, StateLockedError

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
_DELETE_OUTBOX_SQL = "DELETE FROM outbox WHERE message_id = ?"
#: An upsert rewrites the record in place (OR REPLACE would also rewrite the key's index).
_SAVE_SESSION_SQL = (
    "INSERT INTO sessions (peer_id, record) VALUES (?, ?) "
    "ON CONFLICT (peer_id) DO UPDATE SET record = excluded.record"
)


_fdatasync = getattr(os, "fdatasync", os.fsync)


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


def _check_database(db: sqlite3.Connection) -> None:
    """Refuse a damaged file at open rather than in the middle of a message: check
    every page (``quick_check``), and that each table has the columns used here,
    holding values of their declared type (text in valid UTF-8)."""
    problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError("; ".join(problems[:3]))
    reference = sqlite3.connect(":memory:")
    try:
        reference.executescript(_SCHEMA)
        tables = reference.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        for (table,) in tables:
            for _, name, kind, notnull, _, _ in reference.execute(f"PRAGMA table_info({table})"):
                types = f"'{kind.lower()}'" + ("" if notnull else ", 'null'")
                wrong = f"SELECT 1 FROM {table} WHERE typeof({name}) NOT IN ({types}) LIMIT 1"  # noqa: S608
                if db.execute(wrong).fetchone() is not None:  # also fails on a missing column
                    raise sqlite3.DatabaseError(f"{table}.{name} holds a value of another type")
                if kind == "TEXT":  # small tables: decoding every value checks the UTF-8
                    db.execute(f"SELECT {name} FROM {table}").fetchall()  # noqa: S608
    finally:
        reference.close()


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
        #: Outbox rows the hub acknowledged, deleted by the next write transaction.
        self._acked: list[bytes] = []
        #: A relaxed commit happened since the last FULL one.
        self._unsynced = False
        #: ``pinned_identity`` answers read so far (None: not pinned). Every write to
        #: the peers table drops its entry first, under the lock, so a cached answer
        #: is never older than the file; the agent's StateLock keeps other processes out.
        self._pins: dict[str, tuple[bytes, bytes | None] | None] = {}
        #: Descriptor of the WAL file, for :meth:`sync`.
        self._wal: int | None = None
        #: Handled inbox rows not deleted yet, and the log recording them (mark_handled).
        self._handled: list[int] = []
        self._handled_fd: int | None = None
        try:
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
            if path is not None:
                _check_database(self._db)
                self._recover_handled()
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            self._db.close()  # an open connection would keep the file locked
            raise DecodeError(
                f"state file {path} is damaged or not an AgentMesh state file ({exc}); "
                "restore it from a backup, or move it away to start afresh"
            ) from exc

    # -- transactions -----------------------------------------------------

    class _Tx:
        def __init__(self, state: AgentState, relaxed: bool = False) -> None:
            self.state = state
            self.relaxed = relaxed and state.path is not None
            self.acked: list[bytes] = []

        def __enter__(self) -> sqlite3.Connection:
            state = self.state
            state._lock.acquire()
            db = state._db
            try:
                if self.relaxed:  # this transaction only; __exit__ restores FULL
                    db.execute("PRAGMA synchronous=NORMAL")
                db.execute("BEGIN IMMEDIATE")
                self.acked, state._acked = state._acked, []
                if self.acked:  # coalesced into this transaction (see defer_outbox_removal)
                    db.executemany(_DELETE_OUTBOX_SQL, [(m,) for m in self.acked])
            except BaseException:
                state._acked[:0] = self.acked
                try:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                finally:
                    if self.relaxed:
                        db.execute("PRAGMA synchronous=FULL")
                    state._lock.release()
                raise
            return db

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            state = self.state
            db = state._db
            try:
                if exc_type is None:
                    db.execute("COMMIT")
                    # A FULL commit syncs the whole WAL: every earlier commit is on disk too.
                    state._unsynced = self.relaxed
                else:
                    state._acked[:0] = self.acked  # not deleted after all: next time
                    # A pin read inside the transaction may be rolled back with it.
                    state._pins.clear()
                    db.execute("ROLLBACK")
            finally:
                try:
                    if self.relaxed:
                        db.execute("PRAGMA synchronous=FULL")
                finally:
                    state._lock.release()

    def _tx(self, *, relaxed: bool = False) -> AgentState._Tx:
        """A write transaction; ``relaxed``: committed without waiting for the disk
        (``synchronous=NORMAL``; see :meth:`commit_sent` and :meth:`sync`)."""
        return AgentState._Tx(self, relaxed)

    @property
    def unsynced(self) -> bool:
        """Whether a relaxed commit may not be on disk yet (:meth:`sync` makes it so)."""
        return self._unsynced

    def sync(self) -> None:
        """Make every commit so far survive power loss (group commit: one fsync for all).

        A no-op unless a relaxed commit happened since the last FULL one. The
        fsync is what a FULL commit does (SQLite WAL: committed frames are
        durable once the WAL file is synced), on the WAL file directly, so it
        does not hold the write lock: commits go on while the disk works, and
        the next call covers them.
        """
        with self._lock:
            if not self._unsynced:
                return
            self._unsynced = False  # commits from now on need the next sync
            wal = self._wal_fd()
            if wal is None:  # no WAL file to sync (never expected): a FULL commit does it
                with self._tx() as db:
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('synced', x'')")
                return
            fd = os.dup(wal)  # close() may close ``wal`` meanwhile
        try:
            _fdatasync(fd)
        except OSError:
            self._unsynced = True
            raise
        finally:
            os.close(fd)

    def _wal_fd(self) -> int | None:
        """A descriptor of this database's WAL file, checked to be the live one (lock held)."""
        if self.path is None:
            return None
        wal = f"{self.path}-wal"
        try:
            live = os.stat(wal).st_ino
        except OSError:
            return None
        if self._wal is not None and os.fstat(self._wal).st_ino != live:
            os.close(self._wal)
            self._wal = None
        if self._wal is None:
            try:
                self._wal = os.open(wal, os.O_RDWR)
            except OSError:
                return None
            if os.fstat(self._wal).st_ino != live:  # replaced in between
                os.close(self._wal)
                self._wal = None
        return self._wal

    def _one(self, sql: str, args: tuple[object, ...] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    def close(self) -> None:
        with self._lock:
            try:
                self._flush_acked()
                self._delete_handled()
                self.sync()
            except (sqlite3.Error, OSError):  # e.g. a full disk: resent or re-deleted later
                pass
            if self._handled_fd is not None:
                os.close(self._handled_fd)
                self._handled_fd = None
                if not self._handled:
                    with contextlib.suppress(OSError):
                        self._handled_log().unlink()
            if self._wal is not None:
                os.close(self._wal)
                self._wal = None
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

    def _write_session(
        self,
        db: sqlite3.Connection,
        peer_id: str,
        record: bytes,
        pin_identity: bytes | None,
        now_ms: int,
    ) -> None:
        """Inside a transaction: store a peer's session record, pinning its identity if new."""
        if pin_identity is not None:
            self._insert_pin(db, peer_id, pin_identity, now_ms)
        db.execute(_SAVE_SESSION_SQL, (peer_id, record))

    def _insert_pin(
        self, db: sqlite3.Connection, peer_id: str, identity: bytes, now_ms: int
    ) -> None:
        """Inside a transaction: pin ``identity`` for a peer not pinned yet (else no-op)."""
        self._pins.pop(peer_id, None)  # the cached answer may be "not pinned"
        db.execute(_PIN_SQL, (peer_id, identity, now_ms))

    def pinned_identity(self, peer_id: str) -> tuple[bytes, bytes | None] | None:
        """``(pinned identity, pending new identity or None)`` for a peer, or None.

        Read once per peer, then answered from memory (every send and every
        received batch asks) until a write to that peer's pin.
        """
        with self._lock:
            if peer_id in self._pins:
                return self._pins[peer_id]
            row = self._one(
                "SELECT identity, pending_identity FROM peers WHERE peer_id = ?", (peer_id,)
            )
            pinned = None
            if row is not None:
                pending = row[1]
                pinned = bytes(row[0]), None if pending is None else bytes(pending)
            self._pins[peer_id] = pinned
            return pinned

    def known_peers(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT peer_id FROM peers ORDER BY peer_id")]

    def pin(self, peer_id: str, identity: bytes, now_ms: int) -> None:
        with self._tx() as db:
            self._insert_pin(db, peer_id, identity, now_ms)

    def set_pending_identity(self, peer_id: str, identity: bytes) -> None:
        with self._tx() as db:
            self._pins.pop(peer_id, None)
            db.execute(
                "UPDATE peers SET pending_identity = ? WHERE peer_id = ?", (identity, peer_id)
            )

    def repin(self, peer_id: str, identity: bytes, now_ms: int) -> None:
        """Trust a new identity for ``peer_id``: replace the pin and drop its old sessions."""
        with self._tx() as db:
            self._pins.pop(peer_id, None)
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
        durable: bool = True,
    ) -> None:
        """Send order step 2: the new session state and the outbox row, in one transaction.

        ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL``):
        the commit survives a crash of this process (``kill -9`` included) at once,
        and power loss after the next :meth:`sync` (or any durable commit). The
        caller must not transmit the envelope before that.
        """
        with self._tx(relaxed=not durable) as db:
            self._write_session(db, peer_id, record, pin_identity, now_ms)
            db.execute(
                "INSERT INTO outbox (message_id, recipient, envelope, created_ms) "
                "VALUES (?, ?, ?, ?)",
                (message_id, peer_id, envelope, now_ms),
            )

    def outbox(self) -> list[tuple[bytes, bytes]]:
        """Unacknowledged ``(message_id, envelope)`` pairs, oldest first."""
        with self._lock:
            self._flush_acked()
            rows = self._db.execute(
                "SELECT message_id, envelope FROM outbox ORDER BY seq"
            ).fetchall()
        return [(bytes(m), bytes(e)) for m, e in rows]

    def outbox_size(self) -> int:
        with self._lock:
            self._flush_acked()
            row = self._one("SELECT COUNT(*) FROM outbox")
        return int(row[0]) if row else 0

    def remove_from_outbox(self, message_id: bytes) -> None:
        with self._tx() as db:
            db.execute(_DELETE_OUTBOX_SQL, (message_id,))

    def defer_outbox_removal(self, message_ids: list[bytes]) -> None:
        """The hub acknowledged these envelopes: delete their outbox rows with the next write.

        No transaction (and no fsync) of its own: the deletes ride along with the
        next one (a send, a receive), or with :meth:`outbox`, :meth:`outbox_size`
        or :meth:`close`. If the process dies first, the rows are still there and
        the envelopes are sent again after the restart; the hub (queued message
        ids) or the recipient (its replay record) drops the duplicate.
        """
        with self._lock:
            self._acked.extend(message_ids)

    def _flush_acked(self) -> None:
        if self._acked:
            with self._tx():
                pass

    # -- receive path -----------------------------------------------------

    def seen(self, message_id: bytes) -> bool:
        return self._one("SELECT 1 FROM seen WHERE message_id = ?", (message_id,)) is not None

    def seen_among(self, message_ids: list[bytes]) -> set[bytes]:
        """Which of ``message_ids`` are in the replay record (one query per 500 ids)."""
        found: set[bytes] = set()
        with self._lock:
            for start in range(0, len(message_ids), 500):
                chunk = message_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(
                    bytes(row[0])
                    for row in self._db.execute(
                        f"SELECT message_id FROM seen WHERE message_id IN ({marks})",  # noqa: S608
                        chunk,
                    )
                )
        return found

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
            self._write_session(db, peer_id, record, pin_identity, now_ms)
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

    def commit_received_batch(
        self,
        records: dict[str, bytes],
        pins: dict[str, bytes],
        prekeys: bytes | None,
        messages: list[InboxRow],
        now_ms: int,
    ) -> None:
        """Receive order step 2 for several messages in ONE transaction (one fsync).

        ``records``: the newest session record of each sender; ``pins``: identities
        to pin for new peers; ``prekeys``: the prekey secrets if a one-time key was
        consumed; ``messages``: a replay record and an inbox row each, in arrival
        order (their ``seq`` is ignored). All or nothing, like :meth:`commit_received`.
        """
        with self._tx() as db:
            for peer_id, identity in pins.items():
                self._insert_pin(db, peer_id, identity, now_ms)
            db.executemany(_SAVE_SESSION_SQL, list(records.items()))
            if prekeys is not None:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('prekeys', ?)", (prekeys,)
                )
            db.executemany(
                "INSERT INTO seen (message_id, seen_ms) VALUES (?, ?)",
                [(m.message_id, now_ms) for m in messages],
            )
            db.executemany(
                "INSERT INTO inbox (message_id, sender, payload, timestamp_ms, signature) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (m.message_id, m.sender, m.payload, m.timestamp_ms, m.signature)
                    for m in messages
                ],
            )

    def unhandled(self, limit: int = 1000) -> list[InboxRow]:
        with self._lock:
            self._delete_handled()
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
        """Receive order step 5: the row is handled; it is deleted (no handled plaintext
        stays at rest) by the next :meth:`unhandled` call, i.e. before the next page
        of messages is dispatched, in one transaction for the whole page.

        Until then ``seq`` is appended to the *handled log* (``<state file>-handled``,
        8 bytes per row, no fsync): the write reaches the operating system before
        this returns, so no process crash (``kill -9`` included) can make the row
        run again; opening the state file deletes every row the log names. A power
        loss can only make already-handled messages run again (at least once),
        never lose one.
        """
        with self._lock:
            if self.path is None:
                self._db.execute("DELETE FROM inbox WHERE seq = ?", (seq,))
                return
            if self._handled_fd is None:
                self._handled_fd = os.open(
                    self._handled_log(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
                )
            os.write(self._handled_fd, seq.to_bytes(8, "big"))
            self._handled.append(seq)

    def _handled_log(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + "-handled")

    def _delete_handled(self) -> None:
        """Delete the rows :meth:`mark_handled` logged, then empty the log (lock held)."""
        if not self._handled:
            return
        seqs, self._handled = self._handled, []
        try:
            with self._tx(relaxed=True) as db:  # survives kill -9 once committed, like the log
                db.executemany("DELETE FROM inbox WHERE seq = ?", [(s,) for s in seqs])
        except BaseException:
            self._handled[:0] = seqs
            raise
        if self._handled_fd is not None:
            os.ftruncate(self._handled_fd, 0)

    def _recover_handled(self) -> None:
        """At open: delete the rows a previous process logged as handled (see mark_handled)."""
        log = self._handled_log()
        try:
            data = log.read_bytes()
        except FileNotFoundError:
            return
        whole = len(data) - len(data) % 8  # a torn last record was never acknowledged
        seqs = [(int.from_bytes(data[i : i + 8], "big"),) for i in range(0, whole, 8)]
        if seqs:
            with self._tx() as db:
                db.executemany("DELETE FROM inbox WHERE seq = ?", seqs)
        log.unlink()

    def inbox_pending(self) -> int:
        with self._lock:
            self._delete_handled()
            row = self._one("SELECT COUNT(*) FROM inbox")
        return int(row[0]) if row else 0

    def forget_seen_before(self, cutoff_ms: int) -> int:
        """Trim the replay window (ids older than ``cutoff_ms``)."""
        with self._tx() as db:
            return db.execute("DELETE FROM seen WHERE seen_ms < ?", (cutoff_ms,)).rowcount
