"""Migration 0004 (incarnations, replaced versions) on a database with data in it: the tables
it copies keep every row that references them (SQLite batch mode drops the old table)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import text

from ckptd.store import migrate
from ckptd.store.db import make_engine

ROWS = [
    "INSERT INTO runs (id, name, path, watch_path, present, created_at) "
    "VALUES (1, 'r', '/w/r', '/w', TRUE, '2026-01-01')",
    "INSERT INTO checkpoints (id, run_id, prefix, step, format, state, size_bytes, files, "
    "has_meta, signature, recorded_at) "
    "VALUES (1, 1, '/w/r/ckpt-1', 1, 'tf2', 'complete', 1, '[]', FALSE, '[1, 2]', '2026-01-01')",
    "INSERT INTO metrics (checkpoint_id, name, value, step, source, recorded_at) "
    "VALUES (1, 'acc', 0.5, 1, 'tfevents', '2026-01-01')",
    "INSERT INTO evaluations (checkpoint_id, status, attempts) VALUES (1, 'done', 1)",
    "INSERT INTO pins (checkpoint_id, created_at) VALUES (1, '2026-01-01')",
    "INSERT INTO actions (at, kind, run_id, checkpoint_id, detail) "
    "VALUES ('2026-01-01', 'recorded', 1, 1, '{}')",
    "INSERT INTO scalars (run_id, name, step, value, wall_time) VALUES (1, 'acc', 1, 0.5, 9.0)",
]


def _counts(engine: object) -> list[int]:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        tables = ("checkpoints", "metrics", "evaluations", "pins", "scalars")
        return [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables] + [
            conn.execute(text("SELECT count(*) FROM actions WHERE checkpoint_id = 1")).scalar()
        ]


def test_upgrading_and_downgrading_keeps_every_row(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate.upgrade(engine, "0003")
    with engine.begin() as conn:
        for sql in ROWS:
            conn.execute(text(sql))
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.SCHEMA_HEAD
    assert _counts(engine) == [1] * 6
    with engine.connect() as conn:
        assert conn.execute(text("SELECT incarnation FROM checkpoints")).scalar() == 1
        assert conn.execute(text("SELECT born FROM scalars")).scalar() == 0
        if engine.dialect.name == "sqlite":
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1  # back on
    cfg = migrate._alembic_config()
    with migrate.migrating(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    assert migrate.current_revision(engine) == "0003"
    assert _counts(engine) == [1] * 6
    engine.dispose()
