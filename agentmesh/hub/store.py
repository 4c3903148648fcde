"""The hub's persistent store: every SQL statement of the hub lives here.

:class:`HubStore` keeps agent identities, published prekey bundles, one-time
prekeys and the store-and-forward envelope queue in SQLite or PostgreSQL,
through SQLAlchemy Core (no ORM). The hub holds ciphertext only; the store never
looks inside a body or a bundle.

Threading and transactions
    The API is synchronous. Every public method checks a connection out of the
    engine's pool, runs exactly one transaction and returns the connection, so
    one :class:`HubStore` may be called from several threads at once and several
    stores (processes) may share one database. The asyncio server calls it from
    one dedicated writer thread, which also makes group commit (:meth:`enqueue`)
    effective. When a method returns, what it wrote is committed.

    On SQLite, write transactions start with ``BEGIN IMMEDIATE`` (they take the
    write lock up front, waiting up to ``busy_timeout_ms``), reads with a plain
    ``BEGIN`` on a WAL snapshot. On PostgreSQL, rows that decide a write are
    locked with ``SELECT ... FOR UPDATE`` (``SKIP LOCKED`` for one-time prekeys).

Cursors
    A hub pushes an agent's envelopes in ``seq`` order and pages its mailbox
    with ``seq > cursor`` (:meth:`HubStore.pending`). That skips nothing only if
    each recipient's envelopes commit in ``seq`` order. On SQLite one writer at
    a time holds the database lock, so they do. On PostgreSQL several hubs
    write at once, and ``seq`` comes from a sequence, whose values are handed
    out at insert and committed in any order: a cursor that trusted them would
    move past a row still uncommitted (``tests/hub/test_multi_hub_store.py``
    shows it). :meth:`HubStore.enqueue` therefore locks each recipient's
    ``mailboxes`` row (``SELECT ... FOR UPDATE``, recipients sorted) BEFORE it
    inserts, i.e. before any ``seq`` is drawn, and holds it until the commit:
    a second writer for that recipient draws its ``seq`` only after the first
    committed. Per recipient, ``seq`` order is commit order, and a row visible
    to a page implies every lower ``seq`` of that recipient is visible too.
    ``enqueue`` also reports ``prev_seq`` (the recipient's highest queued
    ``seq`` before the item, read under that lock), so a hub pushes its own
    commit at once only if it has seen everything before it.

Several hubs on one PostgreSQL
    ``enqueue(notify_from=HUB_ID)`` sends ``NOTIFY agentmesh, 'm HUB AGENT'``
    (ids only) in the same transaction, so it is delivered at the commit;
    :class:`HubListener` (one connection, one thread) hands such payloads to
    the hub, which catches up from the table. A lost notification only waits
    for the next periodic catch-up (:meth:`HubStore.recipients_with_mail`).
    Leases (``agent_leases``, :meth:`HubStore.claim_lease`) give each agent one
    live session across the hubs. SQLite has no LISTEN: it serves one hub.

Clock
    Nothing here reads the clock: methods that need "now" take ``now_ms``
    (milliseconds since the epoch), so tests are deterministic.

Schema
    Tables are in :mod:`agentmesh.hub.models` and are created only by the Alembic
    migrations shipped as ``agentmesh.migrations``; :meth:`HubStore.ensure_schema`
    brings a database to the current revision and refuses one written by a newer
    AgentMesh.

Errors
    Methods raise the :mod:`agentmesh.errors` exceptions documented on each of
    them; a database that cannot be reached or stays locked beyond the busy
    timeout raises :class:`sqlalchemy.exc.OperationalError`.
"""

from __future__ import annotations

import hmac
import importlib.resources
import importlib.util
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Select,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
)

from agentmesh.errors import (
    AuthFailedError,
    ConfigurationError,
    HubError,
    InvalidKeyError,
    LocalProtocolError,
)
from agentmesh.hub.models import (
    KIND_KEM,
    KIND_X25519,
    MESSAGE_ID_LENGTH,
    SIGNING_KEY_LENGTH,
    agent_leases,
    agents,
    envelopes,
    mailboxes,
    one_time_prekeys,
)
from agentmesh.ids import validate_agent_id

__all__ = [
    "DB_ENV_VAR",
    "DEFAULT_DB",
    "NOTIFY_CHANNEL",
    "AgentRecord",
    "EnqueueResult",
    "EnqueueStatus",
    "FetchedBundle",
    "HubListener",
    "HubStore",
    "LeaseClaim",
    "NewEnvelope",
    "StoreStats",
    "StoredEnvelope",
    "check_database_location",
    "create_hub_engine",
    "migration_transaction",
    "migrations_dir",
    "resolve_db_url",
    "sqlite_path",
]

logger = logging.getLogger("agentmesh.hub.store")

#: Environment variable naming the hub database (a file path or a SQLAlchemy URL).
DB_ENV_VAR: Final = "AGENTMESH_DB"
#: The PostgreSQL NOTIFY channel of the hubs sharing a database. Payloads are ids
#: only: ``m HUB AGENT`` (HUB committed mail for AGENT), ``r HUB AGENT`` (HUB,
#: release AGENT's lease) and ``f AGENT`` (AGENT's lease is free).
NOTIFY_CHANNEL: Final = "agentmesh"
#: The database of a hub given neither ``--db`` nor ``AGENTMESH_DB`` (and of a bare
#: ``alembic upgrade head``): this file in the current directory.
DEFAULT_DB: Final = "hub.sqlite"
#: What to install for the PostgreSQL driver the README recommends (psycopg 3).
_POSTGRES_INSTALL: Final = 'pip install "agentmesh[postgres]"'

_SYNCHRONOUS_MODES: Final = frozenset({"FULL", "NORMAL", "OFF"})
#: Connection execution option: start this transaction with BEGIN IMMEDIATE on SQLite.
_WRITE_OPTION: Final = "agentmesh_write"
#: pg_advisory_xact_lock key serialising concurrent migrations ("AgMesh").
_MIGRATION_LOCK_KEY: Final = 0x41674D657368
#: Largest number of bound parameters put in one IN (...) list.
_CHUNK: Final = 500
#: How often a write that lost a uniqueness race is retried from the start.
_RACE_RETRIES: Final = 5
#: PostgreSQL SQLSTATEs of a transaction aborted only because of another one
#: (deadlock_detected, serialization_failure): running it again is safe.
_TRANSIENT_SQLSTATES: Final = frozenset({"40P01", "40001"})
_KINDS: Final = (KIND_X25519, KIND_KEM)

_T = TypeVar("_T")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class FetchedBundle:
    """A published bundle plus at most one one-time prekey of each kind.

    The one-time prekeys have been deleted from the store: nobody else gets them.
    ``remaining_*`` count what is left in the pool after this fetch.
    """

    bundle: bytes
    one_time_x25519: bytes | None
    one_time_kem: bytes | None
    remaining_x25519: int
    remaining_kem: int


@dataclass(frozen=True, slots=True)
class NewEnvelope:
    """An envelope to queue. ``message_id`` is the envelope's 16-byte id.

    Raises :class:`~agentmesh.errors.LocalProtocolError` if ``message_id`` is not
    16 bytes or ``body`` is not bytes.
    """

    message_id: bytes
    sender: str
    recipient: str
    body: bytes
    expires_at_ms: int

    def __post_init__(self) -> None:
        if not isinstance(self.message_id, bytes) or len(self.message_id) != MESSAGE_ID_LENGTH:
            raise LocalProtocolError(f"message_id must be {MESSAGE_ID_LENGTH} bytes")
        if not isinstance(self.body, bytes):
            raise LocalProtocolError("envelope body must be bytes")


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """A queued envelope as handed to its recipient; ``seq`` orders the queue."""

    seq: int
    message_id: bytes
    sender: str
    recipient: str
    body: bytes


class EnqueueStatus(str, Enum):
    """What :meth:`HubStore.enqueue` did with one envelope."""

    STORED = "stored"
    """Queued now (durable once ``enqueue`` returns)."""
    DUPLICATE = "duplicate"
    """An envelope with this message id is already queued; success for the sender."""
    MAILBOX_FULL = "mailbox_full"
    """The recipient's count or byte quota would be exceeded; retry later."""
    UNKNOWN_RECIPIENT = "unknown_recipient"
    """No agent was ever bound under the recipient id."""


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """The outcome for one envelope of an :meth:`HubStore.enqueue` batch.

    ``seq`` is set for :attr:`EnqueueStatus.STORED` only, and so is
    ``prev_seq`` on PostgreSQL: the recipient's highest queued ``seq`` before
    this envelope (0 if none), read while its commits were serialised (see
    "Cursors" above). None on SQLite, whose single writer needs no such proof.
    """

    status: EnqueueStatus
    seq: int | None = None
    prev_seq: int | None = None

    @property
    def accepted(self) -> bool:
        """True if the hub holds the envelope (stored now or before): the sender may forget it."""
        return self.status in (EnqueueStatus.STORED, EnqueueStatus.DUPLICATE)


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """One bound agent id as the operator sees it (:meth:`HubStore.agent_records`)."""

    agent_id: str
    signing_key: bytes
    created_at_ms: int
    #: The last login (or first registration).
    last_seen_ms: int
    has_bundle: bool
    queued_messages: int
    queued_bytes: int
    one_time_prekeys: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What the database holds (:meth:`HubStore.store_stats`); times in ms since the epoch."""

    agents: int
    envelopes: int
    bytes: int
    #: Envelopes past their expiry, not purged yet.
    expired: int
    #: ``created_at_ms`` of the oldest queued envelope, or None if the queue is empty.
    oldest_envelope_ms: int | None
    one_time_prekeys: int


_DUPLICATE: Final = EnqueueResult(EnqueueStatus.DUPLICATE)
_MAILBOX_FULL: Final = EnqueueResult(EnqueueStatus.MAILBOX_FULL)
_UNKNOWN_RECIPIENT: Final = EnqueueResult(EnqueueStatus.UNKNOWN_RECIPIENT)


# --------------------------------------------------------------------------- engine


def _to_url(url_or_path: str) -> URL:
    value = url_or_path.strip() if isinstance(url_or_path, str) else ""
    if not value:
        raise ConfigurationError("database must be a file path or a SQLAlchemy URL, got ''")
    if "://" not in value:
        return URL.create("sqlite", database=value)
    try:
        return make_url(value)
    except ArgumentError as exc:
        raise ConfigurationError(f"invalid database URL {value!r}: {exc}") from None


def resolve_db_url(url_or_path: str) -> str:
    """Turn a database setting into a SQLAlchemy URL string.

    A value containing ``://`` is a URL and returned unchanged; anything else is a
    file path and becomes ``sqlite:///PATH`` (relative paths stay relative to the
    working directory). Raises :class:`~agentmesh.errors.ConfigurationError` for
    an empty value or a URL that does not parse.
    """
    return _to_url(url_or_path).render_as_string(hide_password=False)


def create_hub_engine(
    url_or_path: str, *, synchronous: str = "FULL", busy_timeout_ms: int = 5000
) -> Engine:
    """Create the engine :class:`HubStore` and the migrations use.

    For SQLite every new connection gets ``PRAGMA busy_timeout``,
    ``journal_mode=WAL``, ``synchronous=<synchronous>`` and ``foreign_keys=ON``,
    and SQLAlchemy (not the ``sqlite3`` module) emits ``BEGIN``: ``BEGIN
    IMMEDIATE`` for connections with the ``agentmesh_write`` execution option.
    Other databases get ``pool_pre_ping``. Nothing connects until first use.

    Raises :class:`~agentmesh.errors.ConfigurationError` for an empty or invalid
    URL, a ``synchronous`` other than FULL, NORMAL or OFF, or a negative timeout.
    """
    url = _to_url(url_or_path)
    if url.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except (ImportError, NoSuchModuleError) as exc:
            raise _missing_driver(url, exc) from None

    mode = synchronous.upper() if isinstance(synchronous, str) else ""
    if mode not in _SYNCHRONOUS_MODES:
        raise ConfigurationError(
            f"synchronous must be one of FULL, NORMAL, OFF, not {synchronous!r}"
        )
    if not isinstance(busy_timeout_ms, int) or busy_timeout_ms < 0:
        raise ConfigurationError(f"busy_timeout_ms must be an int >= 0, not {busy_timeout_ms!r}")

    engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (see on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            _enable_wal(cursor, busy_timeout_ms)
            cursor.execute(f"PRAGMA synchronous = {mode}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    def on_begin(conn: Connection) -> None:
        write = bool(conn.get_execution_options().get(_WRITE_OPTION))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", on_begin)
    return engine


def _missing_driver(url: URL, exc: BaseException) -> ConfigurationError:
    """The error for a URL whose SQLAlchemy dialect or database driver is not installed."""
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() != "postgresql":
        return ConfigurationError(
            f"cannot use the database {shown}: {exc}; AgentMesh hubs run on SQLite "
            f"(a file path) or PostgreSQL (postgresql+psycopg://..., {_POSTGRES_INSTALL})"
        )
    driver = url.get_driver_name()
    if driver == "psycopg":
        return ConfigurationError(
            f"the database {shown} needs the PostgreSQL driver psycopg 3, which is not "
            f"installed: {_POSTGRES_INSTALL}"
        )
    return ConfigurationError(
        f"the database {shown} names the PostgreSQL driver {driver!r}, which is not "
        f"installed ({exc}); install that driver, or {_POSTGRES_INSTALL} and use "
        "postgresql+psycopg://..."
    )


def sqlite_path(url_or_path: str) -> Path | None:
    """The file of a SQLite database setting, or None (another database, or in memory)."""
    url = _to_url(url_or_path)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):  # a URI filename: leave it to SQLite
        return None
    return Path(url.database)


def check_database_location(url_or_path: str, *, must_exist: bool = False) -> None:
    """Refuse a SQLite database that cannot be opened where it is, before connecting.

    Raises :class:`~agentmesh.errors.ConfigurationError` naming the problem if
    the file's directory does not exist or is not a directory, or if
    ``must_exist`` and the file does not exist (SQLite would create an empty
    one). Does nothing for other databases, and for an invalid URL raises as
    :func:`resolve_db_url` does.
    """
    path = sqlite_path(url_or_path)
    if path is None:
        return
    folder = path.parent
    if not folder.exists():
        raise ConfigurationError(
            f"the directory {folder} of the hub database {path} does not exist; "
            "create it, or pass another --db"
        )
    if not folder.is_dir():
        raise ConfigurationError(f"{folder}, the folder of the hub database {path}, is not one")
    if path.is_dir():
        raise ConfigurationError(f"the hub database {path} is a directory, not a file")
    if must_exist and not path.exists():
        raise ConfigurationError(
            f"there is no hub database at {path}; check --db (or {DB_ENV_VAR}), or create "
            "it with `agentmesh-hub migrate`"
        )


def _enable_wal(cursor: Any, busy_timeout_ms: int) -> None:
    """Switch a SQLite database to WAL mode (persistent, so usually already done).

    The switch needs an exclusive lock and SQLite does not always run the busy
    handler for it, so several hubs opening a new file at once can see "database
    is locked": retry until ``busy_timeout_ms`` has passed.
    """
    mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
    if str(mode).lower() in ("wal", "memory"):
        return
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as exc:
            text_ = str(exc).lower()
            if ("locked" not in text_ and "busy" not in text_) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _sqlite_pragma(conn: Connection, pragma: str) -> None:
    """Run a PRAGMA outside any transaction (foreign_keys is a no-op inside one)."""
    driver_connection = conn.connection.driver_connection
    assert driver_connection is not None
    driver_connection.execute(pragma)


@contextmanager
def migration_transaction(engine: Engine) -> Iterator[Connection]:
    """Yield a connection inside the one write transaction migrations run in.

    It holds the database's write lock for its whole duration (``BEGIN
    IMMEDIATE`` on SQLite, ``pg_advisory_xact_lock`` on PostgreSQL), so two hubs
    starting at once migrate one after the other. On SQLite, foreign keys are off
    inside it (batch-mode table rebuilds must not cascade) and checked with
    ``PRAGMA foreign_key_check`` before the commit; a violation raises
    :class:`~agentmesh.errors.ConfigurationError` and rolls everything back.
    Commits when the block ends without an exception.
    """
    with engine.connect() as conn:
        is_sqlite = conn.dialect.name == "sqlite"
        if is_sqlite:
            _sqlite_pragma(conn, "PRAGMA foreign_keys = OFF")
        try:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                    )
                yield conn
                if is_sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise ConfigurationError(
                            f"migration left {len(broken)} foreign-key violations "
                            f"(first: {tuple(broken[0])}); rolled back"
                        )
        finally:
            if is_sqlite and not conn.invalidated:
                _sqlite_pragma(conn, "PRAGMA foreign_keys = ON")


def migrations_dir() -> Path:
    """The directory of the Alembic environment (``env.py``, ``versions/``).

    It is the package ``agentmesh.migrations`` when installed (also editable),
    else ``migrations/`` at the root of the source checkout. Raises
    :class:`~agentmesh.errors.ConfigurationError` if neither exists.
    """
    candidates: list[Path] = []
    try:
        resource = importlib.resources.files("agentmesh.migrations")
    except ModuleNotFoundError:
        pass
    else:
        if isinstance(resource, Path):
            candidates.append(resource)
    candidates.append(Path(__file__).resolve().parents[2] / "migrations")
    for candidate in candidates:
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    raise ConfigurationError(
        "AgentMesh migrations not found (looked for the package agentmesh.migrations "
        f"and {candidates[-1]}); reinstall AgentMesh"
    )


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_signing_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != SIGNING_KEY_LENGTH:
        raise InvalidKeyError(f"signing key must be {SIGNING_KEY_LENGTH} bytes")


def _identity_mismatch(agent_id: str) -> AuthFailedError:
    return AuthFailedError(
        "identity_mismatch", f"agent id {agent_id!r} is bound to another identity key"
    )


def _unknown_agent(agent_id: str) -> HubError:
    return HubError("unknown_agent", f"agent id {agent_id!r} is not bound on this hub")


_SchemaState = Literal["head", "behind", "empty"]


# --------------------------------------------------------------------------- the store


def _admit(
    batch: list[NewEnvelope],
    held: set[bytes],
    boxes: dict[str, list[int]],
    max_count: int,
    max_bytes: int,
) -> tuple[list[EnqueueResult | None], list[tuple[int, NewEnvelope]], dict[str, list[int]]]:
    """Decide each envelope of a batch: duplicate, unknown recipient, mailbox full, or admitted.

    ``held`` holds the message ids already stored; ``boxes`` maps each known
    recipient to its ``[count, bytes]`` counters. Both are updated as items are
    admitted, so quotas count earlier items of the same batch. Returns the
    results (None where admitted, to be filled with the stored seq), the
    admitted ``(position, envelope)`` pairs in batch order, and each
    recipient's ``[count, bytes]`` increase. The one place quotas are decided.
    """
    results: list[EnqueueResult | None] = []
    admitted: list[tuple[int, NewEnvelope]] = []
    added: dict[str, list[int]] = {}
    for position, item in enumerate(batch):
        if item.message_id in held:
            results.append(_DUPLICATE)
            continue
        box = boxes.get(item.recipient)
        if box is None:
            results.append(_UNKNOWN_RECIPIENT)
            continue
        size = len(item.body)
        if box[0] + 1 > max_count or box[1] + size > max_bytes:
            results.append(_MAILBOX_FULL)
            continue
        box[0] += 1
        box[1] += size
        delta = added.setdefault(item.recipient, [0, 0])
        delta[0] += 1
        delta[1] += size
        held.add(item.message_id)
        results.append(None)
        admitted.append((position, item))
    return results, admitted, added


#: One-time prekeys of each kind the hub keeps per agent (its pool is 100 of each):
#: the bound keeps one agent from filling the database with prekeys.
MAX_ONE_TIME_PREKEYS_PER_KIND = 1000


class HubStore:
    """The hub's durable state in one SQLite file or PostgreSQL database.

    ``url_or_path`` is a SQLAlchemy URL (``sqlite:///hub.sqlite``,
    ``postgresql+psycopg://user@host/db``) or a plain file path, meaning
    ``sqlite:///PATH``. ``synchronous`` (FULL, NORMAL or OFF) and
    ``busy_timeout_ms`` apply to SQLite only; FULL (the default) makes every
    commit survive power loss, NORMAL only a process crash.

    The constructor creates the engine and does not touch the database; call
    :meth:`ensure_schema` before anything else. Thread-safe: each call uses its
    own pooled connection and transaction. Raises
    :class:`~agentmesh.errors.ConfigurationError` for invalid settings.
    """

    def __init__(
        self, url_or_path: str, *, synchronous: str = "FULL", busy_timeout_ms: int = 5000
    ) -> None:
        self._engine = create_hub_engine(
            url_or_path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms
        )
        self._synchronous = str(synchronous).upper()

    # ------------------------------------------------------------------ plumbing

    @property
    def engine(self) -> Engine:
        """The underlying SQLAlchemy engine (for tooling and tests)."""
        return self._engine

    def __repr__(self) -> str:
        return f"HubStore({self._engine.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> HubStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close all pooled connections. The store must not be used afterwards."""
        self._engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    def _driver_writes(self) -> bool:
        """Whether the hot write paths run on the SQLite driver (see :meth:`_driver_write`)."""
        return _SQLITE_FAST and self._engine.dialect.name == "sqlite"

    @contextmanager
    def _driver_write(self, *, relaxed: bool = False) -> Iterator[sqlite3.Cursor]:
        """A write transaction straight on a pooled SQLite driver connection.

        The same ``BEGIN IMMEDIATE`` .. ``COMMIT`` as :meth:`_write`, without
        SQLAlchemy's per-transaction work (Connection, events, execution
        contexts), which costs more than the SQL itself when the hub's group
        commit holds one or a few envelopes. Driver errors are raised as
        SQLAlchemy's, as on the Core path; on any error the transaction is
        rolled back and nothing of it stays. ``relaxed``: this commit does not
        wait for the disk (``synchronous=NORMAL`` for it alone; it survives a
        crash of the process, and a power cut may undo it, never half of it).
        """
        pooled = self._engine.raw_connection()
        relax = relaxed and self._synchronous == "FULL"
        try:
            driver = pooled.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            cursor = driver.cursor()
            with _as_sqlalchemy_errors():
                if relax:
                    cursor.execute("PRAGMA synchronous = NORMAL")
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                    try:
                        yield cursor
                        cursor.execute("COMMIT")
                    except BaseException:
                        if driver.in_transaction:
                            driver.execute("ROLLBACK")
                        raise
                finally:
                    if relax:
                        cursor.execute("PRAGMA synchronous = FULL")
        finally:
            pooled.close()

    # ------------------------------------------------------------------ schema

    def _alembic_config(self, connection: Connection | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    def _schema_state(self, conn: Connection, script: ScriptDirectory) -> _SchemaState:
        current = set(MigrationContext.configure(conn).get_current_heads())
        known = {rev.revision for rev in script.walk_revisions()}
        unknown = sorted(current - known)
        if unknown:
            raise ConfigurationError(
                f"database is at revision {', '.join(unknown)} which this AgentMesh version "
                "does not know (it was written by a newer AgentMesh); upgrade AgentMesh"
            )
        if current == set(script.get_heads()):
            return "head"
        if current:
            return "behind"
        if inspect(conn).has_table(agents.name):
            raise ConfigurationError(
                "database has AgentMesh tables but no alembic_version table; "
                "run `alembic stamp <revision>` to record which revision it is at"
            )
        return "empty"

    def check_revision(self) -> None:
        """Check that the database schema is exactly the one this version uses.

        Raises :class:`~agentmesh.errors.ConfigurationError` if the database is at
        a revision this AgentMesh does not know ("upgrade AgentMesh"), if it is at
        an older revision or empty ("run `alembic upgrade head`"), or if it has
        hub tables but no Alembic version. Read-only.
        """
        script = ScriptDirectory.from_config(self._alembic_config())
        with self._read() as conn:
            state = self._schema_state(conn, script)
        if state != "head":
            raise ConfigurationError(
                f"database is not at head ({state}, expected revision "
                f"{', '.join(script.get_heads())}); run `agentmesh-hub migrate` "
                "(or `alembic upgrade head`, or HubStore.ensure_schema())"
            )

    def migrate(self) -> None:
        """Bring the database to the newest revision with the packaged migrations.

        Runs Alembic's ``upgrade head`` in one transaction holding the write lock
        (see :func:`migration_transaction`); a no-op at head. Raises
        :class:`~agentmesh.errors.ConfigurationError` for a database at an
        unknown (newer) revision or with hub tables but no Alembic version.
        """
        script = ScriptDirectory.from_config(self._alembic_config())
        with migration_transaction(self._engine) as conn:
            if self._schema_state(conn, script) != "head":
                command.upgrade(self._alembic_config(conn), "head")

    def ensure_schema(self) -> None:
        """Make the database usable by this version; the server calls this at start-up.

        A new or empty database is created at the newest revision, a database at
        a known older revision is upgraded, one at head is left alone (checked
        without taking the write lock). Raises
        :class:`~agentmesh.errors.ConfigurationError` for a database at a revision
        this AgentMesh does not know: upgrade AgentMesh instead.
        """
        script = ScriptDirectory.from_config(self._alembic_config())
        with self._read() as conn:
            state = self._schema_state(conn, script)
        if state != "head":
            self.migrate()

    # ------------------------------------------------------------------ identities

    def bind_agent(
        self,
        agent_id: str,
        signing_key: bytes,
        now_ms: int,
        *,
        ephemeral: bool = False,
        holder_live: bool = True,
    ) -> bool:
        """Bind ``agent_id`` to ``signing_key`` on first registration.

        Returns True if the id was unbound (or taken over, below) and is now bound
        to this key (its mailbox is created), False if it was already bound to
        this key (``last_seen_ms`` is updated). Safe against concurrent first
        registrations from other connections or processes: exactly one key wins.

        ``ephemeral``: the agent keeps no key file. Its binding is *ephemeral*: while
        ``holder_live`` is False (the caller knows of no live session of the id)
        and no hub holds an unexpired lease of it, another key may take the id
        over; the old key's bundle, one-time prekeys and queued envelopes (sealed
        for a key that no longer exists) are deleted with it. A binding made by an
        agent with a key file is permanent, and a permanent agent logging in with
        the same key makes its binding permanent.

        Raises :class:`~agentmesh.errors.AuthFailedError` (code
        ``identity_mismatch``) if the id is bound to a different key and cannot be
        taken over, :class:`~agentmesh.ids.InvalidAgentIdError` for an invalid id
        and :class:`~agentmesh.errors.InvalidKeyError` if the key is not 32 bytes.
        """
        validate_agent_id(agent_id)
        _check_signing_key(signing_key)
        for attempt in range(_RACE_RETRIES):
            try:
                with self._write() as conn:
                    current = conn.execute(
                        select(agents.c.signing_key, agents.c.ephemeral)
                        .where(agents.c.agent_id == agent_id)
                        .with_for_update()
                    ).one_or_none()
                    if current is None:
                        conn.execute(
                            insert(agents).values(
                                agent_id=agent_id,
                                signing_key=signing_key,
                                bundle=None,
                                created_at_ms=now_ms,
                                updated_at_ms=now_ms,
                                last_seen_ms=now_ms,
                                ephemeral=ephemeral,
                            )
                        )
                        conn.execute(
                            insert(mailboxes).values(recipient=agent_id, msg_count=0, byte_count=0)
                        )
                        return True
                    key, was_ephemeral = bytes(current[0]), bool(current[1])
                    if not hmac.compare_digest(key, signing_key):
                        # A live lease is a live session on some hub (several hubs).
                        if not was_ephemeral or holder_live or _leased(conn, agent_id, now_ms):
                            raise _identity_mismatch(agent_id)
                        self._take_over(conn, agent_id, signing_key, now_ms, ephemeral)
                        return True
                    values: dict[str, Any] = {"last_seen_ms": now_ms}
                    if was_ephemeral and not ephemeral:
                        values["ephemeral"] = False
                    conn.execute(
                        update(agents).where(agents.c.agent_id == agent_id).values(**values)
                    )
                    return False
            except IntegrityError:
                # Another connection bound the id between our read and insert:
                # start over and compare against its key.
                if attempt == _RACE_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _take_over(
        conn: Connection, agent_id: str, signing_key: bytes, now_ms: int, ephemeral: bool
    ) -> None:
        """Rebind an ephemeral id to a new key: nothing of the old key survives."""
        dropped = conn.execute(delete(envelopes).where(envelopes.c.recipient == agent_id))
        conn.execute(delete(one_time_prekeys).where(one_time_prekeys.c.agent_id == agent_id))
        conn.execute(
            update(mailboxes)
            .where(mailboxes.c.recipient == agent_id)
            .values(msg_count=0, byte_count=0)
        )
        conn.execute(
            update(agents)
            .where(agents.c.agent_id == agent_id)
            .values(
                signing_key=signing_key,
                bundle=None,
                created_at_ms=now_ms,
                updated_at_ms=now_ms,
                last_seen_ms=now_ms,
                ephemeral=ephemeral,
            )
        )
        logger.info(
            "ephemeral id %r taken over by a new key; %d queued envelopes for the old key dropped",
            agent_id,
            dropped.rowcount,
        )

    def agent_key(self, agent_id: str) -> bytes | None:
        """The Ed25519 key ``agent_id`` is bound to, or None if it is unbound."""
        with self._read() as conn:
            key = conn.scalar(select(agents.c.signing_key).where(agents.c.agent_id == agent_id))
        return None if key is None else bytes(key)

    def rotate_agent_key(self, agent_id: str, old_key: bytes, new_key: bytes, now_ms: int) -> None:
        """Rebind ``agent_id`` from ``old_key`` to ``new_key``.

        The caller has verified the rotation request's signature by ``old_key``;
        the store checks atomically (row locked) that the id is still bound to
        ``old_key`` before switching. Raises
        :class:`~agentmesh.errors.AuthFailedError` with code ``identity_mismatch``
        if it is bound to another key, ``unknown_agent`` if it is not bound, and
        :class:`~agentmesh.errors.InvalidKeyError` if a key is not 32 bytes.
        """
        _check_signing_key(old_key)
        _check_signing_key(new_key)
        with self._write() as conn:
            current = conn.scalar(
                select(agents.c.signing_key).where(agents.c.agent_id == agent_id).with_for_update()
            )
            if current is None:
                raise AuthFailedError("unknown_agent", f"agent id {agent_id!r} is not bound")
            if not hmac.compare_digest(bytes(current), old_key):
                raise _identity_mismatch(agent_id)
            conn.execute(
                update(agents)
                .where(agents.c.agent_id == agent_id)
                .values(signing_key=new_key, updated_at_ms=now_ms, last_seen_ms=now_ms)
            )

    def list_agents(self) -> list[str]:
        """All bound agent ids, sorted by code point (the same on every database)."""
        with self._read() as conn:
            return sorted(conn.scalars(select(agents.c.agent_id)))

    # ------------------------------------------------------------------ prekeys

    def publish_bundle(self, agent_id: str, bundle: bytes, now_ms: int) -> None:
        """Store ``bundle`` (the signed prekey bundle blob) as the agent's current one.

        Replaces any earlier bundle. Raises :class:`~agentmesh.errors.HubError`
        with code ``unknown_agent`` if the id is not bound.
        """
        if not isinstance(bundle, bytes):
            raise LocalProtocolError("bundle must be bytes")
        with self._write() as conn:
            result = conn.execute(
                update(agents)
                .where(agents.c.agent_id == agent_id)
                .values(bundle=bundle, updated_at_ms=now_ms)
            )
            if result.rowcount != 1:
                raise _unknown_agent(agent_id)

    def add_one_time_prekeys(self, agent_id: str, items: list[tuple[int, int, bytes]]) -> int:
        """Store one-time prekeys; each item is ``(kind, prekey_id, blob)``.

        ``kind`` is 1 (X25519) or 2 (ML-KEM-768). A ``(kind, prekey_id)`` already
        stored (or repeated in ``items``) is ignored, so re-uploading after a lost
        reply is harmless. Returns how many one-time prekeys (all kinds) are now
        stored for the agent. Raises :class:`~agentmesh.errors.LocalProtocolError`
        for an unknown kind or a non-bytes blob and
        :class:`~agentmesh.errors.HubError` (``unknown_agent``) if the id is not bound.
        """
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        for kind, prekey_id, blob in items:
            if kind not in _KINDS:
                raise LocalProtocolError(f"unknown one-time prekey kind {kind!r}")
            if not isinstance(blob, bytes):
                raise LocalProtocolError("one-time prekey blob must be bytes")
            rows.setdefault(
                (kind, prekey_id),
                {"agent_id": agent_id, "kind": kind, "prekey_id": prekey_id, "blob": blob},
            )
        with self._write() as conn:
            exists = conn.scalar(select(agents.c.agent_id).where(agents.c.agent_id == agent_id))
            if exists is None:
                raise _unknown_agent(agent_id)
            if rows:
                self._check_prekey_room(conn, agent_id, rows)
                self._insert_prekeys_ignoring_duplicates(conn, agent_id, list(rows.values()))
            count = conn.scalar(
                select(func.count())
                .select_from(one_time_prekeys)
                .where(one_time_prekeys.c.agent_id == agent_id)
            )
        return int(count or 0)

    @staticmethod
    def _check_prekey_room(
        conn: Connection, agent_id: str, rows: dict[tuple[int, int], dict[str, Any]]
    ) -> None:
        """Refuse an upload that would leave more than MAX_ONE_TIME_PREKEYS_PER_KIND of a kind."""
        for kind in {k for k, _ in rows}:
            stored = conn.scalar(
                select(func.count())
                .select_from(one_time_prekeys)
                .where(one_time_prekeys.c.agent_id == agent_id, one_time_prekeys.c.kind == kind)
            )
            adding = sum(1 for k, _ in rows if k == kind)
            if int(stored or 0) + adding > MAX_ONE_TIME_PREKEYS_PER_KIND:
                raise HubError(
                    "too_many_prekeys",
                    f"an agent may hold at most {MAX_ONE_TIME_PREKEYS_PER_KIND} one-time "
                    "prekeys of each kind on the hub",
                )

    @staticmethod
    def _insert_prekeys_ignoring_duplicates(
        conn: Connection, agent_id: str, rows: list[dict[str, Any]]
    ) -> None:
        name = conn.dialect.name
        if name == "sqlite":
            conn.execute(sqlite_insert(one_time_prekeys).on_conflict_do_nothing(), rows)
        elif name == "postgresql":
            conn.execute(pg_insert(one_time_prekeys).on_conflict_do_nothing(), rows)
        else:  # pragma: no cover - other dialects: check, then insert the new ones
            held = set(
                conn.execute(
                    select(one_time_prekeys.c.kind, one_time_prekeys.c.prekey_id).where(
                        one_time_prekeys.c.agent_id == agent_id
                    )
                )
            )
            fresh = [row for row in rows if (row["kind"], row["prekey_id"]) not in held]
            if fresh:
                conn.execute(insert(one_time_prekeys), fresh)

    def fetch_bundle(self, agent_id: str, now_ms: int) -> FetchedBundle | None:
        """The agent's bundle with at most one one-time prekey of each kind.

        In one transaction: reads the bundle, then deletes and returns the one-time
        prekey with the lowest ``prekey_id`` of each kind, so each one-time prekey
        is handed out at most once, also to concurrent callers (SQLite: write
        lock; PostgreSQL: ``FOR UPDATE SKIP LOCKED``). Returns None if the agent
        is unknown or has not published a bundle (then nothing is consumed).
        ``now_ms`` is accepted for the uniform clock API and not used yet.
        """
        del now_ms
        with self._write() as conn:
            bundle = conn.scalar(select(agents.c.bundle).where(agents.c.agent_id == agent_id))
            if bundle is None:
                return None
            taken = {kind: self._take_one_time_prekey(conn, agent_id, kind) for kind in _KINDS}
            remaining: dict[int, int] = {
                int(kind): int(count)
                for kind, count in conn.execute(
                    select(one_time_prekeys.c.kind, func.count())
                    .where(one_time_prekeys.c.agent_id == agent_id)
                    .group_by(one_time_prekeys.c.kind)
                )
            }
        return FetchedBundle(
            bundle=bytes(bundle),
            one_time_x25519=taken[KIND_X25519],
            one_time_kem=taken[KIND_KEM],
            remaining_x25519=remaining.get(KIND_X25519, 0),
            remaining_kem=remaining.get(KIND_KEM, 0),
        )

    @staticmethod
    def _take_one_time_prekey(conn: Connection, agent_id: str, kind: int) -> bytes | None:
        table = one_time_prekeys
        pick = (
            select(table.c.prekey_id, table.c.blob)
            .where(table.c.agent_id == agent_id, table.c.kind == kind)
            .order_by(table.c.prekey_id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        for _ in range(_RACE_RETRIES):
            row = conn.execute(pick).first()
            if row is None:
                return None
            gone = conn.execute(
                delete(table).where(
                    table.c.agent_id == agent_id,
                    table.c.kind == kind,
                    table.c.prekey_id == row.prekey_id,
                )
            )
            if gone.rowcount == 1:
                return bytes(row.blob)
            # Someone else took it between our read and delete: take the next one.
        return None

    # ------------------------------------------------------------------ envelopes

    def enqueue(
        self,
        batch: list[NewEnvelope],
        *,
        now_ms: int,
        max_count_per_recipient: int,
        max_bytes_per_recipient: int,
        acks: dict[str, list[bytes]] | None = None,
        notify_from: str | None = None,
        notify_for: Collection[str] | None = None,
        durable: bool = True,
    ) -> list[EnqueueResult]:
        """Queue a batch of envelopes in ONE transaction (group commit).

        ``durable=False`` (SQLite; elsewhere it is ignored): the commit survives a
        crash of the process but not a power cut until :meth:`sync` (or any durable
        commit) ran. For a caller that hands the envelopes to their recipient at
        once and syncs when it could not (LocalHub).

        ``notify_from`` (PostgreSQL): the hub id to name in the ``m HUB AGENT``
        notification sent, at the commit, for each recipient that got mail
        (only those in ``notify_for``, if given: the caller knows where the
        others are served).

        ``acks`` (``{recipient: message ids}``, as for :meth:`ack_many`) are
        deleted in the same transaction, before the batch is stored, so the
        deletes cost no commit of their own.

        Returns one :class:`EnqueueResult` per item, in order:

        * ``stored`` with its ``seq``;
        * ``duplicate``: an envelope with this message id is already queued (or
          appears earlier in this batch); it is not stored twice;
        * ``mailbox_full``: storing it would take the recipient above
          ``max_count_per_recipient`` envelopes or ``max_bytes_per_recipient``
          body bytes, counting what is queued plus earlier items of the batch;
        * ``unknown_recipient``: the recipient id was never bound.

        One item's outcome never fails the others. Quota checks use the
        per-recipient counters (O(batch), not O(mailbox)). When this returns, the
        stored items are committed. Items of one batch for one recipient get
        increasing ``seq`` in batch order. An item already past ``expires_at_ms``
        is stored like any other (and then skipped by :meth:`pending` and removed
        by :meth:`purge_expired`); the caller may refuse such items beforehand.
        A concurrent enqueue of the same message id from another connection is
        retried and reported as duplicate; a transaction PostgreSQL aborted as a
        deadlock or serialisation victim is run again.
        """
        work = _ack_work(acks or {})
        if not batch and not work:
            return []
        for attempt in range(_RACE_RETRIES):
            try:
                if self._driver_writes():
                    with self._driver_write(relaxed=not durable) as cursor:
                        _ack_sqlite_all(cursor, work)
                        return _enqueue_sqlite(
                            cursor, batch, now_ms, max_count_per_recipient, max_bytes_per_recipient
                        )
                with self._write() as conn:
                    if work:  # (without acks, _enqueue's sorted lock comes first)
                        # Every mailbox row this transaction updates, locked in one
                        # sorted pass before any is updated (see _lock_mailboxes).
                        _lock_mailboxes(conn, {*work, *(item.recipient for item in batch)})
                    self._ack_in(conn, work, locked=True)
                    if not batch:
                        return []
                    results = self._enqueue(
                        conn, batch, now_ms, max_count_per_recipient, max_bytes_per_recipient
                    )
                    if notify_from is not None and conn.dialect.name == "postgresql":
                        stored = sorted(
                            {
                                item.recipient
                                for item, result in zip(batch, results, strict=True)
                                if result.status is EnqueueStatus.STORED
                                and (notify_for is None or item.recipient in notify_for)
                            }
                        )
                        _notify(conn, [f"m {notify_from} {recipient}" for recipient in stored])
                    return results
            except IntegrityError:
                if attempt == _RACE_RETRIES - 1:
                    raise
            except OperationalError as exc:
                if not _transient(exc) or attempt == _RACE_RETRIES - 1:
                    raise
                logger.warning("group commit aborted by the database (%s); retrying", exc.orig)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _enqueue(
        conn: Connection,
        batch: list[NewEnvelope],
        now_ms: int,
        max_count: int,
        max_bytes: int,
    ) -> list[EnqueueResult]:
        # Lock the recipients' counters (sorted, so concurrent batches cannot deadlock).
        boxes: dict[str, list[int]] = {}
        recipients = sorted({item.recipient for item in batch})
        for chunk in _chunks(recipients):
            for recipient, count, size in conn.execute(
                select(mailboxes.c.recipient, mailboxes.c.msg_count, mailboxes.c.byte_count)
                .where(mailboxes.c.recipient.in_(chunk))
                .order_by(mailboxes.c.recipient)
                .with_for_update()
            ):
                boxes[recipient] = [int(count), int(size)]

        held: set[bytes] = set()
        message_ids = list({item.message_id for item in batch})
        for id_chunk in _chunks(message_ids):
            held.update(
                bytes(mid)
                for mid in conn.scalars(
                    select(envelopes.c.message_id).where(envelopes.c.message_id.in_(id_chunk))
                )
            )

        # Under the counters' locks: the recipients' highest seqs so far (see "Cursors").
        last_seq: dict[str, int] | None = None
        if conn.dialect.name != "sqlite":
            last_seq = {}
            newest = (
                select(func.max(envelopes.c.seq))
                .where(envelopes.c.recipient == mailboxes.c.recipient)
                .scalar_subquery()
            )
            for chunk in _chunks(sorted(boxes)):
                for recipient, seq in conn.execute(
                    select(mailboxes.c.recipient, newest).where(mailboxes.c.recipient.in_(chunk))
                ):
                    last_seq[recipient] = int(seq or 0)

        results, admitted, added = _admit(batch, held, boxes, max_count, max_bytes)
        rows: list[dict[str, Any]] = [
            {
                "message_id": item.message_id,
                "sender": item.sender,
                "recipient": item.recipient,
                "body": item.body,
                "size": len(item.body),
                "created_at_ms": now_ms,
                "expires_at_ms": item.expires_at_ms,
            }
            for _, item in admitted
        ]

        if rows:
            seqs = conn.scalars(
                insert(envelopes).returning(envelopes.c.seq, sort_by_parameter_order=True), rows
            ).all()
            for (position, item), seq in zip(admitted, seqs, strict=True):
                prev: int | None = None
                if last_seq is not None:
                    prev = last_seq.get(item.recipient, 0)
                    last_seq[item.recipient] = int(seq)
                results[position] = EnqueueResult(EnqueueStatus.STORED, int(seq), prev)
            _add_to_counters(conn, added)

        final: list[EnqueueResult] = []
        for result in results:
            assert result is not None
            final.append(result)
        return final

    def pending(
        self, recipient: str, *, after_seq: int = 0, limit: int = 500, now_ms: int
    ) -> list[StoredEnvelope]:
        """Up to ``limit`` queued envelopes for ``recipient`` with ``seq > after_seq``.

        In ``seq`` (FIFO) order; envelopes whose ``expires_at_ms <= now_ms`` are
        skipped. Nothing is removed: the recipient acknowledges with :meth:`ack`.
        Returns an empty list for an unknown recipient or ``limit <= 0``.
        """
        if limit <= 0:
            return []
        query = (
            select(
                envelopes.c.seq,
                envelopes.c.message_id,
                envelopes.c.sender,
                envelopes.c.recipient,
                envelopes.c.body,
            )
            .where(
                envelopes.c.recipient == recipient,
                envelopes.c.seq > after_seq,
                envelopes.c.expires_at_ms > now_ms,
            )
            .order_by(envelopes.c.seq)
            .limit(limit)
        )
        with self._read() as conn:
            return [
                StoredEnvelope(int(seq), bytes(mid), sender, rcpt, bytes(body))
                for seq, mid, sender, rcpt, body in conn.execute(query)
            ]

    def sync(self) -> None:
        """Make every commit so far survive a power cut (those of ``durable=False``).

        SQLite: an fdatasync of the WAL file, where committed frames live until a
        checkpoint. Other databases: nothing to do, their commits here are durable.
        """
        if self._engine.dialect.name != "sqlite" or self._synchronous != "FULL":
            return
        database = self._engine.url.database
        if not database or database == ":memory:":
            return
        try:
            fd = os.open(f"{database}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed and truncated: everything is in the synced main file
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def ack(self, recipient: str, message_ids: list[bytes], *, durable: bool = True) -> int:
        """Delete ``recipient``'s envelopes with these message ids, in one transaction.

        Only envelopes addressed to ``recipient`` are deleted (an agent cannot
        delete others' mail); unknown ids are ignored. Updates the counters and
        returns how many envelopes were deleted. ``durable``: see :meth:`ack_many`.
        """
        return self.ack_many({recipient: message_ids}, durable=durable)

    def ack_many(self, acks: dict[str, list[bytes]], *, durable: bool = True) -> int:
        """:meth:`ack` for several recipients (``{recipient: message ids}``), in ONE transaction.

        ``durable=False``: the commit does not wait for the disk (SQLite's
        ``synchronous=NORMAL``, PostgreSQL's ``synchronous_commit = off`` for this
        transaction). A deletion needs no more: should a power cut undo it, the
        envelopes are delivered again, and their recipient drops them as duplicates
        (its replay records are durable before it acknowledges).
        """
        work = _ack_work(acks)
        if not work:
            return 0
        if self._driver_writes():
            with self._driver_write(relaxed=not durable) as cursor:
                return _ack_sqlite_all(cursor, work)
        with self._write() as conn:
            if not durable and conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            return self._ack_in(conn, work)

    @staticmethod
    def _ack_in(conn: Connection, work: dict[str, list[bytes]], *, locked: bool = False) -> int:
        """Delete acknowledged envelopes inside the caller's write transaction (Core);
        ``locked``: the caller already locked these recipients' mailbox rows."""
        deleted = 0
        if not locked:
            _lock_mailboxes(conn, work)
        for recipient, ids in sorted(work.items()):
            gone = 0
            freed = 0
            for chunk in _chunks(ids):
                sizes = _delete_returning_sizes(
                    conn,
                    and_(envelopes.c.recipient == recipient, envelopes.c.message_id.in_(chunk)),
                )
                gone += len(sizes)
                freed += sum(size for _, size in sizes)
            if gone:
                _add_to_counters(conn, {recipient: [-gone, -freed]})
            deleted += gone
        return deleted

    def purge_expired(self, now_ms: int, limit: int = 10000) -> int:
        """Delete up to ``limit`` envelopes with ``expires_at_ms <= now_ms``, oldest expiry first.

        Updates the counters in the same transaction and returns how many were
        deleted; call again while it returns ``limit``.
        """
        if limit <= 0:
            return 0
        victims: Select[Any] = (
            select(envelopes.c.seq)
            .where(envelopes.c.expires_at_ms <= now_ms)
            .order_by(envelopes.c.expires_at_ms, envelopes.c.seq)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self._write() as conn:
            if conn.dialect.name != "sqlite":  # mailboxes first, as every writer
                due = select(envelopes.c.recipient).where(envelopes.c.expires_at_ms <= now_ms)
                _lock_mailboxes(conn, set(conn.scalars(due.distinct())))
            rows = _delete_returning_sizes(conn, envelopes.c.seq.in_(victims))
            freed: dict[str, list[int]] = {}
            for recipient, size in rows:
                entry = freed.setdefault(recipient, [0, 0])
                entry[0] -= 1
                entry[1] -= size
            _add_to_counters(conn, freed)
        return len(rows)

    def recipients_with_mail(self, cursors: dict[str, int], *, now_ms: int) -> set[str]:
        """Which of ``cursors``' agents have an unexpired envelope with ``seq`` above
        their cursor (``{agent: cursor}``): the periodic catch-up's one query."""
        found: set[str] = set()
        items = sorted(cursors.items())
        for chunk in _chunks(items):
            newest = (
                select(envelopes.c.recipient, func.max(envelopes.c.seq))
                .where(
                    envelopes.c.recipient.in_([recipient for recipient, _ in chunk]),
                    envelopes.c.expires_at_ms > now_ms,
                )
                .group_by(envelopes.c.recipient)
            )
            with self._read() as conn:
                for recipient, seq in conn.execute(newest):
                    if int(seq) > cursors[recipient]:
                        found.add(recipient)
        return found

    # ------------------------------------------------------------------ leases

    @property
    def shared(self) -> bool:
        """Whether several hubs may share this database (PostgreSQL: leases and NOTIFY)."""
        return self._engine.dialect.name == "postgresql"

    def claim_lease(
        self, agent_id: str, hub_id: str, session_id: int, *, now_ms: int, ttl_ms: int
    ) -> LeaseClaim:
        """Make ``(hub_id, session_id)`` the holder of ``agent_id``'s live session.

        Granted if nobody holds the lease, it has expired, or ``hub_id`` holds
        it (a newer connection of the same hub replaces the older, which that
        hub closes itself); the lease then runs until ``now_ms + ttl_ms``.
        Otherwise nothing changes, the holder is named in the result and, on
        PostgreSQL, asked to let go (``r HUB AGENT``, at the commit).
        """
        for attempt in range(_RACE_RETRIES):
            try:
                with self._write() as conn:
                    row = conn.execute(
                        select(agent_leases.c.hub_id, agent_leases.c.expires_at_ms)
                        .where(agent_leases.c.agent_id == agent_id)
                        .with_for_update()
                    ).first()
                    until = now_ms + ttl_ms
                    values = {"hub_id": hub_id, "session_id": session_id, "expires_at_ms": until}
                    if row is None:
                        conn.execute(insert(agent_leases).values(agent_id=agent_id, **values))
                    elif row.hub_id == hub_id or int(row.expires_at_ms) <= now_ms:
                        conn.execute(
                            update(agent_leases)
                            .where(agent_leases.c.agent_id == agent_id)
                            .values(**values)
                        )
                    else:
                        if conn.dialect.name == "postgresql":
                            _notify(conn, [f"r {row.hub_id} {agent_id}"])
                        return LeaseClaim(False, row.hub_id, int(row.expires_at_ms))
                    return LeaseClaim(True, hub_id, until)
            except IntegrityError:
                # Another hub inserted the lease between our read and insert.
                if attempt == _RACE_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def renew_leases(
        self, hub_id: str, sessions: dict[str, int], *, now_ms: int, ttl_ms: int
    ) -> set[str]:
        """Extend to ``now_ms + ttl_ms`` the leases ``hub_id`` holds for ``sessions``
        (``{agent: session_id}``); return the agents whose lease it no longer holds."""
        held: set[str] = set()
        with self._write() as conn:
            for chunk in _chunks(sorted(sessions)):  # sorted: one lock order for all hubs
                # Only this hub's rows: a newer session of the same hub is extended
                # too (harmless, the hub closes the older one itself).
                renewed = conn.execute(
                    update(agent_leases)
                    .where(agent_leases.c.hub_id == hub_id, agent_leases.c.agent_id.in_(chunk))
                    .values(expires_at_ms=now_ms + ttl_ms)
                    .returning(agent_leases.c.agent_id, agent_leases.c.session_id)
                )
                held.update(
                    agent_id for agent_id, session_id in renewed if sessions[agent_id] == session_id
                )
        return set(sessions) - held

    def release_lease(self, agent_id: str, hub_id: str, session_id: int | None = None) -> bool:
        """Give up ``agent_id``'s lease if ``hub_id`` (and ``session_id``, if given) holds
        it; on PostgreSQL tell the other hubs (``f AGENT``). Returns whether it did."""
        where = [agent_leases.c.agent_id == agent_id, agent_leases.c.hub_id == hub_id]
        if session_id is not None:
            where.append(agent_leases.c.session_id == session_id)
        with self._write() as conn:
            gone = conn.execute(delete(agent_leases).where(*where)).rowcount == 1
            if gone and conn.dialect.name == "postgresql":
                _notify(conn, [f"f {agent_id}"])
        return gone

    def release_hub_leases(self, hub_id: str) -> int:
        """Give up every lease ``hub_id`` holds (a hub starting again after a crash
        frees what its previous run held); returns how many."""
        with self._write() as conn:
            agents_freed = list(
                conn.scalars(select(agent_leases.c.agent_id).where(agent_leases.c.hub_id == hub_id))
            )
            conn.execute(delete(agent_leases).where(agent_leases.c.hub_id == hub_id))
            if agents_freed and conn.dialect.name == "postgresql":
                _notify(conn, [f"f {agent_id}" for agent_id in agents_freed])
        return len(agents_freed)

    def lease_holder(self, agent_id: str) -> tuple[str, int, int] | None:
        """``(hub_id, session_id, expires_at_ms)`` of ``agent_id``'s lease, or None."""
        with self._read() as conn:
            row = conn.execute(
                select(
                    agent_leases.c.hub_id, agent_leases.c.session_id, agent_leases.c.expires_at_ms
                ).where(agent_leases.c.agent_id == agent_id)
            ).first()
        return None if row is None else (row.hub_id, int(row.session_id), int(row.expires_at_ms))

    def listen(
        self,
        on_notify: Callable[[str], None],
        on_connected: Callable[[], None],
        *,
        name: str = "agentmesh-hub-listener",
    ) -> HubListener:
        """A (not yet started) :class:`HubListener` on this PostgreSQL database.

        Raises :class:`~agentmesh.errors.ConfigurationError` on SQLite or without
        the psycopg 3 driver (a URL may name another driver, e.g. psycopg2)."""
        if not self.shared:
            raise ConfigurationError("LISTEN/NOTIFY needs PostgreSQL")
        if importlib.util.find_spec("psycopg") is None:
            raise ConfigurationError(
                "LISTEN needs the psycopg 3 driver: pip install 'agentmesh[postgres]'"
            )
        url = self._engine.url.set(drivername="postgresql")
        return HubListener(
            url.render_as_string(hide_password=False), on_notify, on_connected, name=name
        )

    def queued_count(self, recipient: str | None = None) -> int:
        """Envelopes queued for ``recipient``, or for everyone if None.

        Read from the counters, so it includes expired envelopes not yet purged.
        """
        query = select(func.coalesce(func.sum(mailboxes.c.msg_count), 0))
        if recipient is not None:
            query = query.where(mailboxes.c.recipient == recipient)
        with self._read() as conn:
            return int(conn.scalar(query) or 0)

    def stats(self) -> dict[str, int]:
        """``{"agents": bound ids, "envelopes": queued envelopes, "bytes": queued body bytes}``."""
        with self._read() as conn:
            agent_count = conn.scalar(select(func.count()).select_from(agents))
            count, size = conn.execute(
                select(
                    func.coalesce(func.sum(mailboxes.c.msg_count), 0),
                    func.coalesce(func.sum(mailboxes.c.byte_count), 0),
                )
            ).one()
        return {"agents": int(agent_count or 0), "envelopes": int(count), "bytes": int(size)}

    # ------------------------------------------------------------------ operations
    #
    # For `agentmesh-hub admin`, `agentmesh-hub migrate` and the health check: read
    # mostly, outside the hot paths, each in one transaction like everything above.

    def schema_revisions(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(current, head)``: the database's Alembic revisions and this version's heads.

        ``current`` is empty for a database that was never migrated. Read-only.
        """
        script = ScriptDirectory.from_config(self._alembic_config())
        with self._read() as conn:
            current = MigrationContext.configure(conn).get_current_heads()
        return tuple(sorted(current)), tuple(sorted(script.get_heads()))

    def ping(self) -> None:
        """Read one row of the hub's tables; raises if the database cannot serve the hub.

        The health check of ``/healthz``: it succeeds when a connection can be made
        (or reused) and the schema can be read, and raises
        :class:`sqlalchemy.exc.SQLAlchemyError` otherwise.
        """
        with self._read() as conn:
            conn.execute(select(mailboxes.c.recipient).limit(1)).all()

    def agent_records(self) -> list[AgentRecord]:
        """Every bound agent with its queue and prekey counts, sorted by id (code point)."""
        prekeys = (
            select(one_time_prekeys.c.agent_id, func.count().label("n"))
            .group_by(one_time_prekeys.c.agent_id)
            .subquery()
        )
        query = select(
            agents.c.agent_id,
            agents.c.signing_key,
            agents.c.created_at_ms,
            agents.c.last_seen_ms,
            agents.c.bundle.is_not(None),
            func.coalesce(mailboxes.c.msg_count, 0),
            func.coalesce(mailboxes.c.byte_count, 0),
            func.coalesce(prekeys.c.n, 0),
        ).select_from(
            agents.outerjoin(mailboxes, mailboxes.c.recipient == agents.c.agent_id).outerjoin(
                prekeys, prekeys.c.agent_id == agents.c.agent_id
            )
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        records = [
            AgentRecord(
                agent_id=row[0],
                signing_key=bytes(row[1]),
                created_at_ms=int(row[2]),
                last_seen_ms=int(row[3]),
                has_bundle=bool(row[4]),
                queued_messages=int(row[5]),
                queued_bytes=int(row[6]),
                one_time_prekeys=int(row[7]),
            )
            for row in rows
        ]
        return sorted(records, key=lambda record: record.agent_id)

    def store_stats(self, now_ms: int) -> StoreStats:
        """Counts of the whole database, in one read transaction (see :class:`StoreStats`)."""
        with self._read() as conn:
            agent_count = conn.scalar(select(func.count()).select_from(agents))
            count, size = conn.execute(
                select(
                    func.coalesce(func.sum(mailboxes.c.msg_count), 0),
                    func.coalesce(func.sum(mailboxes.c.byte_count), 0),
                )
            ).one()
            expired = conn.scalar(
                select(func.count())
                .select_from(envelopes)
                .where(envelopes.c.expires_at_ms <= now_ms)
            )
            oldest = conn.scalar(select(func.min(envelopes.c.created_at_ms)))
            prekey_count = conn.scalar(select(func.count()).select_from(one_time_prekeys))
        return StoreStats(
            agents=int(agent_count or 0),
            envelopes=int(count),
            bytes=int(size),
            expired=int(expired or 0),
            oldest_envelope_ms=None if oldest is None else int(oldest),
            one_time_prekeys=int(prekey_count or 0),
        )

    def unbind_agent(self, agent_id: str) -> int | None:
        """Release ``agent_id``: delete its binding, bundle, prekeys and queued mail.

        The operator's recovery after a lost key: the next login with any key
        binds the id afresh (and peers that pinned the old key see an identity
        change). Envelopes the agent *sent* stay queued for their recipients.
        Returns how many envelopes queued for the agent were dropped, or None if
        the id was not bound (then nothing changes). One transaction; the agent
        row is locked first, so a concurrent login either happened before (and
        is undone) or binds afresh after.
        """
        with self._write() as conn:
            found = conn.scalar(
                select(agents.c.agent_id).where(agents.c.agent_id == agent_id).with_for_update()
            )
            if found is None:
                return None
            dropped = conn.execute(delete(envelopes).where(envelopes.c.recipient == agent_id))
            conn.execute(delete(one_time_prekeys).where(one_time_prekeys.c.agent_id == agent_id))
            conn.execute(delete(mailboxes).where(mailboxes.c.recipient == agent_id))
            conn.execute(delete(agents).where(agents.c.agent_id == agent_id))
        return int(dropped.rowcount)


def _leased(conn: Connection, agent_id: str, now_ms: int) -> bool:
    """Whether some hub holds an unexpired lease of ``agent_id`` (a live session)."""
    until = conn.scalar(
        select(agent_leases.c.expires_at_ms).where(agent_leases.c.agent_id == agent_id)
    )
    return until is not None and int(until) > now_ms


def _notify(conn: Connection, payloads: Sequence[str]) -> None:
    """NOTIFY the hubs (PostgreSQL; delivered when the transaction commits)."""
    if payloads:
        conn.execute(
            text(
                "SELECT pg_notify(:channel, payload) "
                "FROM unnest(CAST(:payloads AS text[])) AS payload"
            ),
            {"channel": NOTIFY_CHANNEL, "payloads": list(payloads)},
        )


@dataclass(frozen=True, slots=True)
class LeaseClaim:
    """What :meth:`HubStore.claim_lease` found: granted, or who holds it until when."""

    granted: bool
    hub_id: str
    expires_at_ms: int


class HubListener:
    """``LISTEN agentmesh`` on its own PostgreSQL connection, in its own thread.

    The thread (named ``name``) is started by :meth:`start` and stopped by
    :meth:`close`, both called by its one owner, the hub server. Each
    notification's payload goes to ``on_notify`` (from the listener thread:
    the callback must only hand it over, e.g. with ``call_soon_threadsafe``).
    ``on_connected`` runs after each (re)connection, once LISTEN is in place:
    notifications sent while the listener was away are lost, so the owner
    catches up from the table then. A lost connection is retried with backoff
    (at most 2 s apart) until :meth:`close`.
    """

    def __init__(
        self,
        conninfo: str,
        on_notify: Callable[[str], None],
        on_connected: Callable[[], None],
        *,
        name: str,
    ) -> None:
        self._conninfo = conninfo
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (within about 0.2 s) and close its connection."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg  # the postgres extra; only a shared (PostgreSQL) hub gets here

        delay = 0.05
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="agentmesh-hub-listener",
                ) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.connected.set()
                    delay = 0.05
                    self._on_connected()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.2):
                            self._on_notify(note.payload)
            except Exception as exc:
                self.connected.clear()
                if self._stop.is_set():
                    break
                logger.warning("hub listener lost its database connection (%s); retrying", exc)
                self._stop.wait(delay)
                delay = min(2.0, delay * 2)
        self.connected.clear()


def _ack_work(acks: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
    """Acks by recipient (sorted, so concurrent writers lock in one order), ids deduplicated."""
    return {r: list(dict.fromkeys(ids)) for r, ids in sorted(acks.items()) if ids}


def _delete_returning_sizes(conn: Connection, where: Any) -> list[tuple[str, int]]:
    """Delete the envelopes matching ``where``; return (recipient, size) of each."""
    if conn.dialect.delete_returning:
        result = conn.execute(
            delete(envelopes).where(where).returning(envelopes.c.recipient, envelopes.c.size)
        )
        return [(recipient, int(size)) for recipient, size in result]
    # Without RETURNING (old SQLite): read, then delete exactly those rows. The
    # write transaction holds the lock, so nothing changes in between.
    found = conn.execute(
        select(envelopes.c.seq, envelopes.c.recipient, envelopes.c.size).where(where)
    ).all()
    seqs = [row.seq for row in found]
    for chunk in _chunks(seqs):
        conn.execute(delete(envelopes).where(envelopes.c.seq.in_(chunk)))
    return [(row.recipient, int(row.size)) for row in found]


def _transient(exc: OperationalError) -> bool:
    """Whether PostgreSQL aborted the transaction only to let another one through."""
    return getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES


def _lock_mailboxes(conn: Connection, recipients: Collection[str]) -> None:
    """Lock these recipients' ``mailboxes`` rows (PostgreSQL), in recipient order.

    Every write that updates mailbox rows takes them in this one order before it
    updates any. Without it, a group commit that deleted acknowledged envelopes of
    bob (locking bob's counters) and then queued mail for alice, against another
    hub's commit doing the opposite, deadlocked; PostgreSQL aborted one, and its
    SENDs were refused and re-sent by their agents behind later messages (issue
    13, ``tests/hub/test_multi_hub_store.py``). SQLite has one writer at a time.
    """
    if conn.dialect.name == "sqlite" or not recipients:
        return
    for chunk in _chunks(sorted(recipients)):
        conn.execute(
            select(mailboxes.c.recipient)
            .where(mailboxes.c.recipient.in_(chunk))
            .order_by(mailboxes.c.recipient)
            .with_for_update()
        ).all()


def _add_to_counters(conn: Connection, deltas: dict[str, list[int]]) -> None:
    """Add ``[count, bytes]`` deltas to the recipients' mailbox counters."""
    params = [
        {"b_recipient": recipient, "b_count": delta[0], "b_bytes": delta[1]}
        for recipient, delta in sorted(deltas.items())
        if delta[0] or delta[1]
    ]
    if not params:
        return
    conn.execute(
        update(mailboxes)
        .where(mailboxes.c.recipient == bindparam("b_recipient"))
        .values(
            msg_count=mailboxes.c.msg_count + bindparam("b_count"),
            byte_count=mailboxes.c.byte_count + bindparam("b_bytes"),
        ),
        params,
    )


# --------------------------------------------------------------------------- SQLite hot path
#
# enqueue() and ack() run for every envelope; on SQLite they skip SQLAlchemy's
# per-value bind and result processing and use the driver's cursor directly
# (executemany), inside the same transaction (BEGIN IMMEDIATE) as the Core path
# would. The SQL and the semantics are those of the Core statements above.

#: SQLite with RETURNING (3.35+); older versions take the portable Core path.
_SQLITE_FAST: Final = sqlite3.sqlite_version_info >= (3, 35, 0)
_INSERT_ENVELOPE_SQL: Final = (
    "INSERT INTO envelopes (message_id, sender, recipient, body, size, created_at_ms, "
    "expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_ADD_TO_COUNTERS_SQL: Final = (
    "UPDATE mailboxes SET msg_count = msg_count + ?, byte_count = byte_count + ? "
    "WHERE recipient = ?"
)


@contextmanager
def _as_sqlalchemy_errors() -> Iterator[None]:
    """Raise driver errors as SQLAlchemy's (what the Core path raises, and callers expect)."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        kind: type[DBAPIError] = DatabaseError
        if isinstance(exc, sqlite3.IntegrityError):
            kind = IntegrityError
        elif isinstance(exc, sqlite3.OperationalError):
            kind = OperationalError
        raise kind(None, None, exc) from exc


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _enqueue_sqlite(
    cur: sqlite3.Cursor, batch: list[NewEnvelope], now_ms: int, max_count: int, max_bytes: int
) -> list[EnqueueResult]:
    """:meth:`HubStore._enqueue` on the driver cursor (the write lock is held)."""
    boxes: dict[str, list[int]] = {}
    recipients = sorted({item.recipient for item in batch})
    for chunk in _chunks(recipients):
        for recipient, count, size in cur.execute(
            f"SELECT recipient, msg_count, byte_count FROM mailboxes "  # noqa: S608
            f"WHERE recipient IN ({_marks(len(chunk))})",
            chunk,
        ):
            boxes[recipient] = [int(count), int(size)]
    held: set[bytes] = set()
    message_ids = list({item.message_id for item in batch})
    for id_chunk in _chunks(message_ids):
        held.update(
            bytes(row[0])
            for row in cur.execute(
                f"SELECT message_id FROM envelopes "  # noqa: S608
                f"WHERE message_id IN ({_marks(len(id_chunk))})",
                id_chunk,
            )
        )
    results, admitted, added = _admit(batch, held, boxes, max_count, max_bytes)
    positions = [position for position, _ in admitted]
    rows: list[tuple[bytes, str, str, bytes, int, int, int]] = [
        (
            item.message_id,
            item.sender,
            item.recipient,
            item.body,
            len(item.body),
            now_ms,
            item.expires_at_ms,
        )
        for _, item in admitted
    ]
    if rows:
        cur.executemany(_INSERT_ENVELOPE_SQL, rows)
        # AUTOINCREMENT under the write lock gives one insert after another the
        # next seq (SQLAlchemy's own "sort by parameter order" relies on it too);
        # checked on the first and the last row all the same.
        last = int(cur.execute("SELECT last_insert_rowid()").fetchone()[0])
        first = last - len(rows) + 1
        ends = cur.execute(
            "SELECT seq, message_id FROM envelopes WHERE seq IN (?, ?)", (first, last)
        ).fetchall()
        found = {int(seq): bytes(mid) for seq, mid in ends}
        if found.get(first) != rows[0][0] or found.get(last) != rows[-1][0]:
            raise AssertionError("SQLite assigned envelope seqs out of order")  # pragma: no cover
        for offset, position in enumerate(positions):
            results[position] = EnqueueResult(EnqueueStatus.STORED, first + offset)
        cur.executemany(
            _ADD_TO_COUNTERS_SQL,
            [(delta[0], delta[1], recipient) for recipient, delta in sorted(added.items())],
        )
    final: list[EnqueueResult] = []
    for result in results:
        assert result is not None
        final.append(result)
    return final


def _ack_sqlite_all(cur: sqlite3.Cursor, work: dict[str, list[bytes]]) -> int:
    """:meth:`HubStore.ack_many` on the driver cursor (the write lock is held)."""
    return sum(_ack_sqlite(cur, recipient, ids) for recipient, ids in work.items())


def _ack_sqlite(cur: sqlite3.Cursor, recipient: str, ids: list[bytes]) -> int:
    """:meth:`HubStore.ack` on the driver cursor (the write lock is held)."""
    deleted = 0
    freed = 0
    for chunk in _chunks(ids):
        sizes = cur.execute(
            f"DELETE FROM envelopes WHERE recipient = ? "  # noqa: S608
            f"AND message_id IN ({_marks(len(chunk))}) RETURNING size",
            [recipient, *chunk],
        ).fetchall()
        deleted += len(sizes)
        freed += sum(int(row[0]) for row in sizes)
    if deleted:
        cur.execute(_ADD_TO_COUNTERS_SQL, (-deleted, -freed, recipient))
    return deleted
