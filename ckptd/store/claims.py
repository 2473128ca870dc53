"""Claims on per-run jobs (prune, freeze): a conditional write with an expiry.

Whoever asks — the daemon, the CLI, later a second host — takes the same claim, so two processes
never do the same job on the same run at once; a holder that dies leaves a claim that expires and
the job returns to whoever asks next. Evaluations carry their claim on their own row
(``evaluations.claimed_by``/``claimed_until``, see ``store/evaluations``).

A daemon's claim on a run it no longer holds the lease of is taken over by the run's lease
holder at once (``lease_owner``), not after its expiry: a daemon cut off from the database
mid-prune can neither finish nor release its claim, and every write it would still make for the
run is fenced by the lease it lost. The claims of the CLI and of workers hold no lease and
are never taken over.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update

from ckptd.core.model import utcnow
from ckptd.store import tables
from ckptd.store.handle import DAEMON_TAG, Store, holder_gone
from ckptd.store.leases import db_now
from ckptd.store.upsert import _dialect_insert

PRUNE, FREEZE = "prune", "freeze"
DEFAULT_TTL = timedelta(minutes=5)


class Busy(Exception):
    """Another process holds the claim (it names the holder and until when)."""

    def __init__(self, run_id: int, job: str, holder: str, until: datetime) -> None:
        super().__init__(f"{job} of run {run_id} is being done by {holder} (claim until {until})")
        self.holder, self.until = holder, until


_claims = tables.run_claims
_leases = tables.run_leases


def _may_take(
    store: Store, now: datetime, lease_owner: str | None, run_ids: Collection[int]
) -> Any:
    """When a claim row (of one of ``run_ids``) may be (re)taken by ``store``'s process: it is
    its own or expired; or, for the daemon ``lease_owner``, it is another daemon process's and
    ``lease_owner`` holds the run's lease now (checked in the same statement, so no takeover
    slips past a change of the lease)."""
    t = _claims
    free = or_(t.c.claimed_by == store.holder, t.c.claimed_until < now)
    if lease_owner is None:
        return free
    # Not a correlated EXISTS: SQLAlchemy does not correlate one inside ON CONFLICT's WHERE.
    leased = select(_leases.c.run_id).where(
        _leases.c.run_id.in_(list(run_ids)),
        _leases.c.owner == lease_owner,
        _leases.c.expires_at > db_now(),
    )
    by_a_daemon = t.c.claimed_by.like(f"%:{DAEMON_TAG}")
    return or_(free, and_(by_a_daemon, t.c.claimed_by != store.holder, t.c.run_id.in_(leased)))


def claim(
    store: Store,
    run_id: int,
    job: str,
    *,
    ttl: timedelta = DEFAULT_TTL,
    lease_owner: str | None = None,
) -> bool:
    """Take (or renew) the claim on ``job`` of ``run_id``; False while another holder's is live
    (unless another daemon's, and ``lease_owner`` is the daemon holding the run's lease)."""
    now = utcnow()
    table = _claims
    stmt = _dialect_insert(store.dialect)(table).values(
        run_id=run_id, job=job, claimed_by=store.holder, claimed_until=now + ttl
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "job"],
        set_={"claimed_by": stmt.excluded.claimed_by, "claimed_until": stmt.excluded.claimed_until},
        where=_may_take(store, now, lease_owner, [run_id]),
    ).returning(table.c.run_id)
    with store.session() as conn:
        # RETURNING: SQLAlchemy keeps no INSERT's rowcount (psycopg then reports -1).
        return conn.execute(stmt).first() is not None


def renew(store: Store, run_id: int, job: str, *, ttl: timedelta = DEFAULT_TTL) -> bool:
    """Extend a claim this process holds; False if it was lost (expired and taken)."""
    t = tables.run_claims
    stmt = (
        update(t)
        .where(and_(t.c.run_id == run_id, t.c.job == job, t.c.claimed_by == store.holder))
        .values(claimed_until=utcnow() + ttl)
    )
    with store.session() as conn:
        return bool(conn.execute(stmt).rowcount)


def release(store: Store, run_id: int, job: str) -> None:
    t = tables.run_claims
    stmt = delete(t).where(
        and_(t.c.run_id == run_id, t.c.job == job, t.c.claimed_by == store.holder)
    )
    with store.session() as conn:
        conn.execute(stmt)


def release_gone(store: Store, job: str) -> int:
    """Drop the claims on ``job`` whose holder process has exited (a daemon killed mid-export
    restarts without waiting for its old claim to expire); returns how many."""
    t = tables.run_claims
    with store.session() as conn:
        holders = conn.scalars(select(t.c.claimed_by).where(t.c.job == job).distinct()).all()
        gone = [h for h in holders if holder_gone(h)]
        if not gone:
            return 0
        stmt = delete(t).where(and_(t.c.job == job, t.c.claimed_by.in_(gone)))
        return int(conn.execute(stmt).rowcount)


def holder_of(store: Store, run_id: int, job: str) -> tuple[str, datetime] | None:
    """The live claim on a job, if any (for messages and ``status``)."""
    t = tables.run_claims
    with store.session() as conn:
        row = conn.execute(
            t.select().where(
                and_(t.c.run_id == run_id, t.c.job == job, t.c.claimed_until >= utcnow())
            )
        ).first()
    return (row.claimed_by, row.claimed_until) if row else None


@contextmanager
def claimed(
    store: Store,
    run_id: int,
    job: str,
    *,
    ttl: timedelta = DEFAULT_TTL,
    lease_owner: str | None = None,
) -> Iterator[None]:
    """Hold the claim for a block of work; :class:`Busy` if another process holds it."""
    if not claim(store, run_id, job, ttl=ttl, lease_owner=lease_owner):
        held = holder_of(store, run_id, job)
        holder, until = held if held else ("another process", utcnow())
        raise Busy(run_id, job, holder, until)
    try:
        yield
    finally:
        release(store, run_id, job)


# ------------------------------------------------------------------ many runs at once

_CHUNK = 500  # run ids per statement


def _chunks(ids: Iterable[int]) -> Iterator[list[int]]:
    ordered = sorted(set(ids))
    for i in range(0, len(ordered), _CHUNK):
        yield ordered[i : i + _CHUNK]


def claim_many(
    store: Store,
    run_ids: Iterable[int],
    job: str,
    *,
    ttl: timedelta = DEFAULT_TTL,
    lease_owner: str | None = None,
) -> set[int]:
    """:func:`claim` for many runs in one transaction; the ids this process now holds.

    A claim whose holder is a process of this host that has died (``handle.holder_gone``) is taken
    over at once instead of after its expiry; so is another daemon's on the runs whose lease
    ``lease_owner`` holds.
    """
    now = utcnow()
    until = now + ttl
    t = _claims
    held: set[int] = set()
    with store.session() as conn:
        for chunk in _chunks(run_ids):
            stmt = _dialect_insert(store.dialect)(t).values(
                [
                    {"run_id": rid, "job": job, "claimed_by": store.holder, "claimed_until": until}
                    for rid in chunk
                ]
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=["run_id", "job"],
                set_={
                    "claimed_by": stmt.excluded.claimed_by,
                    "claimed_until": stmt.excluded.claimed_until,
                },
                where=_may_take(store, now, lease_owner, chunk),
            ).returning(t.c.run_id)
            held.update(conn.execute(stmt).scalars())
            refused = [rid for rid in chunk if rid not in held]
            if not refused:
                continue
            others = conn.execute(
                select(t.c.run_id, t.c.claimed_by).where(t.c.run_id.in_(refused), t.c.job == job)
            ).all()
            for holder in {h for _, h in others if holder_gone(h)}:
                ids = [rid for rid, h in others if h == holder]
                held.update(
                    conn.execute(
                        update(t)
                        .where(t.c.run_id.in_(ids), t.c.job == job, t.c.claimed_by == holder)
                        .values(claimed_by=store.holder, claimed_until=until)
                        .returning(t.c.run_id)
                    ).scalars()
                )
    return held


def renew_many(
    store: Store, run_ids: Iterable[int], job: str, *, ttl: timedelta = DEFAULT_TTL
) -> set[int]:
    """:func:`renew` for many runs; the ids whose claim this process still holds."""
    t = tables.run_claims
    held: set[int] = set()
    with store.session() as conn:
        for chunk in _chunks(run_ids):
            held.update(
                conn.execute(
                    update(t)
                    .where(t.c.run_id.in_(chunk), t.c.job == job, t.c.claimed_by == store.holder)
                    .values(claimed_until=utcnow() + ttl)
                    .returning(t.c.run_id)
                ).scalars()
            )
    return held


def release_many(store: Store, run_ids: Iterable[int], job: str) -> None:
    t = tables.run_claims
    with store.session() as conn:
        for chunk in _chunks(run_ids):
            conn.execute(
                delete(t).where(
                    t.c.run_id.in_(chunk), t.c.job == job, t.c.claimed_by == store.holder
                )
            )


def holders(store: Store, run_ids: Iterable[int], job: str) -> dict[int, tuple[str, datetime]]:
    """The live claims on ``job`` of these runs: run id -> (holder, until), for messages."""
    t = tables.run_claims
    out: dict[int, tuple[str, datetime]] = {}
    with store.session() as conn:
        for chunk in _chunks(run_ids):
            rows = conn.execute(
                select(t.c.run_id, t.c.claimed_by, t.c.claimed_until).where(
                    t.c.run_id.in_(chunk), t.c.job == job, t.c.claimed_until >= utcnow()
                )
            )
            out.update({rid: (holder, until) for rid, holder, until in rows})
    return out
