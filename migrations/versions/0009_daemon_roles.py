"""daemon roles: daemons and remote workers share the ``daemons`` table

A ``ckptd worker`` (no watching; evaluates and exports for the cluster) registers and heartbeats
like a daemon, with ``role = 'worker'``. Names are unique per role among live processes.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 16:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("daemons", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role", sa.String(length=16), nullable=False, server_default="daemon")
        )


def downgrade() -> None:
    with op.batch_alter_table("daemons", schema=None) as batch_op:
        batch_op.drop_column("role")
