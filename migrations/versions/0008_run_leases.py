"""run leases and daemon names

Several daemons may share one database: each has a name (``daemons.name``), and a run is acted
on by the daemon holding its lease (``run_leases``: owner, epoch, expires_at by the database's
clock). Every state-changing write for a run checks the holder's epoch (fencing).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_leases",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_leases_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_run_leases")),
    )
    with op.batch_alter_table("run_leases", schema=None) as batch_op:
        batch_op.create_index("ix_run_leases_owner", ["owner"], unique=False)
    with op.batch_alter_table("daemons", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("daemons", schema=None) as batch_op:
        batch_op.drop_column("name")
    op.drop_table("run_leases")
