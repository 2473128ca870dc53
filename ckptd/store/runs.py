"""Run reads: runs by name or path, and the per-run summary `ckptd status` shows."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ckptd.core.errors import NotFound
from ckptd.core.model import COMPLETE, Run
from ckptd.store.handle import Store
from ckptd.store.tables import CheckpointRow, RunRow, table_of

runs_table = table_of(RunRow)
_r = runs_table.c
_c = table_of(CheckpointRow).c
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
    """A ``runs`` row (a RunRow, or a row of its columns) as a domain record."""
    return Run(row.id, row.name, row.path, row.watch_path, bool(row.present))


def runs(session: Session) -> list[Run]:
    """Every run, by name (inside the caller's transaction)."""
    return [to_run(r) for r in session.execute(select(*_RUN_COLUMNS).order_by(_r.name))]


def resolve_run(session: Session, text: str) -> Run:
    """A run by name (``mnist``, ``team-a/exp3``) or by absolute path."""
    stmt = select(*_RUN_COLUMNS)
    if os.path.isabs(text):
        stmt = stmt.where(_r.path == os.path.normpath(text))
    else:
        stmt = stmt.where(_r.name == text.strip("/"))
    found = session.execute(stmt).all()
    if len(found) == 1:
        return to_run(found[0])
    if len(found) > 1:
        paths = ", ".join(r.path for r in found)
        raise NotFound(f"run name {text!r} is ambiguous ({paths}); name it by its absolute path")
    names = list(session.scalars(select(_r.name).order_by(_r.name).limit(20)))
    raise NotFound(
        f"no run {text!r}; known runs: {', '.join(names) or 'none yet'} (see `ckptd status`)"
    )


def run_summaries(session: Session) -> list[RunSummary]:
    """Per run (by name): checkpoint counts by state and the newest complete step.

    Index lookups on ix_checkpoints_run_state_step (migration 0002), per run: a count of its
    range for each state present and its last complete entry. A GROUP BY over every checkpoint
    was slower at a million checkpoints: it handles each row, where these only count entries."""
    states = _states(session)
    counts = [
        select(func.count()).where(_c.run_id == _r.id, _c.state == state).scalar_subquery()
        for state in states
    ]
    newest = (
        select(func.max(_c.step)).where(_c.run_id == _r.id, _c.state == COMPLETE).scalar_subquery()
    )
    return [
        RunSummary(
            name,
            path,
            bool(present),
            {state: n for state, n in zip(states, ns, strict=True) if n},
            step,
        )
        for name, path, present, step, *ns in session.execute(
            select(_r.name, _r.path, _r.present, newest, *counts).order_by(_r.name)
        )
    ]


def _states(session: Session) -> list[str]:
    """The states any checkpoint is in, in order: one index seek each (ix_checkpoints_state)."""
    states: list[str] = []
    state = session.execute(select(func.min(_c.state))).scalar()
    while state is not None:
        states.append(state)
        state = session.execute(select(func.min(_c.state)).where(_c.state > state)).scalar()
    return states


# ---------------------------------------------------------------- for the layers above


def find_run(store: Store, text: str) -> Run:
    """:func:`resolve_run` in a transaction of its own; :class:`NotFound` says what exists."""
    with store.session() as session:
        return resolve_run(session, text)


def all_runs(store: Store) -> list[Run]:
    with store.session() as session:
        return runs(session)


def present_runs(store: Store, watch_path: str) -> list[Run]:
    """The runs of the watch at ``watch_path`` that were present at their last scan."""
    return [r for r in all_runs(store) if r.watch_path == watch_path and r.present]
