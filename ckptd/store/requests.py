"""The ``requests`` table: work the CLI hands to a running daemon (``ckptd evaluate``/``freeze``).

pending → running (claimed by a daemon or a ``ckptd worker``, renewed while it works) → done |
cancelled. The CLI inserts a row and polls it; a daemon whose exports are left to workers inserts
one for each scheduled export. Daemons and workers poll for pending rows (one indexed SELECT),
claim one by a conditional update, write progress into ``result`` as it goes and the outcome at
the end. A holder that dies leaves a claim that expires: the row is then claimable again, unless
the CLI waiting on it gave up first (``abandon``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update

from ckptd.core.model import Checkpoint, Run, utcnow
from ckptd.store import reads, tables
from ckptd.store import runs as store_runs
from ckptd.store.db import insert_id
from ckptd.store.handle import Store

PENDING, RUNNING, DONE, CANCELLED = "pending", "running", "done", "cancelled"
EVALUATE, FREEZE = "evaluate", "freeze"

_q = tables.requests
_r = tables.runs
KEEP = timedelta(days=1)  # how long finished (or abandoned) requests stay


@dataclass(frozen=True)
class Request:
    """A request as the CLI polls it."""

    id: int
    kind: str
    status: str
    claimed_by: str | None
    claimed_until: datetime | None
    result: dict[str, Any]
    error: str | None


@dataclass(frozen=True)
class Claimed:
    """A request the daemon claimed: what to do it on."""

    id: int
    kind: str
    run: Run
    checkpoint: Checkpoint | None
    options: dict[str, Any]


def submit(
    store: Store, kind: str, run_id: int, checkpoint_id: int | None, options: dict[str, Any]
) -> int:
    """Queue a request; its id."""
    with store.session() as s:
        return insert_id(s, _new(store, kind, run_id, checkpoint_id, options, utcnow()))


def _new(
    store: Store,
    kind: str,
    run_id: int,
    checkpoint_id: int | None,
    options: dict[str, Any],
    now: datetime,
) -> Any:
    """The INSERT of a pending request by this process."""
    return insert(_q).values(
        kind=kind,
        run_id=run_id,
        checkpoint_id=checkpoint_id,
        options=options,
        status=PENDING,
        requested_by=store.holder,
        requested_at=now,
    )


def get(store: Store, request_id: int) -> Request | None:
    with store.session() as s:
        row = s.execute(
            select(
                _q.c.id,
                _q.c.kind,
                _q.c.status,
                _q.c.claimed_by,
                _q.c.claimed_until,
                _q.c.result,
                _q.c.error,
            ).where(_q.c.id == request_id)
        ).first()
    if row is None:
        return None
    return Request(row[0], row[1], row[2], row[3], row[4], dict(row[5] or {}), row[6])


def cancel(store: Store, request_id: int) -> bool:
    """Withdraw a request no one has claimed yet; False once the daemon has it."""
    stmt = (
        update(_q)
        .where(_q.c.id == request_id, _q.c.status == PENDING)
        .values(status=CANCELLED, finished_at=utcnow())
    )
    with store.session() as s:
        return bool(s.execute(stmt).rowcount)


def submit_unless_open(
    store: Store, kind: str, run_id: int, options: dict[str, Any], *, now: datetime | None = None
) -> int | None:
    """Queue a request of ``kind`` for the run unless one is pending or running (a scheduled
    export is queued once, however often the schedule fires while it waits; one whose holder
    died is claimable again); its id, or None. One transaction: two daemons cannot both."""
    now = now or utcnow()
    with store.session() as s:
        if store.dialect == "postgresql":  # (SQLite: BEGIN IMMEDIATE serialises writers)
            s.execute(select(_r.c.id).where(_r.c.id == run_id).with_for_update())
        open_ = s.scalar(
            select(_q.c.id)
            .where(_q.c.run_id == run_id, _q.c.kind == kind, _q.c.status.in_([PENDING, RUNNING]))
            .limit(1)
        )
        if open_ is not None:
            return None
        return insert_id(s, _new(store, kind, run_id, None, options, now))


def runs_of(store: Store, watch_paths: Collection[str]) -> list[int]:
    """The runs of these watches (what a ``ckptd worker`` serves), for :func:`claim_next`."""
    if not watch_paths:
        return []
    with store.session() as s:
        return list(s.scalars(select(_r.c.id).where(_r.c.watch_path.in_(list(watch_paths)))))


def _claimable(now: datetime) -> Any:
    """Pending, or running under a claim that expired (its holder died: kill -9, power loss)."""
    return or_(_q.c.status == PENDING, and_(_q.c.status == RUNNING, _q.c.claimed_until < now))


def _narrowed(
    claimable: Any, run_ids: Collection[int] | None, kinds: Collection[str] | None
) -> Any:
    if run_ids is not None:
        claimable = and_(claimable, _q.c.run_id.in_(list(run_ids)))
    if kinds is not None:
        claimable = and_(claimable, _q.c.kind.in_(list(kinds)))
    return claimable


def any_claimable(store: Store, *, kinds: Collection[str] | None = None) -> bool:
    """Whether a request waits (the cheap poll of daemons and workers: one indexed lookup)."""
    with store.session() as s:
        pick = select(_q.c.id).where(_narrowed(_claimable(utcnow()), None, kinds)).limit(1)
        return s.scalar(pick) is not None


def claim_next(
    store: Store,
    *,
    ttl: timedelta,
    run_ids: Collection[int] | None = None,
    kinds: Collection[str] | None = None,
) -> Claimed | None:
    """Claim the oldest claimable request (of ``run_ids``' runs, of ``kinds``) for ``ttl``."""
    now = utcnow()
    claimable = _narrowed(_claimable(now), run_ids, kinds)
    with store.session() as s:
        # Finished requests are kept a while for whoever polls them, then dropped here (only
        # when there is work, so an idle daemon never writes).
        s.execute(
            delete(_q).where(
                or_(
                    and_(_q.c.status.in_([DONE, CANCELLED]), _q.c.finished_at < now - KEEP),
                    and_(_q.c.status == RUNNING, _q.c.claimed_until < now - KEEP),
                )
            )
        )
        # PostgreSQL: rows another claimer has locked are skipped, not waited for (SQLite
        # renders no FOR UPDATE: its writers are serialised by BEGIN IMMEDIATE).
        pick = select(_q.c.id).where(claimable).order_by(_q.c.id).limit(10)
        ids = s.scalars(pick.with_for_update(skip_locked=True)).all()
        for request_id in ids:
            taken = s.execute(
                update(_q)
                .where(_q.c.id == request_id, claimable)
                .values(status=RUNNING, claimed_by=store.holder, claimed_until=now + ttl)
            ).rowcount
            if not taken:
                continue  # another daemon or worker took it first
            row = s.execute(
                select(_q.c.kind, _q.c.run_id, _q.c.checkpoint_id, _q.c.options).where(
                    _q.c.id == request_id
                )
            ).one()
            run = store_runs.run_by_id(s, row.run_id)
            checkpoint = (
                reads.checkpoints(s, ids=[row.checkpoint_id])[0]
                if row.checkpoint_id is not None
                else None
            )
            return Claimed(request_id, row.kind, run, checkpoint, dict(row.options or {}))
    return None


def _ours(store: Store, request_id: int) -> Any:
    return and_(_q.c.id == request_id, _q.c.status == RUNNING, _q.c.claimed_by == store.holder)


def renew(store: Store, request_id: int, *, ttl: timedelta) -> bool:
    """Extend the claim while the work runs; False when the request is no longer ours."""
    stmt = update(_q).where(_ours(store, request_id)).values(claimed_until=utcnow() + ttl)
    with store.session() as s:
        return bool(s.execute(stmt).rowcount)


def progress(store: Store, request_id: int, result: dict[str, Any], *, ttl: timedelta) -> bool:
    """Write progress and renew the claim; False when the request is no longer ours."""
    stmt = (
        update(_q)
        .where(_ours(store, request_id))
        .values(result=result, claimed_until=utcnow() + ttl)
    )
    with store.session() as s:
        return bool(s.execute(stmt).rowcount)


def release(store: Store, request_id: int) -> bool:
    """Give a request back unfinished (this process is stopping): pending for another."""
    stmt = (
        update(_q)
        .where(_ours(store, request_id))
        .values(status=PENDING, claimed_by=None, claimed_until=None)
    )
    with store.session() as s:
        return bool(s.execute(stmt).rowcount)


def abandon(store: Store, request_id: int, holder: str) -> bool:
    """The CLI waiting on a request gives up on ``holder`` (its claim lapsed, or it exited):
    cancelled, unless another process has claimed it since (then the CLI waits on)."""
    stmt = (
        update(_q)
        .where(_q.c.id == request_id, _q.c.status == RUNNING, _q.c.claimed_by == holder)
        .values(status=CANCELLED, finished_at=utcnow())
    )
    with store.session() as s:
        return bool(s.execute(stmt).rowcount)


def finish(
    store: Store, request_id: int, *, result: dict[str, Any] | None, error: str | None = None
) -> bool:
    """The request is done: its outcome, or why the daemon could not do it."""
    values: dict[str, Any] = dict(status=DONE, error=error, finished_at=utcnow())
    if result is not None:
        values["result"] = result
    with store.session() as s:
        return bool(s.execute(update(_q).where(_ours(store, request_id)).values(**values)).rowcount)
