"""``checkpoint_counts`` (run, state -> n) is kept by the database's triggers: after any mix of
inserts, state changes, moves, deletes and a run's deletion it equals a count of the rows, on
SQLite and PostgreSQL; migration 0010 fills it from the rows already there; a fresh database
(``create_all``) gets the same triggers as a migrated one; `status` reads them."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

from alembic import command
from sqlalchemy import text

from ckptd.core.model import COMPLETE, CORRUPT, GONE, PRUNED, PRUNING, REPLACED
from ckptd.store import count_triggers, migrate, tables
from ckptd.store.db import make_engine, session_scope
from ckptd.store.runs import RunSummary, run_summaries, state_counts
from ckptd.store.upsert import insert_many

STATES = (COMPLETE, CORRUPT, GONE, PRUNED, PRUNING, REPLACED)
NOW = datetime(2026, 12, 3, 9, 0, 0)
_RUN = ("id", "name", "path", "watch_path", "present", "created_at")
_CKPT = ("run_id", "prefix", "step", "format", "state", "size_bytes", "files", "has_meta")
_CKPT += ("signature", "recorded_at")


def _counted(conn: Any) -> dict[tuple[int, str], int]:
    rows = conn.execute(text("SELECT run_id, state, n FROM checkpoint_counts WHERE n <> 0"))
    return {(r, s): n for r, s, n in rows}


def _from_rows(conn: Any) -> dict[tuple[int, str], int]:
    rows = conn.execute(
        text("SELECT run_id, state, count(*) FROM checkpoints GROUP BY run_id, state")
    )
    return {(r, s): n for r, s, n in rows}


def _add_runs(conn: Any, ids: list[int]) -> None:
    insert_many(conn, tables.runs, _RUN, [(i, f"r{i}", f"/w/r{i}", "/w", True, NOW) for i in ids])


def _add_checkpoints(conn: Any, rng: random.Random, run: int, first: int, n: int) -> None:
    rows = [
        (run, f"/w/r{run}/ckpt-{s}", s, "tf2", rng.choice(STATES), 1, [], False, [], NOW)
        for s in range(first, first + n)
    ]
    if n == 1:  # the one-row INSERT the recorder uses for a single new checkpoint
        conn.execute(tables.checkpoints.insert().values(dict(zip(_CKPT, rows[0], strict=True))))
    else:
        insert_many(conn, tables.checkpoints, _CKPT, rows)


def test_counts_follow_every_kind_of_write(database_url: str) -> None:
    rng = random.Random(13)
    engine = make_engine(database_url)
    migrate.ensure_schema(engine)
    next_step = {1: 1, 2: 1, 3: 1}
    try:
        with session_scope(engine) as conn:
            _add_runs(conn, [1, 2, 3])
        for i in range(40):
            with session_scope(engine) as conn:
                op = rng.choice(("insert", "insert", "state", "state", "move", "delete"))
                if op == "insert":
                    run, n = rng.choice([1, 2, 3]), rng.choice([1, 7, 30])
                    _add_checkpoints(conn, rng, run, next_step[run], n)
                    next_step[run] += n
                elif op == "state":  # a set of rows, from several states to one
                    conn.execute(
                        text("UPDATE checkpoints SET state = :to WHERE id % :m = :r"),
                        {"to": rng.choice(STATES), "m": rng.choice([2, 3, 5]), "r": i % 2},
                    )
                elif op == "move":  # a column the counts do not key on, and run_id
                    conn.execute(text("UPDATE checkpoints SET size_bytes = size_bytes + 1"))
                    conn.execute(
                        text("UPDATE checkpoints SET run_id = 3 WHERE run_id = 2 AND step % 4 = 0")
                    )
                else:
                    conn.execute(text("DELETE FROM checkpoints WHERE id % 7 = :r"), {"r": i % 7})
                # inside the writing transaction already: a count never lags its rows
                assert _counted(conn) == _from_rows(conn), f"after {op} #{i}"
        with session_scope(engine) as conn:
            conn.execute(text("DELETE FROM runs WHERE id = 2"))  # cascades to its checkpoints
            assert _counted(conn) == _from_rows(conn)
            assert not any(run == 2 for run, _ in _counted(conn))
            totals: dict[str, int] = {}
            for (_run, state), n in _from_rows(conn).items():
                totals[state] = totals.get(state, 0) + n
            assert state_counts(conn) == dict(sorted(totals.items()))
            assert sum(totals.values()) > 20  # the sequence did leave rows to count
    finally:
        engine.dispose()


def test_a_rolled_back_write_leaves_the_counts_as_they_were(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate.ensure_schema(engine)
    try:
        with session_scope(engine) as conn:
            _add_runs(conn, [1])
            _add_checkpoints(conn, random.Random(1), 1, 1, 10)
        with engine.connect() as conn:
            before = _counted(conn)
        try:
            with session_scope(engine) as conn:
                conn.execute(text("UPDATE checkpoints SET state = 'pruned'"))
                raise RuntimeError("abandoned")
        except RuntimeError:
            pass
        with engine.connect() as conn:
            assert _counted(conn) == before == _from_rows(conn)
            assert sum(before.values()) == 10
    finally:
        engine.dispose()


def _triggers(conn: Any) -> list[str]:
    if conn.dialect.name == "postgresql":
        sql = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY tgname"
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
    return [name for (name,) in conn.execute(text(sql))]


def test_migration_0010_counts_the_rows_already_there(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate.upgrade(engine, "0009")
    rng = random.Random(10)
    try:
        with engine.begin() as conn:
            _add_runs(conn, [1, 2])
            _add_checkpoints(conn, rng, 1, 1, 25)
            _add_checkpoints(conn, rng, 2, 1, 25)
        migrate.upgrade(engine)
        with engine.begin() as conn:
            assert _counted(conn) == _from_rows(conn)
            assert sum(_counted(conn).values()) == 50
            assert _triggers(conn) == sorted(count_triggers.TRIGGERS)
            conn.execute(text("UPDATE checkpoints SET state = 'gone' WHERE run_id = 1"))
            assert _counted(conn) == _from_rows(conn)
        cfg = migrate._alembic_config()
        with migrate.migrating(engine) as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0009")
        with engine.begin() as conn:
            assert _triggers(conn) == []
            conn.execute(text("UPDATE checkpoints SET state = 'complete'"))  # no trigger fires
    finally:
        engine.dispose()


def test_a_fresh_database_gets_the_triggers_the_migration_installs(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate.ensure_schema(engine)  # an empty database: create_all + stamp
    try:
        with engine.connect() as conn:
            assert _triggers(conn) == sorted(count_triggers.TRIGGERS)
    finally:
        engine.dispose()


def test_status_counts_every_state_per_run(database_url: str) -> None:
    """`status` (store/runs.run_summaries) reads these counts: every state is counted, runs
    without checkpoints are listed, and the newest step is the newest complete one."""
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
                tables.runs,
                _RUN,
                [
                    (1, "b", "/w/b", "/w", True, now),
                    (2, "a", "/w/a", "/w", True, now),
                    (3, "empty", "/w/empty", "/w", False, now),
                ],
            )
            rows = [(1, f"/w/b/ckpt-{i + 1}", i + 1, "tf2", st) for i, st in enumerate(b_states)]
            rows += [(2, f"/w/a/ckpt-{i}", i, "tf2", COMPLETE) for i in (3, 1, 2)]
            insert_many(
                conn, tables.checkpoints, _CKPT, [(*r, 1, [], False, [], now) for r in rows]
            )
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
