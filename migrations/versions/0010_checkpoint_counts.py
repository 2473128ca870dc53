"""checkpoint counts kept by triggers

``checkpoint_counts`` (run, state -> n) is kept by triggers on ``checkpoints``
(ckptd/store/count_triggers.py), so that `status` and the heartbeat read a row per run and
state instead of counting every checkpoint. Filled from the rows here, once.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ckptd.store import count_triggers

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoint_counts",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("n", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_checkpoint_counts_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "state", name=op.f("pk_checkpoint_counts")),
    )
    conn = op.get_bind()
    conn.exec_driver_sql(count_triggers.FILL)
    count_triggers.install(conn)


def downgrade() -> None:
    count_triggers.uninstall(op.get_bind())
    op.drop_table("checkpoint_counts")
