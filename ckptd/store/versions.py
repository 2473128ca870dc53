"""Run versions: every writer of a run's rows bumps its version in the same transaction.

Recording applies its changes only if the run's version is still the one it read
(``store/recording``), so a write by any other path — a prune from the CLI, an evaluation, a
second daemon — makes it re-read the run instead of writing a stale view.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, update

from ckptd.store import tables


def bump(conn: Connection, run_ids: Iterable[int]) -> None:
    """Bump the version of each run (inside the caller's transaction)."""
    ids = sorted(set(run_ids))
    runs = tables.runs
    for i in range(0, len(ids), 500):
        conn.execute(
            update(runs).where(runs.c.id.in_(ids[i : i + 500])).values(version=runs.c.version + 1)
        )
