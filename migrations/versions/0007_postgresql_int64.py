"""64-bit steps, sizes and offsets on PostgreSQL

SQLite's INTEGER is 64-bit, PostgreSQL's 32-bit: a step past 2**31, a checkpoint of 2 GiB or an
event file read past 2 GiB would not fit. Those columns become BIGINT on PostgreSQL; on SQLite
nothing changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = [
    ("checkpoints", "step", True),
    ("checkpoints", "size_bytes", False),
    ("metrics", "step", True),
    ("scalars", "step", False),
    ("event_files", "offset", False),
    ("exports", "version", False),
    ("exports", "step", True),
]


def _alter(to: sa.types.TypeEngine[int], before: sa.types.TypeEngine[int]) -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=to, existing_type=before, existing_nullable=nullable)


def upgrade() -> None:
    _alter(sa.BigInteger(), sa.Integer())


def downgrade() -> None:
    _alter(sa.Integer(), sa.BigInteger())
