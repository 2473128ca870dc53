"""incarnations and replaced versions

A checkpoint name written again (``Checkpoint.write("weights")``, a restarted trainer's
``ckpt-1``) is a new version: the old row becomes ``replaced`` and stays as history, so a prefix
is unique only among the rows that are not replaced (a partial unique index). Each checkpoint
records the incarnation of its run that wrote it (a trainer restarted from scratch starts a new
one), each run when its incarnations began, and each event-file value the creation time of its
event file (``born``), which decides the incarnation it belongs to.

Batch operations: SQLite cannot drop a constraint or change a primary key in place, so those
tables are copied; PostgreSQL gets plain ALTERs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LIVE = "state != 'replaced'"


def upgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("incarnation", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
        batch_op.drop_constraint("uq_checkpoints_prefix", type_="unique")
    op.create_index(
        "ux_checkpoints_live_prefix",
        "checkpoints",
        ["prefix"],
        unique=True,
        sqlite_where=sa.text(LIVE),
        postgresql_where=sa.text(LIVE),
    )
    op.add_column("runs", sa.Column("incarnation_starts", sa.JSON(), nullable=True))
    with op.batch_alter_table("scalars", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("born", sa.Float(), nullable=False, server_default=sa.text("0"))
        )
        batch_op.drop_constraint("pk_scalars", type_="primary")
        batch_op.create_primary_key("pk_scalars", ["run_id", "name", "step", "born"])


def downgrade() -> None:
    # Replaced versions cannot share a unique prefix with their successors: history goes.
    op.execute("DELETE FROM checkpoints WHERE " + LIVE.replace("!=", "="))
    # One value per (run, name, step) again: the newest event file's.
    op.execute(
        "DELETE FROM scalars WHERE born < (SELECT max(s.born) FROM scalars s WHERE "
        "s.run_id = scalars.run_id AND s.name = scalars.name AND s.step = scalars.step)"
    )
    with op.batch_alter_table("scalars", schema=None) as batch_op:
        batch_op.drop_constraint("pk_scalars", type_="primary")
        batch_op.create_primary_key("pk_scalars", ["run_id", "name", "step"])
        batch_op.drop_column("born")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("incarnation_starts")
    op.drop_index("ux_checkpoints_live_prefix", table_name="checkpoints")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_checkpoints_prefix", ["prefix"])
        batch_op.drop_column("incarnation")
