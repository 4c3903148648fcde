"""Table definitions of the hub's persistent store (SQLAlchemy Core, no ORM).

Dialect-neutral: the same :data:`metadata` is used on SQLite and PostgreSQL.
Times are integer milliseconds since the epoch (``BigInteger``), blobs are
``LargeBinary`` and every constraint and index has an explicit, stable name
(see :data:`NAMING_CONVENTION`) so migrations can refer to them.

The schema is created and changed only by the Alembic migrations in
``migrations/versions`` (shipped as ``agentmesh.migrations``); a test checks that
the migrations produce exactly this metadata. All SQL lives in
:mod:`agentmesh.hub.store`.

Tables:

``agents``
    One row per bound agent id: the Ed25519 key the id is bound to (the first
    registration binds), the published signed prekey bundle and timestamps.
``one_time_prekeys``
    Uploaded one-time prekeys, each handed out at most once and then deleted.
    ``kind`` is :data:`KIND_X25519` or :data:`KIND_KEM`.
``envelopes``
    The store-and-forward queue. ``seq`` is a strictly increasing, never reused
    sequence number (``AUTOINCREMENT`` on SQLite, ``BIGSERIAL`` on PostgreSQL),
    so ``seq`` order is arrival (FIFO) order and a client cursor ``after_seq``
    never skips a message.
``mailboxes``
    Per-recipient counters (``msg_count``, ``byte_count``) of what is queued in
    ``envelopes``, maintained in the same transaction as every insert and
    delete so quota checks are O(1) per message instead of ``COUNT(*)``.
    Every enqueue locks the recipient's row (``FOR UPDATE``) before it draws
    ``seq``s and keeps it until its commit, so for ONE recipient envelopes
    commit in ``seq`` order even with several hubs writing (see
    :mod:`agentmesh.hub.store`, "Cursors").
``agent_leases``
    Several hubs on one PostgreSQL: which hub (``hub_id``) and which of its
    connections (``session_id``) holds an agent's one live session, until
    ``expires_at_ms`` unless renewed. Only that session is pushed envelopes.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    false,
)

#: ``one_time_prekeys.kind`` of an X25519 one-time prekey.
KIND_X25519: Final = 1
#: ``one_time_prekeys.kind`` of an ML-KEM-768 one-time prekey.
KIND_KEM: Final = 2

#: Length of an agent id column (see :mod:`agentmesh.ids`).
AGENT_ID_LENGTH: Final = 64
#: Length of an Ed25519 public key.
SIGNING_KEY_LENGTH: Final = 32
#: Length of an envelope message id.
MESSAGE_ID_LENGTH: Final = 16

NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: BIGINT on PostgreSQL; plain INTEGER on SQLite so the column is a ROWID alias.
_SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")

agents = Table(
    "agents",
    metadata,
    Column("agent_id", String(AGENT_ID_LENGTH), primary_key=True),
    Column("signing_key", LargeBinary(SIGNING_KEY_LENGTH), nullable=False),
    Column("bundle", LargeBinary(), nullable=True),
    Column("created_at_ms", BigInteger(), nullable=False),
    Column("updated_at_ms", BigInteger(), nullable=False),
    Column("last_seen_ms", BigInteger(), nullable=False),
    # An agent without a key file: another key may take the id over while no
    # session of this one is live (migration 0002).
    Column("ephemeral", Boolean(), nullable=False, server_default=false()),
)

one_time_prekeys = Table(
    "one_time_prekeys",
    metadata,
    Column(
        "agent_id",
        String(AGENT_ID_LENGTH),
        ForeignKey("agents.agent_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("kind", SmallInteger(), nullable=False),
    Column("prekey_id", BigInteger(), nullable=False),
    Column("blob", LargeBinary(), nullable=False),
    PrimaryKeyConstraint("agent_id", "kind", "prekey_id"),
    CheckConstraint(f"kind IN ({KIND_X25519}, {KIND_KEM})", name="kind"),
)

envelopes = Table(
    "envelopes",
    metadata,
    Column("seq", _SEQ_TYPE, primary_key=True, autoincrement=True),
    Column("message_id", LargeBinary(MESSAGE_ID_LENGTH), nullable=False, unique=True),
    Column("sender", String(AGENT_ID_LENGTH), nullable=False),
    Column(
        "recipient",
        String(AGENT_ID_LENGTH),
        ForeignKey("agents.agent_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("body", LargeBinary(), nullable=False),
    Column("size", Integer(), nullable=False),
    Column("created_at_ms", BigInteger(), nullable=False),
    Column("expires_at_ms", BigInteger(), nullable=False),
    Index("ix_envelopes_recipient_seq", "recipient", "seq"),
    Index("ix_envelopes_expires_at_ms", "expires_at_ms"),
    # Never reuse a seq after the newest row is deleted (cursors rely on it).
    sqlite_autoincrement=True,
)

mailboxes = Table(
    "mailboxes",
    metadata,
    Column(
        "recipient",
        String(AGENT_ID_LENGTH),
        ForeignKey("agents.agent_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("msg_count", BigInteger(), nullable=False),
    Column("byte_count", BigInteger(), nullable=False),
)

#: Length of a hub id column (see ``HubOptions.hub_id``).
HUB_ID_LENGTH: Final = 128

agent_leases = Table(
    "agent_leases",
    metadata,
    Column(
        "agent_id",
        String(AGENT_ID_LENGTH),
        ForeignKey("agents.agent_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("hub_id", String(HUB_ID_LENGTH), nullable=False),
    Column("session_id", BigInteger(), nullable=False),
    Column("expires_at_ms", BigInteger(), nullable=False),
    Index("ix_agent_leases_hub_id", "hub_id"),
)

__all__ = [
    "AGENT_ID_LENGTH",
    "HUB_ID_LENGTH",
    "KIND_KEM",
    "KIND_X25519",
    "MESSAGE_ID_LENGTH",
    "NAMING_CONVENTION",
    "SIGNING_KEY_LENGTH",
    "agent_leases",
    "agents",
    "envelopes",
    "mailboxes",
    "metadata",
    "one_time_prekeys",
]
