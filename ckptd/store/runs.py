"""Run reads: runs by name or path, and the per-run summary `ckptd status` shows."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, select

from ckptd.core.errors import NotFound
from ckptd.core.model import COMPLETE, Run
from ckptd.store import tables
from ckptd.store.handle import Store

_r = tables.runs.c
_c = tables.checkpoints.c
_k = tables.checkpoint_counts.c
_RUN_COLUMNS = (_r.id, _r.name, _r.path, _r.watch_path, _r.present)


@dataclass(frozen=True)
class RunSummary:
    """A run's checkpoint counts by state and its newest complete step."""

    run: str
    path: str
    present: bool
    counts: dict[str, int] = field(default_factory=dict)
    newest_step: int | None = None


def to_run(row: Any) -> Run:
    """A row of the ``runs`` columns as a domain record."""
    return Run(row.id, row.name, row.path, row.watch_path, bool(row.present))


def run_by_id(conn: Connection, run_id: int) -> Run:
    """The run of this id (which exists: its rows reference it)."""
    return to_run(conn.execute(select(*_RUN_COLUMNS).where(_r.id == run_id)).one())


def runs(conn: Connection) -> list[Run]:
    """Every run, by name (inside the caller's transaction)."""
    return [to_run(r) for r in conn.execute(select(*_RUN_COLUMNS).order_by(_r.name))]


def resolve_run(conn: Connection, text: str) -> Run:
    """A run by name (``mnist``, ``team-a/exp3``) or by absolute path."""
    stmt = select(*_RUN_COLUMNS)
    if os.path.isabs(text):
        stmt = stmt.where(_r.path == os.path.normpath(text))
    else:
        stmt = stmt.where(_r.name == text.strip("/"))
    found = conn.execute(stmt).all()
    if len(found) == 1:
        return to_run(found[0])
    if len(found) > 1:
        paths = ", ".join(r.path for r in found)
        raise NotFound(f"run name {text!r} is ambiguous ({paths}); name it by its absolute path")
    names = list(conn.scalars(select(_r.name).order_by(_r.name).limit(20)))
    raise NotFound(
        f"no run {text!r}; known runs: {', '.join(names) or 'none yet'} (see `ckptd status`)"
    )


def run_summaries(conn: Connection) -> list[RunSummary]:
    """Per run (by name): checkpoint counts by state and the newest complete step.

    The counts are ``checkpoint_counts``' rows, kept by the database's triggers (not a count
    of a million checkpoints); the newest step is one seek per run in
    ix_checkpoints_run_state_step."""
    counts: dict[int, dict[str, int]] = {}
    for run_id, state, n in conn.execute(
        select(_k.run_id, _k.state, _k.n).where(_k.n != 0).order_by(_k.run_id, _k.state)
    ):
        counts.setdefault(run_id, {})[state] = n
    newest = (
        select(func.max(_c.step)).where(_c.run_id == _r.id, _c.state == COMPLETE).scalar_subquery()
    )
    return [
        RunSummary(name, path, bool(present), counts.get(run_id, {}), step)
        for run_id, name, path, present, step in conn.execute(
            select(_r.id, _r.name, _r.path, _r.present, newest).order_by(_r.name)
        )
    ]


def state_counts(conn: Connection) -> dict[str, int]:
    """How many checkpoints are in each state, by state (from ``checkpoint_counts``)."""
    stmt = select(_k.state, func.sum(_k.n)).group_by(_k.state).order_by(_k.state)
    return {state: int(n) for state, n in conn.execute(stmt) if n}


# ---------------------------------------------------------------- for the layers above


def find_run(store: Store, text: str) -> Run:
    """:func:`resolve_run` in a transaction of its own; :class:`NotFound` says what exists."""
    with store.session() as conn:
        return resolve_run(conn, text)


def all_runs(store: Store) -> list[Run]:
    with store.session() as conn:
        return runs(conn)


def present_runs(store: Store, watch_path: str) -> list[Run]:
    """The runs of the watch at ``watch_path`` that were present at their last scan."""
    return [r for r in all_runs(store) if r.watch_path == watch_path and r.present]
