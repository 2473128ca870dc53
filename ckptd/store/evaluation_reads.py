"""Reads of the evaluation queue: pending counts, the jobs waiting out a retry, and the
counts by status that ``ckptd status`` shows (the queue's writes are in ``evaluations``)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, and_, case, func, literal, or_, select

from ckptd.core.model import COMPLETE, utcnow
from ckptd.store import tables
from ckptd.store.evaluations import PENDING, RUNNING, live_claim, present, scope
from ckptd.store.handle import Store

_e = tables.evaluations
_c = tables.checkpoints
_r = tables.runs


def pending_count(
    store: Store,
    *,
    run_ids: Collection[int] | None = None,
    checkpoint_ids: Collection[int] | None = None,
) -> int:
    """Pending evaluations of complete checkpoints (due now or waiting to retry)."""
    stmt = (
        select(func.count())
        .select_from(_e.join(_c, _c.c.id == _e.c.checkpoint_id))
        .where(_e.c.status == PENDING, _c.c.state == COMPLETE)
    )
    stmt = scope(stmt, run_ids, checkpoint_ids)
    with store.session() as s:
        return int(s.scalar(stmt) or 0)


@dataclass(frozen=True)
class Waiting:
    """A pending evaluation that failed and waits out its retry backoff."""

    checkpoint: str  # RUN@STEP
    retry_at: datetime
    attempts: int
    error: str | None


def waiting(
    store: Store,
    *,
    run_ids: Collection[int] | None = None,
    checkpoint_ids: Collection[int] | None = None,
) -> list[Waiting]:
    """The evaluations of complete checkpoints that wait for their retry time, soonest first."""
    now = utcnow()
    stmt = (
        select(_r.c.name, _c.c.step, _c.c.prefix, _e.c.next_attempt_at, _e.c.attempts, _e.c.error)
        .join(_c, _c.c.id == _e.c.checkpoint_id)
        .join(_r, _r.c.id == _c.c.run_id)
        .where(_e.c.status == PENDING, _c.c.state == COMPLETE, _e.c.next_attempt_at > now)
        .order_by(_e.c.next_attempt_at, _c.c.step)
    )
    stmt = scope(stmt, run_ids, checkpoint_ids)
    with store.session() as s:
        rows = s.execute(stmt).all()
    return [
        Waiting(
            row.prefix if row.step is None else f"{row.name}@{row.step}",
            row.next_attempt_at,
            int(row.attempts or 0),
            row.error,
        )
        for row in rows
    ]


def status_counts(conn: Connection) -> dict[str, int]:
    """Evaluations by status, for ``status``: pending and running ones count only while their
    checkpoint is complete (a pruned or deleted checkpoint's leftover job is no work)."""
    live = or_(_e.c.status.not_in([PENDING, RUNNING]), present())
    # A running job whose claim expired (its holder died) is back in the queue: pending.
    status = case(
        (and_(_e.c.status == RUNNING, ~live_claim(utcnow())), literal(PENDING)),
        else_=_e.c.status,
    )
    rows = select(status.label("status")).where(live).subquery()
    counts = conn.execute(select(rows.c.status, func.count()).group_by(rows.c.status))
    return {name: n for name, n in counts}
