"""Runs whose event-file steps match no checkpoint step: their logged values reach no checkpoint.

A checkpoint gets the event-file values logged at its step (``tfevents`` metrics). A run with
both event-file values and checkpoints of known step, yet not one such metric, logs at steps its
checkpoints do not hold (e.g. files numbered by save count while the step lies elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, exists, func, select

from ckptd.store import tables

KIND = "steps_unmatched"  # the audit kind that reports such a run

_r = tables.runs.c
_c = tables.checkpoints.c
_m = tables.metrics.c
_s = tables.scalars.c
_a = tables.actions.c


@dataclass(frozen=True)
class Unmatched:
    run_id: int
    run: str
    checkpoints: int  # with a step
    checkpoint_steps: tuple[int, int]  # lowest, highest
    logged_steps: tuple[int, int]  # lowest, highest step of the run's event-file values


def unmatched_runs(conn: Connection) -> list[Unmatched]:
    """Every run with event-file values and stepped checkpoints, none of which got a value.

    Each condition is an EXISTS on an index (scalars by run, checkpoints by run, metrics by
    checkpoint): a run that matches stops at its first matched checkpoint; only the runs found
    are then measured.
    """
    has_scalars = exists().where(_s.run_id == _r.id)
    stepped = exists().where(_c.run_id == _r.id, _c.step.is_not(None))
    matched = exists().where(_c.run_id == _r.id, _m.checkpoint_id == _c.id, _m.source == "tfevents")
    found = conn.execute(
        select(_r.id, _r.name).where(has_scalars, stepped, ~matched).order_by(_r.name)
    ).all()
    out = []
    for run_id, name in found:
        n, lo, hi = conn.execute(
            select(func.count(), func.min(_c.step), func.max(_c.step)).where(
                _c.run_id == run_id, _c.step.is_not(None)
            )
        ).one()
        s_lo, s_hi = conn.execute(
            select(func.min(_s.step), func.max(_s.step)).where(_s.run_id == run_id)
        ).one()
        out.append(Unmatched(run_id, name, n, (lo, hi), (s_lo, s_hi)))
    return out


def reported(conn: Connection, run_ids: Iterable[int]) -> set[int]:
    """Those of ``run_ids`` whose mismatch the audit log already reports."""
    ids = list(run_ids)
    if not ids:
        return set()
    stmt = select(_a.run_id).where(_a.kind == KIND, _a.run_id.in_(ids)).distinct()
    return set(conn.scalars(stmt))
