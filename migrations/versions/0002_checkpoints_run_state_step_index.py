"""covering index on checkpoints (run_id, state, step)

`ckptd status` counts checkpoints per run and state and takes the newest step of each run; with
this index SQLite answers that from the index alone instead of visiting every checkpoint row
(100,000 checkpoints: ~130 ms → ~20 ms).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:50:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index(
            "ix_checkpoints_run_state_step", ["run_id", "state", "step"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index("ix_checkpoints_run_state_step")
