"""run versions and job claims

Every writer of a run bumps ``runs.version``; recording applies its changes only if the version
is the one it read, so a prune from another process or a second writer makes it re-read instead
of writing a stale view. Evaluations carry their claim (``claimed_by``, ``claimed_until``), and
per-run jobs (prune, freeze) are claimed in ``run_claims``: a conditional write with an expiry, so
the daemon and the CLI never do the same work twice and a dead holder's work returns to the
queue.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 11:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no table copy): SQLite adds a column with a constant default in place.
    op.add_column(
        "runs", sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("0"))
    )
    op.add_column("evaluations", sa.Column("claimed_by", sa.String(length=255), nullable=True))
    op.add_column("evaluations", sa.Column("claimed_until", sa.DateTime(), nullable=True))
    op.create_table(
        "run_claims",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("job", sa.String(length=16), nullable=False),
        sa.Column("claimed_by", sa.String(length=255), nullable=False),
        sa.Column("claimed_until", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_claims_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "job", name=op.f("pk_run_claims")),
    )


def downgrade() -> None:
    op.drop_table("run_claims")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("claimed_by")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("version")
