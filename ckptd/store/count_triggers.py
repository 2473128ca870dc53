"""Triggers that keep ``checkpoint_counts`` (run, state -> how many checkpoints) in step with
``checkpoints``.

`status` and every heartbeat want each run's counts by state; counting them from the rows is a
walk over every index entry (a million of them in a big database), on every call. The database
keeps the counts itself instead, inside the transaction of each write, whoever writes (daemon,
CLI, worker, a migration, an UPDATE typed by hand): a count is never ahead of or behind the
rows it counts.

SQLite: a trigger per row. PostgreSQL: a trigger per statement over its transition tables, one
upsert per statement with its keys in order, so that two writers of one run take its counter
rows' locks in the same order. A count that falls to 0 keeps its row; readers skip zeros.
Deletes only lower existing counts: the cascade from a deleted run has removed them already.

Both ``create_all`` (a fresh database) and migration 0010 install them. A later migration that
rebuilds ``checkpoints`` on SQLite (``batch_alter_table`` copies the table) drops its triggers
and must call :func:`install` again.
"""

from __future__ import annotations

from typing import Any

_SQLITE = (
    """
    CREATE TRIGGER checkpoint_counts_insert AFTER INSERT ON checkpoints
    BEGIN
        INSERT INTO checkpoint_counts (run_id, state, n) VALUES (NEW.run_id, NEW.state, 1)
        ON CONFLICT (run_id, state) DO UPDATE SET n = n + 1;
    END
    """,
    """
    CREATE TRIGGER checkpoint_counts_update AFTER UPDATE OF run_id, state ON checkpoints
    WHEN OLD.run_id IS NOT NEW.run_id OR OLD.state IS NOT NEW.state
    BEGIN
        UPDATE checkpoint_counts SET n = n - 1 WHERE run_id = OLD.run_id AND state = OLD.state;
        INSERT INTO checkpoint_counts (run_id, state, n) VALUES (NEW.run_id, NEW.state, 1)
        ON CONFLICT (run_id, state) DO UPDATE SET n = n + 1;
    END
    """,
    """
    CREATE TRIGGER checkpoint_counts_delete AFTER DELETE ON checkpoints
    BEGIN
        UPDATE checkpoint_counts SET n = n - 1 WHERE run_id = OLD.run_id AND state = OLD.state;
    END
    """,
)

# One upsert of the net change per (run, state), keys in order (the order locks are taken in).
_PG_UPSERT = """
            INSERT INTO checkpoint_counts AS c (run_id, state, n)
            SELECT run_id, state, sum(d) FROM ({rows}) AS t
            GROUP BY run_id, state HAVING sum(d) <> 0 ORDER BY run_id, state
            ON CONFLICT (run_id, state) DO UPDATE SET n = c.n + excluded.n;"""
_PG_FUNCTION = """
    CREATE OR REPLACE FUNCTION checkpoint_counts_apply() RETURNS trigger
    LANGUAGE plpgsql AS $body$
    BEGIN
        IF TG_OP = 'INSERT' THEN{inserted}
        ELSIF TG_OP = 'UPDATE' THEN{updated}
        ELSE
            UPDATE checkpoint_counts AS c SET n = c.n - gone.n
            FROM (SELECT run_id, state, count(*) AS n FROM old_rows GROUP BY run_id, state)
                AS gone
            WHERE c.run_id = gone.run_id AND c.state = gone.state;
        END IF;
        RETURN NULL;
    END
    $body$
    """.format(
    inserted=_PG_UPSERT.format(rows="SELECT run_id, state, 1 AS d FROM new_rows"),
    updated=_PG_UPSERT.format(
        rows="SELECT run_id, state, -1 AS d FROM old_rows "
        "UNION ALL SELECT run_id, state, 1 FROM new_rows"
    ),
)
_PG = (
    _PG_FUNCTION,
    """
    CREATE TRIGGER checkpoint_counts_insert AFTER INSERT ON checkpoints
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION checkpoint_counts_apply()
    """,
    """
    CREATE TRIGGER checkpoint_counts_update AFTER UPDATE ON checkpoints
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION checkpoint_counts_apply()
    """,
    """
    CREATE TRIGGER checkpoint_counts_delete AFTER DELETE ON checkpoints
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION checkpoint_counts_apply()
    """,
)

TRIGGERS = ("checkpoint_counts_insert", "checkpoint_counts_update", "checkpoint_counts_delete")

# Every count from the rows: what a new ``checkpoint_counts`` starts from.
FILL = (
    "INSERT INTO checkpoint_counts (run_id, state, n) "
    "SELECT run_id, state, count(*) FROM checkpoints GROUP BY run_id, state"
)


def install(conn: Any) -> None:
    """Create the triggers (and PostgreSQL's function) on ``conn``'s database."""
    for sql in _PG if conn.dialect.name == "postgresql" else _SQLITE:
        conn.exec_driver_sql(sql)


def uninstall(conn: Any) -> None:
    postgres = conn.dialect.name == "postgresql"
    for name in TRIGGERS:
        conn.exec_driver_sql(
            f"DROP TRIGGER IF EXISTS {name}" + (" ON checkpoints" if postgres else "")
        )
    if postgres:
        conn.exec_driver_sql("DROP FUNCTION IF EXISTS checkpoint_counts_apply()")
