"""Ephemeral bindings: agents without a key file bind their id only while connected.

An agent that keeps no key file gets a new identity key every run; with a
permanent binding its id was refused (``identity_mismatch``) for ever after the
first run. ``agents.ephemeral`` marks such bindings: another key may take the id
over while no session of the old key is live (docs/PROTOCOL.md, "Ephemeral ids").
Existing bindings stay permanent.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(
            sa.Column("ephemeral", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("ephemeral")
