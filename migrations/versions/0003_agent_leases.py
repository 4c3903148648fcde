"""Agent leases: one live session per agent across the hubs sharing a database.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_leases",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("hub_id", sa.String(128), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.agent_id"],
            name=op.f("fk_agent_leases_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agent_leases")),
    )
    op.create_index(op.f("ix_agent_leases_hub_id"), "agent_leases", ["hub_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_agent_leases_hub_id"), table_name="agent_leases")
    op.drop_table("agent_leases")
