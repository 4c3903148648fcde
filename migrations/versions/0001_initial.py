"""Initial hub schema: agents, one-time prekeys, envelopes, mailbox counters.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The migration spells out its own types instead of importing models.py, so it
# keeps meaning what it meant when later revisions change the models.
_SEQ_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("signing_key", sa.LargeBinary(32), nullable=False),
        sa.Column("bundle", sa.LargeBinary(), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agents")),
    )
    op.create_table(
        "one_time_prekeys",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("prekey_id", sa.BigInteger(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("kind IN (1, 2)", name=op.f("ck_one_time_prekeys_kind")),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.agent_id"],
            name=op.f("fk_one_time_prekeys_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", "kind", "prekey_id", name=op.f("pk_one_time_prekeys")),
    )
    op.create_table(
        "envelopes",
        sa.Column("seq", _SEQ_TYPE, autoincrement=True, nullable=False),
        sa.Column("message_id", sa.LargeBinary(16), nullable=False),
        sa.Column("sender", sa.String(64), nullable=False),
        sa.Column("recipient", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["recipient"],
            ["agents.agent_id"],
            name=op.f("fk_envelopes_recipient_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_envelopes")),
        sa.UniqueConstraint("message_id", name=op.f("uq_envelopes_message_id")),
        # Never reuse a seq after the newest row is deleted (cursors rely on it).
        sqlite_autoincrement=True,
    )
    op.create_index("ix_envelopes_recipient_seq", "envelopes", ["recipient", "seq"], unique=False)
    op.create_index("ix_envelopes_expires_at_ms", "envelopes", ["expires_at_ms"], unique=False)
    op.create_table(
        "mailboxes",
        sa.Column("recipient", sa.String(64), nullable=False),
        sa.Column("msg_count", sa.BigInteger(), nullable=False),
        sa.Column("byte_count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["recipient"],
            ["agents.agent_id"],
            name=op.f("fk_mailboxes_recipient_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("recipient", name=op.f("pk_mailboxes")),
    )


def downgrade() -> None:
    op.drop_table("mailboxes")
    op.drop_index("ix_envelopes_expires_at_ms", table_name="envelopes")
    op.drop_index("ix_envelopes_recipient_seq", table_name="envelopes")
    op.drop_table("envelopes")
    op.drop_table("one_time_prekeys")
    op.drop_table("agents")
