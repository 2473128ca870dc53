"""`status`'s per-run counts (store/runs.run_summaries) come from ``checkpoint_counts``, which
the database's triggers keep (tests/test_checkpoint_counts.py): every state a checkpoint can be
in is counted, runs without checkpoints are listed, and the newest step is the newest complete
one, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from ckptd.core.model import COMPLETE, CORRUPT, GONE, PRUNED, PRUNING, REPLACED
from ckptd.store import migrate, tables
from ckptd.store.db import make_engine, session_scope
from ckptd.store.runs import RunSummary, run_summaries
from ckptd.store.upsert import insert_many

_runs, _ckpts = tables.runs, tables.checkpoints
_RUN = ("id", "name", "path", "watch_path", "present", "created_at", "scanned_at")
_CKPT = ("run_id", "prefix", "step", "format", "state", "size_bytes", "files", "has_meta")
_CKPT += ("signature", "recorded_at")


def test_every_state_is_counted_per_run(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate.ensure_schema(engine)
    now = datetime(2026, 12, 2, 12, 0, 0)
    # run b: steps 1..12 in every state; the newest complete step is 9, not the newest step.
    b_states = [PRUNED, PRUNED, GONE, CORRUPT, COMPLETE, PRUNING, COMPLETE, REPLACED, COMPLETE]
    b_states += [CORRUPT, GONE, REPLACED]
    try:
        with session_scope(engine) as conn:
            insert_many(
                conn,
                _runs,
                _RUN,
                [
                    (1, "b", "/w/b", "/w", True, now, now),
                    (2, "a", "/w/a", "/w", True, now, now),
                    (3, "empty", "/w/empty", "/w", False, now, now),
                ],
            )
            rows = [(1, f"/w/b/ckpt-{i + 1}", i + 1, "tf2", st) for i, st in enumerate(b_states)]
            rows += [(2, f"/w/a/ckpt-{i}", i, "tf2", COMPLETE) for i in (3, 1, 2)]
            insert_many(conn, _ckpts, _CKPT, [(*r, 1, [], False, [], now) for r in rows])
        with session_scope(engine) as s:
            got = run_summaries(s)
    finally:
        engine.dispose()
    assert got == [
        RunSummary("a", "/w/a", True, {COMPLETE: 3}, 3),
        RunSummary(
            "b",
            "/w/b",
            True,
            {COMPLETE: 3, CORRUPT: 2, GONE: 2, PRUNED: 2, PRUNING: 1, REPLACED: 2},
            9,
        ),
        RunSummary("empty", "/w/empty", False, {}, None),
    ]
    assert list(got[1].counts) == sorted(got[1].counts)  # as GROUP BY state ordered them
