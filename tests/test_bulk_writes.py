"""Bulk writes (store/upsert.py) on SQLite and PostgreSQL: the rows land with SQLAlchemy's own
value conversion, an upsert keeps the last row of a key, and on PostgreSQL a batch is one
statement (an executemany there is one statement per row on the server)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import event, select

from ckptd.store import migrate, tables
from ckptd.store.db import make_engine, session_scope
from ckptd.store.upsert import insert_many

_runs, _ckpts, _scalars = tables.runs, tables.checkpoints, tables.scalars


def _statements(engine: Any) -> list[bool]:
    """The executemany flag of every statement the engine sends from now on."""
    sent: list[bool] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _sent(_c: Any, _cur: Any, _sql: Any, _params: Any, _ctx: Any, many: bool) -> None:
        sent.append(many)

    return sent


def test_a_batch_is_written_in_one_statement_and_upserts_keep_the_last_row(
    database_url: str,
) -> None:
    engine = make_engine(database_url)
    migrate.ensure_schema(engine)
    now = datetime(2026, 12, 2, 12, 0, 0)
    try:
        with session_scope(engine) as conn:
            insert_many(
                conn,
                _runs,
                ("name", "path", "watch_path", "present", "created_at", "scanned_at"),
                [("r", "/w/r", "/w", True, now, now)],
            )
            run = conn.execute(select(_runs.c.id)).scalar_one()
            sent = _statements(engine)
            rows = [
                (run, f"/w/r/ckpt-{i}", i, "tf2", "complete", None, 1, ["a", "b"], False, [i], now)
                for i in range(1000)
            ]
            columns = ("run_id", "prefix", "step", "format", "state", "reason", "size_bytes")
            columns += ("files", "has_meta", "signature", "recorded_at")
            assert insert_many(conn, _ckpts, columns, rows) == 1000
            scalars = [(run, "loss", step, float(step), 1.0, 0.0) for step in range(500)]
            scalars.append((run, "loss", 7, -1.0, 2.0, 0.0))  # the same key again: it wins
            insert_many(
                conn,
                _scalars,
                ("run_id", "name", "step", "value", "wall_time", "born"),
                scalars,
                conflict_keys=("run_id", "name", "step", "born"),
                update=("value", "wall_time"),
            )
            if engine.dialect.name == "postgresql":
                assert sent == [False, False]  # one statement per batch, no executemany
            got = conn.execute(
                select(_ckpts.c.step, _ckpts.c.files, _ckpts.c.signature, _ckpts.c.reason)
                .where(_ckpts.c.step.in_((0, 999)))
                .order_by(_ckpts.c.step)
            ).all()
            assert [tuple(r) for r in got] == [
                (0, ["a", "b"], [0], None),
                (999, ["a", "b"], [999], None),
            ]
            assert conn.execute(
                select(_scalars.c.value, _scalars.c.wall_time).where(_scalars.c.step == 7)
            ).one() == (-1.0, 2.0)
            assert len(conn.execute(select(_scalars.c.step)).all()) == 500
    finally:
        engine.dispose()
