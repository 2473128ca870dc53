"""export versions for TF Serving, and export retry backoff

``exports.version`` was the checkpoint's step; it is now the serving version, one more than any
before it under the export root with every publish, so TF Serving (which serves the highest
numeric version) serves the newest publish: the current best. Each export records what it is
(``step``, ``metric``, ``metric_value``) and, like evaluations, its ``attempt`` and when a failed
one is tried again (``next_attempt_at``; NULL after the last attempt). Rows written before this
keep their step as their version: new versions are numbered above them.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02 13:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no table copy). Existing rows: their step is their version.
    op.add_column("exports", sa.Column("step", sa.Integer(), nullable=True))
    op.add_column("exports", sa.Column("metric", sa.String(length=512), nullable=True))
    op.add_column("exports", sa.Column("metric_value", sa.Float(), nullable=True))
    op.add_column("exports", sa.Column("attempt", sa.Integer(), nullable=True))
    op.add_column("exports", sa.Column("next_attempt_at", sa.DateTime(), nullable=True))
    op.execute("UPDATE exports SET step = version")


def downgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("attempt")
        batch_op.drop_column("metric_value")
        batch_op.drop_column("metric")
        batch_op.drop_column("step")
