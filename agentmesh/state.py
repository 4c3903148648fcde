"""The agent's own durable state, in a SQLite file next to its key file.

``alice.json`` → ``alice.state.sqlite`` (and ``alice.state.lock``). It holds
ratchet sessions (active and archived, per peer), prekey private keys, pinned
peer identities, the replay window of seen message ids, the **outbox** of
envelopes the hub has not acknowledged, and the **inbox** of decrypted
messages whose handlers have not finished.

Each method that changes several things does so in ONE transaction, so after
a crash (even ``kill -9``) the state is either before or after the change.
SQLite runs in WAL mode, and a commit is on disk when the method returns: the
connection runs ``synchronous=NORMAL`` and a durable commit fdatasyncs the WAL
itself (what ``synchronous=FULL`` would do, without switching the setting per
transaction). The exceptions, each safe against a process crash and documented
where it happens: relaxed commits (``commit_sent(durable=False)``,
``commit_received_batch(durable=False)``: on disk after the next
:meth:`AgentState.sync` or durable commit), the hub's acknowledgements (outbox
rows deleted with the next write), and handled inbox rows (logged in
``<file>-handled``, deleted with the next page). None of them can lose a
message; a power failure can at worst resend one or run a handler again.

Deleted secrets (consumed prekeys, old ratchet states, handled plaintexts)
do not linger in the files: ``secure_delete`` zeroes what a transaction
frees, and :meth:`AgentState.scrub` copies the WAL into the database file and
truncates it, at open, at close and at most once a second after such a
deletion (see :meth:`AgentState.scrub`).

The file records its format in ``meta.schema_version`` (:data:`SCHEMA_VERSION`);
a file of another version is refused at open, unchanged, with
:class:`~agentmesh.errors.ConfigurationError`.

This module is the agent side's only SQL. It uses the standard library's
``sqlite3`` rather than SQLAlchemy: the file is always local SQLite, private
to one process (see :class:`StateLock`), and sits on the per-message hot path.
Without a key file the same schema lives in an in-memory database.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

# The store implements the core's AgentStore; InboxRow is the core's row type.
from agentmesh.agent_core import InboxRow as InboxRow
from agentmesh.errors import ConfigurationError, DecodeError, StateLockedError

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
CREATE TABLE IF NOT EXISTS dead_letters (
    message_id BLOB PRIMARY KEY,
    direction TEXT NOT NULL,
    peer TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB,
    timestamp_ms INTEGER NOT NULL,
    signature BLOB,
    envelope BLOB NOT NULL,
    in_reply_to BLOB
);
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id BLOB NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    payload BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    signature BLOB,
    envelope BLOB NOT NULL,
    in_reply_to BLOB
);
"""
#: Version 2: sessions and message keys of AgentMesh protocol version 2; a version 1
#: file holds sessions protocol version 2 cannot use (refused at open).
SCHEMA_VERSION = b"2"
#: Meta rows holding secrets: rewriting one deletes the old secrets (a scrub follows).
_SECRET_META = frozenset({"prekeys"})
#: Deleted secrets are scrubbed from the files at most this often (see AgentState.scrub).
SCRUB_INTERVAL_S = 1.0
_PIN_SQL = "INSERT OR IGNORE INTO peers (peer_id, identity, first_seen_ms) VALUES (?, ?, ?)"
_INSERT_INBOX_SQL = (
    "INSERT INTO inbox (message_id, sender, payload, timestamp_ms, signature, envelope, "
    "in_reply_to) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_DELETE_OUTBOX_SQL = "DELETE FROM outbox WHERE message_id = ?"
#: An upsert rewrites the record in place (OR REPLACE would also rewrite the key's index).
_SAVE_SESSION_SQL = (
    "INSERT INTO sessions (peer_id, record) VALUES (?, ?) "
    "ON CONFLICT (peer_id) DO UPDATE SET record = excluded.record"
)


#: Module-level so that tests can make the disk slow or failing (AgentState.sync).
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


def _stored_version(db: sqlite3.Connection) -> bytes | None:
    """The file's ``schema_version`` (read only), or None for a file not set up yet.

    A file with tables holding data but no version is refused as damaged: it
    cannot be told apart from an old file, whose sessions may be unusable.
    """
    tables = [
        row[0]
        for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    row = None
    if "meta" in tables:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is not None:
        value = row[0]
        if isinstance(value, str):
            return value.encode("utf-8", "backslashreplace")
        return bytes(value) if isinstance(value, bytes) else str(value).encode()
    for table in tables:
        if db.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone() is not None:  # noqa: S608
            raise sqlite3.DatabaseError("no schema_version in a state file holding data")
    return None


def _version_error(path: Path | None, version: bytes) -> ConfigurationError:
    if version == b"1":
        return ConfigurationError(
            f"state file {path} was written by AgentMesh protocol version 1, whose sessions "
            "protocol version 2 cannot use; move it away to start afresh (the key file stays "
            "valid: same identity)"
        )
    return ConfigurationError(
        f"state file {path} has state format version {version[:16]!r}, which this AgentMesh "
        f"(format {SCHEMA_VERSION.decode()}) does not know; it was probably written by a newer "
        "AgentMesh: use that, or move the file away to start afresh (the key file stays valid: "
        "same identity)"
    )


class _SyncRound:
    """One fdatasync of the WAL: the commits it covers and, once done, its outcome."""

    __slots__ = ("covers", "done", "error")

    def __init__(self, covers: int) -> None:
        #: Generation of the newest relaxed commit made before the fsync started.
        self.covers = covers
        self.done = False
        self.error: BaseException | None = None


class AgentState:
    """Durable (or in-memory) agent state. Thread-safe.

    Locking: ONE lock, ``_lock`` (re-entrant), guards the connection and every
    field. ``_sync_done`` is a condition on that same lock (waiting on it
    releases the lock), so there is no second lock to order. While holding
    ``_lock``, AgentState calls only ``sqlite3`` and ``os``, never another
    AgentMesh component and never a callback, so callers may hold their own
    locks when calling in (the agent does). :meth:`sync` waits for the disk
    holding no lock; the scrub timer thread takes ``_lock`` like any caller.

    ``clock`` (seconds, monotonic) and ``scrub_interval_s`` rate-limit
    :meth:`scrub` after deletions of secrets; tests inject a clock.

    :attr:`opened_clean` says whether the file was last closed by :meth:`close`
    (and nothing ran on it since): after anything else (a crash, ``kill -9``, a
    power cut) the agent core jumps its sending counters past their reservation.
    """

    #: Test hook of the power-cut test (tests/reliability/test_power_cut.py): when set,
    #: every durable point (a durable commit, a completed sync) copies the database and its
    #: WAL into a new folder under ``<it>/<state file name>/`` and names that folder in
    #: ``CURRENT`` there, so that the test can bring back exactly what a power cut would
    #: have left of each agent's file. Never set it in production.
    _durable_image: ClassVar[Path | None] = None

    def __init__(
        self,
        path: Path | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        scrub_interval_s: float = SCRUB_INTERVAL_S,
    ) -> None:
        """Open (or create) the state file at ``path``, or an in-memory state for None.

        Raises DecodeError for a damaged file and ConfigurationError for a file of
        another format version; in both cases the file is left as it was.
        """
        self.path = path
        if path is not None:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        target = str(path) if path is not None else ":memory:"
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        #: Outbox rows the hub acknowledged, deleted by the next write transaction.
        self._acked: list[bytes] = []
        #: Sync generations: ``_committed`` counts commits; every commit up to
        #: generation ``_synced`` is known to be on disk (see :meth:`sync`).
        self._committed = 0
        self._synced = 0
        #: The fdatasync in progress, if any; ``_sync_done`` is notified when it ends.
        self._sync_round: _SyncRound | None = None
        self._sync_done = threading.Condition(self._lock)
        #: ``pinned_identity`` answers read so far (None: not pinned). Every write to
        #: the peers table drops its entry first, under the lock, so a cached answer
        #: is never older than the file; the agent's StateLock keeps other processes out.
        self._pins: dict[str, tuple[bytes, bytes | None] | None] = {}
        #: Descriptor of the WAL file, for :meth:`sync`.
        self._wal: int | None = None
        #: Handled inbox rows not deleted yet, and the log recording them (mark_handled).
        self._handled: list[int] = []
        self._handled_fd: int | None = None
        #: Scrub schedule: secrets were deleted since the last scrub (``_scrub_due``);
        #: the last one ran at ``_last_scrub`` (clock); a timer runs a deferred one.
        self._clock = clock
        self._scrub_interval = scrub_interval_s
        self._scrub_due = False
        self._last_scrub = -math.inf
        self._scrub_timer: threading.Timer | None = None
        self._closed = False
        try:
            self._db.execute("PRAGMA busy_timeout=5000")
            if path is not None:
                # Read only until the file is known to be ours and of this version, so
                # that a refused file stays byte for byte as it was.
                version = _stored_version(self._db)
                if version not in (None, SCHEMA_VERSION, b"1"):
                    # A newer format may have other tables: refuse before checking them.
                    raise _version_error(path, version)
                if version is not None:
                    _check_database(self._db)  # damaged is reported as damaged, any version
                if version is not None and version != SCHEMA_VERSION:
                    raise _version_error(path, version)
                os.chmod(path, 0o600)  # WAL and SHM files inherit the database file's mode
                self._db.execute("PRAGMA journal_mode=WAL")
                # Durable commits sync the WAL themselves (see _Tx.__exit__).
                self._db.execute("PRAGMA synchronous=NORMAL")
            # Zero freed cells and pages in the page's new version (some SQLite builds do
            # by default, others not); older versions stay in the WAL until scrub().
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            self.opened_clean = path is None  # nothing of an in-memory state survives
            if path is not None:
                _check_database(self._db)
                self.opened_clean = self._take_clean_close()
                self._recover_handled()
                # A crashed process may have left deleted secrets in the WAL.
                self._scrub_locked()
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            self._db.close()  # an open connection would keep the file locked
            raise DecodeError(
                f"state file {path} is damaged or not an AgentMesh state file ({exc}); "
                "restore it from a backup, or move it away to start afresh"
            ) from exc
        except BaseException:
            self._db.close()
            raise

    # -- transactions -----------------------------------------------------

    class _Tx:
        def __init__(self, state: AgentState, relaxed: bool = False, secret: bool = False) -> None:
            self.state = state
            self.relaxed = relaxed and state.path is not None
            self.secret = secret and state.path is not None
            self.acked: list[bytes] = []
            self.changes = 0

        def __enter__(self) -> sqlite3.Connection:
            state = self.state
            state._lock.acquire()
            db = state._db
            try:
                self.changes = db.total_changes
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
                committed = False
                if exc_type is None:
                    wrote = db.total_changes != self.changes
                    db.execute("COMMIT")
                    committed = True
                    if self.relaxed:
                        state._committed += 1  # on disk after the next sync()
                    elif wrote:  # (one that wrote nothing syncs nothing)
                        state._committed += 1  # unsynced, should the fsync fail
                        state._sync_wal_locked()
                else:
                    state._acked[:0] = self.acked  # not deleted after all: next time
                    # A pin read inside the transaction may be rolled back with it.
                    state._pins.clear()
                    db.execute("ROLLBACK")
                if committed and self.secret:
                    state._secrets_deleted()
            finally:
                state._lock.release()

    def _sync_wal_locked(self) -> None:
        """A durable commit's fsync (lock held): with ``synchronous=NORMAL`` a commit is
        in the WAL file, and on disk once that is fdatasynced, together with every
        commit before it. Raises OSError if the disk fails: the commit is then
        visible but, as with SQLite's own FULL commit failing its fsync, not known to
        be durable (it stays counted as unsynced)."""
        if self.path is None:
            self._synced = self._committed
            return
        wal = self._wal_fd()
        if wal is None:  # never expected in WAL mode: let SQLite sync what it holds
            self._db.execute("PRAGMA wal_checkpoint(FULL)")
        else:
            _fdatasync(wal)
        self._synced = self._committed
        if AgentState._durable_image is not None:
            self._save_durable_image()

    def _tx(self, *, relaxed: bool = False, secret: bool = False) -> AgentState._Tx:
        """A write transaction; ``relaxed``: committed without waiting for the disk
        (no fdatasync of the WAL; see :meth:`commit_sent` and :meth:`sync`);
        ``secret``: it overwrites or deletes secrets (schedules a :meth:`scrub`)."""
        return AgentState._Tx(self, relaxed, secret)

    @property
    def unsynced(self) -> bool:
        """Whether a relaxed commit may not be on disk yet (:meth:`sync` makes it so)."""
        return self._synced < self._committed

    def sync(self) -> None:
        """Make every commit so far survive power loss (group commit: one fsync for many).

        Returns at once unless a relaxed commit happened since the last durable one
        or successful sync. Otherwise returns only after an fdatasync of the WAL
        that *started after* the caller's last commit *succeeded* (SQLite WAL:
        committed frames are durable once the WAL file is synced). Callers
        arriving while such an fsync runs wait for it and share it; one that
        started before their commit is waited out, then another is run. No lock
        is held while the disk works, so commits go on meanwhile.

        Raises OSError if that fsync failed, in every caller waiting for it; the
        commits stay counted as unsynced and the next call fsyncs again.
        """
        with self._lock:
            target = self._committed  # this caller's commits are all at or below it
            while True:
                if self._synced >= target:
                    return
                running = self._sync_round
                if running is None:
                    break
                while not running.done:
                    self._sync_done.wait()
                error = running.error
                if isinstance(error, OSError) and running.covers >= target:
                    if self._synced >= target:  # a durable commit synced it meanwhile
                        return
                    raise OSError(
                        error.errno, f"syncing the state file failed: {error.strerror or error}"
                    ) from error
                # Success, or not covering this caller's commits, or interrupted: look again.
            wal = self._wal_fd()
            if wal is None:  # no WAL file to sync (never expected): SQLite syncs what it has
                self._sync_wal_locked()
                return
            fd = os.dup(wal)  # close() may close ``wal`` meanwhile
            this = _SyncRound(self._committed)  # every commit so far is in the WAL file
            self._sync_round = this
        try:
            _fdatasync(fd)
        except BaseException as exc:
            this.error = exc
            raise
        finally:
            os.close(fd)
            with self._lock:
                if this.error is None:
                    self._synced = max(self._synced, this.covers)
                    # Only an image of exactly what the fsync covered is a power cut's
                    # image: with later relaxed commits, the older image stays.
                    if self._durable_image is not None and this.covers == self._committed:
                        self._save_durable_image()  # sync() runs on files only
                this.done = True
                self._sync_round = None
                self._sync_done.notify_all()

    def _take_clean_close(self) -> bool:
        """At open: whether :meth:`close` marked the file as closed cleanly; the mark is
        removed (durably) so that a crash of this process counts as unclean."""
        row = self._db.execute("SELECT 1 FROM meta WHERE key = 'clean_close'").fetchone()
        if row is None:
            return False
        with self._tx() as db:
            db.execute("DELETE FROM meta WHERE key = 'clean_close'")
        return True

    def _save_durable_image(self) -> None:
        """The power-cut test's copy of what is on disk now (lock held; see _durable_image)."""
        images, path = AgentState._durable_image, self.path
        assert images is not None and path is not None
        root = images / path.name
        root.mkdir(parents=True, exist_ok=True)
        generation = int((root / "NEXT").read_text()) if (root / "NEXT").exists() else 0
        folder = root / f"image-{generation:08d}"
        folder.mkdir()
        for source in (path, Path(f"{path}-wal")):
            if source.exists():
                (folder / source.name).write_bytes(source.read_bytes())
        (root / "NEXT").write_text(str(generation + 1))
        (root / "CURRENT.tmp").write_text(folder.name)
        os.replace(root / "CURRENT.tmp", root / "CURRENT")  # a kill leaves one or the other

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

    # -- erasing deleted secrets -------------------------------------------

    def scrub(self) -> bool:
        """Erase deleted rows from the files: checkpoint the WAL into the database file
        (``PRAGMA wal_checkpoint(TRUNCATE)``) and truncate the WAL to zero bytes.

        With ``secure_delete`` on, the database file then holds zeros where deleted
        rows were, and the WAL no longer holds old copies of pages. Costs about two
        fsyncs, so AgentState runs it by itself at open, at close and, after a
        transaction that deleted or overwrote secrets (a consumed prekey, an old
        ratchet state, a handled message), at most once per ``scrub_interval_s``
        (a timer runs a deferred one). Returns whether the WAL was emptied (False
        for an in-memory state, or if a reader kept it busy). Raises sqlite3 or
        OS errors (e.g. a full disk); the scrub then stays due.
        """
        with self._lock:
            if self._closed:
                return False
            return self._scrub_locked()

    def _scrub_locked(self) -> bool:
        if self.path is None:
            return False
        self._scrub_due = False
        self._last_scrub = self._clock()
        try:
            row = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except BaseException:
            self._scrub_due = True
            raise
        emptied = row is not None and row[0] == 0
        if not emptied:
            self._scrub_due = True
        return emptied

    def _secrets_deleted(self) -> None:
        """After a commit that deleted secrets (lock held, no transaction open): scrub
        now if the last scrub is older than the interval, else arm the timer."""
        self._scrub_due = True
        wait = self._last_scrub + self._scrub_interval - self._clock()
        if wait <= 0:
            try:
                self._scrub_locked()
            except (sqlite3.Error, OSError):
                pass  # the commit stands; the scrub stays due (timer, next commit, close)
            else:
                return
            wait = self._scrub_interval
        if self._scrub_timer is None:
            timer = threading.Timer(min(wait, self._scrub_interval), self._scrub_later)
            timer.daemon = True
            timer.name = "agentmesh-state-scrub"
            self._scrub_timer = timer
            timer.start()

    def _scrub_later(self) -> None:
        """The timer: run the scrub deferred by the rate limit (best effort)."""
        with self._lock:
            self._scrub_timer = None
            if self._closed or not self._scrub_due:
                return
            with contextlib.suppress(sqlite3.Error, OSError):
                self._scrub_locked()

    def _one(self, sql: str, args: tuple[object, ...] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    def close(self) -> None:
        """Delete what is left to delete, sync, scrub, and close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_acked()
                self._delete_handled()
                if self.path is not None:
                    # Everything is committed and this is the last write: the next open
                    # need not jump the sending counters (see opened_clean).
                    with self._tx() as db:
                        db.execute(
                            "INSERT OR REPLACE INTO meta (key, value) VALUES ('clean_close', x'')"
                        )
                self.sync()
                self._scrub_locked()
            except (sqlite3.Error, OSError):  # e.g. a full disk: resent or re-deleted later
                pass
            self._closed = True
            if self._scrub_timer is not None:
                self._scrub_timer.cancel()
                self._scrub_timer = None
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
        """Store a meta value; rewriting ``prekeys`` (rotated, consumed) schedules a scrub."""
        with self._tx(secret=key in _SECRET_META) as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- sessions and peers -----------------------------------------------

    def session_record(self, peer_id: str) -> bytes | None:
        row = self._one("SELECT record FROM sessions WHERE peer_id = ?", (peer_id,))
        return None if row is None else bytes(row[0])

    def session_peers(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT peer_id FROM sessions ORDER BY peer_id")]

    def save_session(self, peer_id: str, record: bytes) -> None:
        with self._tx(secret=True) as db:
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
        with self._tx(secret=True) as db:
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

        ``durable=False`` commits without waiting for the disk (no fdatasync):
        the commit survives a crash of this process (``kill -9`` included) at once,
        and power loss after the next :meth:`sync` (or any durable commit). Sending
        it before then is safe for the ratchet (reserved counters, see
        ``AgentCore.seal``); only the outbox row may be lost to a power cut.
        """
        # The old sending chain key is overwritten: erasing it gives forward secrecy.
        with self._tx(relaxed=not durable, secret=True) as db:
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

    def remove_from_outbox(self, message_id: bytes) -> bool:
        """Delete one outbox row (it is not sent again); False if there is none."""
        with self._tx() as db:
            return db.execute(_DELETE_OUTBOX_SQL, (message_id,)).rowcount > 0

    def outbox_entries(self) -> list[tuple[bytes, str, int, int]]:
        """``(message_id, recipient, created_ms, envelope_bytes)`` of every unacknowledged
        envelope, oldest first (what ``agentmesh outbox`` lists)."""
        with self._lock:
            self._flush_acked()
            rows = self._db.execute(
                "SELECT message_id, recipient, created_ms, length(envelope) FROM outbox "
                "ORDER BY seq"
            ).fetchall()
        return [(bytes(m), r, int(c), int(n)) for m, r, c, n in rows]

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

    def commit_received_batch(
        self,
        records: dict[str, bytes],
        pins: dict[str, bytes],
        prekeys: bytes | None,
        messages: list[InboxRow],
        now_ms: int,
        *,
        durable: bool = True,
    ) -> None:
        """Receive order step 2 for several messages in ONE transaction (one fsync).

        ``records``: the newest session record of each sender; ``pins``: identities
        to pin for new peers; ``prekeys``: the prekey secrets if a one-time key was
        consumed; ``messages``: a replay record and (unless ``control``) an inbox row
        each, in arrival order (their ``seq`` is ignored). All or nothing.
        ``durable=False`` commits without waiting for the disk (it survives a crash
        of the process, and power loss after the next :meth:`sync`).
        """
        with self._tx(relaxed=not durable, secret=True) as db:
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
                _INSERT_INBOX_SQL,
                [
                    (
                        m.message_id,
                        m.sender,
                        m.payload,
                        m.timestamp_ms,
                        m.signature,
                        m.envelope,
                        m.in_reply_to,
                    )
                    for m in messages
                    if not m.control
                ],
            )

    def unhandled(self, limit: int = 1000) -> list[InboxRow]:
        with self._lock:
            self._delete_handled()
            rows = self._db.execute(
                "SELECT seq, message_id, sender, payload, timestamp_ms, signature, envelope, "
                "in_reply_to FROM inbox ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            InboxRow(
                s,
                bytes(m),
                snd,
                bytes(pl),
                ts,
                None if sig is None else bytes(sig),
                bytes(env),
                None if irt is None else bytes(irt),
            )
            for s, m, snd, pl, ts, sig, env, irt in rows
        ]

    def inbox_seq(self, message_id: bytes) -> int | None:
        """The inbox sequence number of a committed, unhandled message, if there is one."""
        row = self._one("SELECT seq FROM inbox WHERE message_id = ?", (message_id,))
        return None if row is None else int(row[0])

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
            # Survives kill -9 once committed, like the log; deletes handled plaintexts.
            with self._tx(relaxed=True, secret=True) as db:
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

    # -- dead letters -------------------------------------------------------

    def dead_letter_received(self, row: InboxRow, reason: str) -> None:
        """Move a received message whose handler kept failing from the inbox to the
        dead-letter list, in one transaction (so it is in exactly one of them)."""
        with self._tx(secret=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters (message_id, direction, peer, reason, "
                "payload, timestamp_ms, signature, envelope, in_reply_to) "
                "VALUES (?, 'in', ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.message_id,
                    row.sender,
                    reason,
                    row.payload,
                    row.timestamp_ms,
                    row.signature,
                    row.envelope,
                    row.in_reply_to,
                ),
            )
            db.execute("DELETE FROM inbox WHERE seq = ?", (row.seq,))

    def dead_letter_sent(self, message_ids: list[bytes], reason: str) -> list[bytes]:
        """Move outbox envelopes that no resend can deliver to the dead-letter list (in
        one transaction: each is in exactly one of the two). Returns the ids moved;
        ids no longer in the outbox (acknowledged meanwhile) are skipped."""
        moved: list[bytes] = []
        with self._tx() as db:
            for message_id in message_ids:
                row = db.execute(
                    "SELECT recipient, envelope, created_ms FROM outbox WHERE message_id = ?",
                    (message_id,),
                ).fetchone()
                if row is None:
                    continue
                recipient, envelope, created_ms = row
                db.execute(
                    "INSERT OR REPLACE INTO dead_letters (message_id, direction, peer, reason, "
                    "payload, timestamp_ms, signature, envelope, in_reply_to) "
                    "VALUES (?, 'out', ?, ?, NULL, ?, NULL, ?, NULL)",
                    (message_id, recipient, reason, created_ms, envelope),
                )
                db.execute(_DELETE_OUTBOX_SQL, (message_id,))
                moved.append(message_id)
        return moved

    def outbox_older_than(self, cutoff_ms: int) -> list[bytes]:
        """Ids of outbox envelopes committed before ``cutoff_ms``, oldest first."""
        with self._lock:
            self._flush_acked()
            rows = self._db.execute(
                "SELECT message_id FROM outbox WHERE created_ms < ? ORDER BY seq", (cutoff_ms,)
            ).fetchall()
        return [bytes(m) for (m,) in rows]

    def outbox_to(self, peer_id: str) -> list[bytes]:
        """Ids of the outbox envelopes addressed to ``peer_id``, oldest first."""
        with self._lock:
            self._flush_acked()
            rows = self._db.execute(
                "SELECT message_id FROM outbox WHERE recipient = ? ORDER BY seq", (peer_id,)
            ).fetchall()
        return [bytes(m) for (m,) in rows]

    def dead_letters(self) -> list[tuple[str, bytes, str, str, bytes | None, int]]:
        """``(direction, message_id, peer, reason, payload, timestamp_ms)`` of every
        dead letter, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT direction, message_id, peer, reason, payload, timestamp_ms "
                "FROM dead_letters ORDER BY timestamp_ms, message_id"
            ).fetchall()
        return [
            (d, bytes(m), peer, reason, None if pl is None else bytes(pl), ts)
            for d, m, peer, reason, pl, ts in rows
        ]

    def retry_dead_letter(self, message_id: bytes, now_ms: int) -> tuple[str, bytes] | None:
        """Put a received dead letter back into the inbox (it is dispatched again, as the
        newest message), or a sent one back into the outbox (resent as it was, as the
        newest envelope, its outbox clock restarted at ``now_ms``). Returns
        ``(direction, envelope)``, or None if there is no such dead letter."""
        with self._tx() as db:
            sent = db.execute(
                "SELECT peer, envelope, timestamp_ms FROM dead_letters "
                "WHERE message_id = ? AND direction = 'out'",
                (message_id,),
            ).fetchone()
            if sent is not None:
                peer, envelope, _ = sent
                db.execute(
                    "INSERT INTO outbox (message_id, recipient, envelope, created_ms) "
                    "VALUES (?, ?, ?, ?)",
                    (message_id, peer, envelope, now_ms),
                )
                db.execute("DELETE FROM dead_letters WHERE message_id = ?", (message_id,))
                return "out", bytes(envelope)
            row = db.execute(
                "SELECT peer, payload, timestamp_ms, signature, envelope, in_reply_to "
                "FROM dead_letters WHERE message_id = ? AND direction = 'in'",
                (message_id,),
            ).fetchone()
            if row is None:
                return None
            peer, payload, ts, signature, envelope, in_reply_to = row
            db.execute(
                _INSERT_INBOX_SQL, (message_id, peer, payload, ts, signature, envelope, in_reply_to)
            )
            db.execute("DELETE FROM dead_letters WHERE message_id = ?", (message_id,))
            return "in", bytes(envelope)

    def discard_dead_letter(self, message_id: bytes) -> bool:
        """Delete a dead letter for good; False if there is none with that id."""
        with self._tx(secret=True) as db:
            return (
                db.execute("DELETE FROM dead_letters WHERE message_id = ?", (message_id,)).rowcount
                > 0
            )

    def dead_letter_count(self) -> int:
        row = self._one("SELECT COUNT(*) FROM dead_letters")
        return int(row[0]) if row else 0

    def inbox_pending(self) -> int:
        with self._lock:
            self._delete_handled()
            row = self._one("SELECT COUNT(*) FROM inbox")
        return int(row[0]) if row else 0

    def forget_seen_before(self, cutoff_ms: int) -> int:
        """Trim the replay window (ids older than ``cutoff_ms``)."""
        with self._tx() as db:
            return db.execute("DELETE FROM seen WHERE seen_ms < ?", (cutoff_ms,)).rowcount
