"""The evaluation queue (``evaluations`` rows): pending → running (claimed) → done | failed.

A job is claimed by one conditional UPDATE that names its holder and an expiry
(``claimed_by``, ``claimed_until``): of two processes (daemons, ``ckptd evaluate``, ``ckptd
worker``) that pick the same row, exactly one claims it; the holder renews the claim while it
works, and a ``running`` row whose claim expired (its holder died) is claimable again. Results
are written only while the claim is still the writer's and unexpired, so a job taken over after
an expiry is never recorded twice: the claim, not a daemon's run lease, fences an evaluation's
result (a remote worker holds none).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, exists, literal, or_, select, update

from ckptd.core.model import COMPLETE, Checkpoint, utcnow
from ckptd.store import audit, reads, tables, versions
from ckptd.store.handle import Store, holder_gone
from ckptd.store.upsert import _dialect_insert, upsert

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
# A job given back to the queue, for any evaluator to claim.
REQUEUED: dict[str, Any] = {"status": PENDING, "claimed_by": None, "claimed_until": None}

_e = tables.evaluations
_c = tables.checkpoints
_r = tables.runs


@dataclass(frozen=True)
class Candidate:
    """A job that may be claimed now (the caller picks which, by its watch's settings)."""

    evaluation_id: int
    checkpoint_id: int
    step: int | None
    watch_path: str
    has_meta: bool


@dataclass(frozen=True)
class Job:
    """A claimed evaluation: the checkpoint, its run's path, and this attempt's number."""

    evaluation_id: int
    checkpoint: Checkpoint
    run_path: str
    attempt: int


def present() -> ColumnElement[bool]:
    """The evaluation's checkpoint is complete: one gone, pruned or replaced is no work (its
    row stays as history, but is neither claimed nor counted as pending)."""
    # Correlated (a primary-key lookup per row), never a list of every complete checkpoint.
    return exists().where(_c.c.id == _e.c.checkpoint_id, _c.c.state == COMPLETE)


def live_claim(now: datetime) -> ColumnElement[bool]:
    """The row's claim has not expired (a running job's holder may still write its result)."""
    return and_(_e.c.claimed_until.is_not(None), _e.c.claimed_until >= now)


def _claimable(now: datetime) -> ColumnElement[bool]:
    """Pending and due, or running under a claim that expired (or was never named: rows
    written before claims existed)."""
    return or_(
        and_(
            _e.c.status == PENDING,
            or_(_e.c.next_attempt_at.is_(None), _e.c.next_attempt_at <= now),
        ),
        and_(
            _e.c.status == RUNNING,
            or_(_e.c.claimed_until.is_(None), _e.c.claimed_until < now),
        ),
    )


def scope(
    stmt: Select[Any], run_ids: Collection[int] | None, checkpoint_ids: Collection[int] | None
) -> Select[Any]:
    """Narrow a statement over ``checkpoints`` to some runs and/or checkpoints."""
    if run_ids is not None:
        stmt = stmt.where(_c.c.run_id.in_(list(run_ids)))
    if checkpoint_ids is not None:
        stmt = stmt.where(_c.c.id.in_(list(checkpoint_ids)))
    return stmt


def enqueue(
    store: Store,
    watch_paths: Sequence[str],
    *,
    run_ids: Collection[int] | None = None,
    checkpoint_ids: Collection[int] | None = None,
) -> int:
    """Give every complete checkpoint of ``watch_paths`` (narrowed to ``run_ids`` and
    ``checkpoint_ids``) that has no evaluation a ``pending`` one, in one statement."""
    if not watch_paths:
        return 0
    rows = (
        select(_c.c.id, literal(PENDING), literal(0))
        .join(_r, _r.c.id == _c.c.run_id)
        .outerjoin(_e, _e.c.checkpoint_id == _c.c.id)
        .where(_c.c.state == COMPLETE, _r.c.watch_path.in_(list(watch_paths)), _e.c.id.is_(None))
    )
    rows = scope(rows, run_ids, checkpoint_ids)
    stmt = (
        _dialect_insert(store.dialect)(_e)
        .from_select(["checkpoint_id", "status", "attempts"], rows)
        .on_conflict_do_nothing(index_elements=["checkpoint_id"])
        .execution_options(preserve_rowcount=True)  # an INSERT's is dropped otherwise (psycopg)
    )
    with store.session() as s:
        return int(s.execute(stmt).rowcount)


def requeue(
    store: Store,
    *,
    run_ids: Collection[int] | None = None,
    checkpoint_ids: Collection[int] | None = None,
) -> int:
    """``--again`` (or a checkpoint asked for by name): make these evaluations pending afresh
    and due now, except one that another process is running right now (it is being evaluated
    already) and those of checkpoints no longer complete."""
    now = utcnow()
    stmt = (
        update(_e)
        .where(
            _e.c.checkpoint_id.in_(
                scope(select(_c.c.id).where(_c.c.state == COMPLETE), run_ids, checkpoint_ids)
            ),
            or_(
                _e.c.status != RUNNING,
                _e.c.claimed_until.is_(None),
                _e.c.claimed_until < now,
                _e.c.claimed_by == store.holder,
            ),
        )
        .values(**REQUEUED, attempts=0, error=None, next_attempt_at=None)
    )
    with store.session() as s:
        return int(s.execute(stmt).rowcount)


def candidates(
    store: Store,
    watch_paths: Sequence[str],
    *,
    run_ids: Collection[int] | None = None,
    checkpoint_ids: Collection[int] | None = None,
) -> list[Candidate]:
    """The jobs claimable now, by step (oldest first)."""
    if not watch_paths:
        return []
    stmt = (
        select(_e.c.id, _c.c.id, _c.c.step, _r.c.watch_path, _c.c.has_meta)
        .join(_c, _c.c.id == _e.c.checkpoint_id)
        .join(_r, _r.c.id == _c.c.run_id)
        .where(
            _claimable(utcnow()),
            _c.c.state == COMPLETE,
            _r.c.watch_path.in_(list(watch_paths)),
        )
        .order_by(_c.c.step, _c.c.id)
    )
    stmt = scope(stmt, run_ids, checkpoint_ids)
    with store.session() as s:
        return [Candidate(*row) for row in s.execute(stmt).all()]


def claim(store: Store, evaluation_id: int, *, ttl: timedelta) -> Job | None:
    """Claim one job for ``ttl``; None when another process got there first (or it is no
    longer claimable). Counts the attempt."""
    now = utcnow()
    # PostgreSQL skips a row another claimer has locked instead of waiting for it (SQLite
    # renders no FOR UPDATE: BEGIN IMMEDIATE serialises its writers).
    unlocked = select(_e.c.id).where(_e.c.id == evaluation_id, _claimable(now))
    stmt = (
        update(_e)
        .where(
            _e.c.id.in_(unlocked.with_for_update(skip_locked=True).scalar_subquery()),
            _claimable(now),
            present(),
        )
        .values(
            status=RUNNING,
            claimed_by=store.holder,
            claimed_until=now + ttl,
            started_at=now,
            attempts=_e.c.attempts + 1,
            error=None,
        )
    )
    with store.session() as s:
        if not s.execute(stmt).rowcount:
            return None
        cid, attempt, run_path = s.execute(
            select(_e.c.checkpoint_id, _e.c.attempts, _r.c.path)
            .join(_c, _c.c.id == _e.c.checkpoint_id)
            .join(_r, _r.c.id == _c.c.run_id)
            .where(_e.c.id == evaluation_id)
        ).one()
        (checkpoint,) = reads.checkpoints(s, ids=[cid])
    return Job(evaluation_id, checkpoint, run_path, int(attempt))


def _ours(store: Store, job: Job, *, live: bool = True) -> ColumnElement[bool]:
    """Still this process's job: running under its claim, and (``live``) unexpired: a holder
    that lost its claim (paused past it; whoever holds the run's lease) writes nothing."""
    ours = and_(
        _e.c.id == job.evaluation_id, _e.c.status == RUNNING, _e.c.claimed_by == store.holder
    )
    return and_(ours, live_claim(utcnow())) if live else ours


def renew(store: Store, job: Job, *, ttl: timedelta) -> bool:
    """Extend the claim; False when it is no longer ours (it expired, taken over or not)."""
    stmt = update(_e).where(_ours(store, job)).values(claimed_until=utcnow() + ttl)
    with store.session() as s:
        return bool(s.execute(stmt).rowcount)


def _finish(conn: Connection, store: Store, job: Job, live: bool = True, **values: Any) -> bool:
    stmt = update(_e).where(_ours(store, job, live=live))
    if conn.execute(stmt.values(claimed_by=None, claimed_until=None, **values)).rowcount:
        return True
    if live:  # a result refused: say so in `ckptd events` (the caller logs it)
        c = job.checkpoint
        audit.record(
            conn,
            "fenced",
            run_id=c.run_id,
            checkpoint_id=c.id,
            subject=store.holder,
            reason=f"evaluation result of {c.label} refused: {store.holder} no longer holds "
            "its claim (it expired, and another process may have taken the job over)",
        )
    return False


def finish_done(store: Store, job: Job, metrics: dict[str, float], seconds: float) -> bool:
    """Record a success (the metrics, the evaluation done, an ``evaluated`` audit row) in one
    transaction; False, writing nothing, when the job is no longer ours."""
    c, now = job.checkpoint, utcnow()
    stored = {k: (None if v != v else v) for k, v in metrics.items()}  # NaN is stored as NULL
    with store.session() as s:
        if not _finish(
            s, store, job, status=DONE, duration_s=seconds, finished_at=now, next_attempt_at=None
        ):
            return False
        upsert(
            s,
            tables.metrics,
            [
                dict(
                    checkpoint_id=c.id,
                    name=k,
                    value=v,
                    step=c.step,
                    source="evaluator",
                    recorded_at=now,
                )
                for k, v in stored.items()
            ],
            keys=("checkpoint_id", "name", "source"),
            update=("value", "step", "recorded_at"),
        )
        versions.bump(s, [c.run_id])
        audit.record(
            s,
            "evaluated",
            at=now,
            run_id=c.run_id,
            checkpoint_id=c.id,
            subject=c.prefix,
            detail={
                "step": c.step,
                "metrics": stored,
                "seconds": round(seconds, 4),
                "by": store.holder,
            },
        )
    return True


def finish_failed(
    store: Store,
    job: Job,
    *,
    error: str,
    kind: str,
    seconds: float,
    retry_at: datetime | None,
) -> bool:
    """Record a failure: pending again at ``retry_at``, or failed for good when it is None.
    False, writing nothing, when the job is no longer ours."""
    c, now = job.checkpoint, utcnow()
    final = retry_at is None
    with store.session() as s:
        if not _finish(
            s,
            store,
            job,
            status=FAILED if final else PENDING,
            error=error,
            duration_s=seconds,
            finished_at=now,
            next_attempt_at=retry_at,
        ):
            return False
        audit.record(
            s,
            "evaluation_failed",
            at=now,
            run_id=c.run_id,
            checkpoint_id=c.id,
            subject=c.prefix,
            reason=error,
            detail={"attempt": job.attempt, "final": final, "kind": kind, "by": store.holder},
        )
    return True


def release(store: Store, job: Job) -> bool:
    """Give a job back to the queue unfinished (this process is stopping): pending at once."""
    with store.session() as s:
        return _finish(s, store, job, live=False, status=PENDING)


def release_gone(store: Store) -> int:
    """Jobs whose holder process has exited go back to the queue now, not at their expiry
    (a live holder's job, e.g. a running ``ckptd evaluate``, is left alone)."""
    with store.session() as s:
        holders = s.scalars(
            select(_e.c.claimed_by)
            .where(_e.c.status == RUNNING, _e.c.claimed_by.is_not(None))
            .distinct()
        ).all()
        gone = [h for h in holders if h and holder_gone(h)]
        if not gone:
            return 0
        stmt = (
            update(_e).where(_e.c.status == RUNNING, _e.c.claimed_by.in_(gone)).values(**REQUEUED)
        )
        return int(s.execute(stmt).rowcount)
