"""Claims on per-run jobs (prune, freeze): a conditional write with an expiry.

Whoever asks — the daemon, the CLI, later a second host — takes the same claim, so two processes
never do the same job on the same run at once; a holder that dies leaves a claim that expires and
the job returns to whoever asks next. Evaluations carry their claim on their own row
(``evaluations.claimed_by``/``claimed_until``, see ``store/evaluations``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, or_, select, update

from ckptd.core.model import utcnow
from ckptd.store.handle import Store, holder_gone
from ckptd.store.tables import RunClaimRow, table_of
from ckptd.store.upsert import _dialect_insert

PRUNE, FREEZE = "prune", "freeze"
DEFAULT_TTL = timedelta(minutes=5)


class Busy(Exception):
    """Another process holds the claim (it names the holder and until when)."""

    def __init__(self, run_id: int, job: str, holder: str, until: datetime) -> None:
        super().__init__(f"{job} of run {run_id} is being done by {holder} (claim until {until})")
        self.holder, self.until = holder, until


def claim(store: Store, run_id: int, job: str, *, ttl: timedelta = DEFAULT_TTL) -> bool:
    """Take (or renew) the claim on ``job`` of ``run_id``; False while another holder's is live."""
    now = utcnow()
    table = table_of(RunClaimRow)
    stmt = _dialect_insert(store.dialect)(table).values(
        run_id=run_id, job=job, claimed_by=store.holder, claimed_until=now + ttl
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "job"],
        set_={"claimed_by": stmt.excluded.claimed_by, "claimed_until": stmt.excluded.claimed_until},
        where=or_(table.c.claimed_by == store.holder, table.c.claimed_until < now),
    )
    with store.session() as session:
        return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def renew(store: Store, run_id: int, job: str, *, ttl: timedelta = DEFAULT_TTL) -> bool:
    """Extend a claim this process holds; False if it was lost (expired and taken)."""
    t = table_of(RunClaimRow)
    stmt = (
        update(t)
        .where(and_(t.c.run_id == run_id, t.c.job == job, t.c.claimed_by == store.holder))
        .values(claimed_until=utcnow() + ttl)
    )
    with store.session() as session:
        return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def release(store: Store, run_id: int, job: str) -> None:
    t = table_of(RunClaimRow)
    stmt = delete(t).where(
        and_(t.c.run_id == run_id, t.c.job == job, t.c.claimed_by == store.holder)
    )
    with store.session() as session:
        session.execute(stmt)


def release_gone(store: Store, job: str) -> int:
    """Drop the claims on ``job`` whose holder process has exited (a daemon killed mid-export
    restarts without waiting for its old claim to expire); returns how many."""
    t = table_of(RunClaimRow)
    with store.session() as session:
        holders = session.scalars(select(t.c.claimed_by).where(t.c.job == job).distinct()).all()
        gone = [h for h in holders if holder_gone(h)]
        if not gone:
            return 0
        stmt = delete(t).where(and_(t.c.job == job, t.c.claimed_by.in_(gone)))
        return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def holder_of(store: Store, run_id: int, job: str) -> tuple[str, datetime] | None:
    """The live claim on a job, if any (for messages and ``status``)."""
    t = table_of(RunClaimRow)
    with store.session() as session:
        row = session.execute(
            t.select().where(
                and_(t.c.run_id == run_id, t.c.job == job, t.c.claimed_until >= utcnow())
            )
        ).first()
    return (row.claimed_by, row.claimed_until) if row else None


@contextmanager
def claimed(store: Store, run_id: int, job: str, *, ttl: timedelta = DEFAULT_TTL) -> Iterator[None]:
    """Hold the claim for a block of work; :class:`Busy` if another process holds it."""
    if not claim(store, run_id, job, ttl=ttl):
        held = holder_of(store, run_id, job)
        holder, until = held if held else ("another process", utcnow())
        raise Busy(run_id, job, holder, until)
    try:
        yield
    finally:
        release(store, run_id, job)
