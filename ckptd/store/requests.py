"""The ``requests`` table: work the CLI hands to a running daemon (``ckptd evaluate``/``freeze``).

pending → running (claimed by the daemon, renewed while it works) → done | cancelled. The CLI
inserts a row and polls it; the daemon polls for pending rows (one indexed SELECT), claims one by a
conditional update, writes progress into ``result`` as it goes and the outcome at the end. A
holder that dies leaves a claim that expires: the CLI waiting on it says so.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update

from ckptd.core.model import Checkpoint, Run, utcnow
from ckptd.store import reads
from ckptd.store import runs as store_runs
from ckptd.store.db import insert_id
from ckptd.store.handle import Store
from ckptd.store.tables import RequestRow, RunRow, table_of

PENDING, RUNNING, DONE, CANCELLED = "pending", "running", "done", "cancelled"
EVALUATE, FREEZE = "evaluate", "freeze"

_q = table_of(RequestRow)
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
        return insert_id(
            s,
            insert(_q).values(
                kind=kind,
                run_id=run_id,
                checkpoint_id=checkpoint_id,
                options=options,
                status=PENDING,
                requested_by=store.holder,
                requested_at=utcnow(),
            ),
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
        return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def any_claimable(store: Store) -> bool:
    """Whether a request waits (the daemon's cheap poll: one indexed lookup)."""
    with store.session() as s:
        return s.scalar(select(_q.c.id).where(_q.c.status == PENDING).limit(1)) is not None


def claim_next(
    store: Store, *, ttl: timedelta, run_ids: Collection[int] | None = None
) -> Claimed | None:
    """Claim the oldest pending request for ``ttl`` (of ``run_ids`` only, when given: a daemon
    serves the requests of the runs it holds the leases of)."""
    now = utcnow()
    claimable = _q.c.status == PENDING  # (one a dead holder left running: its CLI gave up)
    if run_ids is not None:
        claimable = and_(claimable, _q.c.run_id.in_(sorted(run_ids)))
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
            ).rowcount  # type: ignore[attr-defined]
            if not taken:
                continue  # another daemon took it first
            row = s.execute(
                select(_q.c.kind, _q.c.run_id, _q.c.checkpoint_id, _q.c.options).where(
                    _q.c.id == request_id
                )
            ).one()
            run = store_runs.to_run(s.get_one(RunRow, row.run_id))
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
        return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def progress(store: Store, request_id: int, result: dict[str, Any], *, ttl: timedelta) -> bool:
    """Write progress and renew the claim; False when the request is no longer ours."""
    stmt = (
        update(_q)
        .where(_ours(store, request_id))
        .values(result=result, claimed_until=utcnow() + ttl)
    )
    with store.session() as s:
        return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def finish(
    store: Store, request_id: int, *, result: dict[str, Any] | None, error: str | None = None
) -> bool:
    """The request is done: its outcome, or why the daemon could not do it."""
    values: dict[str, Any] = dict(status=DONE, error=error, finished_at=utcnow())
    if result is not None:
        values["result"] = result
    with store.session() as s:
        return bool(
            s.execute(update(_q).where(_ours(store, request_id)).values(**values)).rowcount  # type: ignore[attr-defined]
        )
