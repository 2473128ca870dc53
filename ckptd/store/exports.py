"""The ``exports`` rows: an ``exporting`` intent, then ``published``, ``failed`` or ``removed``.

Each export gets the next serving version of its export root (its directory's name), so TF
Serving, which serves the highest version, serves the newest publish. A failed export records
its attempt and when the daemon tries again (the backoff of ``core/backoff``, as evaluations).

The export itself (worker calls, temp directory, rename) is ``api/freeze``; the claim that keeps
two processes from exporting one run at once is ``store/claims`` (``FREEZE``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, select, update

from ckptd.core.model import Checkpoint, utcnow
from ckptd.store import audit, leases, reads, tables
from ckptd.store.db import insert_id
from ckptd.store.handle import Store
from ckptd.store.leases import Hold

EXPORTING, PUBLISHED, FAILED, REMOVED = "exporting", "published", "failed", "removed"

_x = tables.exports
_c = tables.checkpoints
_r = tables.runs
_EXPORT_COLUMNS = (
    _x.c.id,
    _c.c.run_id,
    _x.c.checkpoint_id,
    _x.c.path,
    _x.c.version,
    _x.c.format,
)


def _in_root(root: str) -> Any:
    """Rows whose path is a version directory right under ``root`` (no deeper)."""
    escaped = root.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return and_(
        _x.c.path.like(f"{escaped}/%", escape="\\"),
        ~_x.c.path.like(f"{escaped}/%/%", escape="\\"),
    )


@dataclass(frozen=True)
class Export:
    id: int
    run_id: int
    checkpoint_id: int
    path: str
    version: int
    format: str = "saved_model"  # its formats, joined by "+"


@dataclass(frozen=True)
class Attempt:
    """The newest export of one checkpoint, as far as retrying it goes."""

    status: str
    attempt: int | None  # None: written before attempts were counted
    next_attempt_at: datetime | None
    error: str | None

    @property
    def gave_up(self) -> bool:
        return self.status == FAILED and self.attempt is not None and self.next_attempt_at is None


@dataclass(frozen=True)
class Retry:
    """A run whose newest export failed: what, how often, and when it is tried again."""

    run: str
    checkpoint: str
    step: int | None
    attempt: int | None
    next_attempt_at: datetime | None  # None: the daemon gave up (``ckptd freeze`` tries again)
    error: str | None


def history(store: Store, run_id: int) -> tuple[list[Checkpoint], list[Export]]:
    """A run's checkpoints, and its published exports, newest version first."""
    with store.session() as s:
        checkpoints = reads.checkpoints(s, run_id=run_id)
        published = [
            Export(*row)
            for row in s.execute(
                select(*_EXPORT_COLUMNS)
                .join(_c, _c.c.id == _x.c.checkpoint_id)
                .where(_x.c.status == PUBLISHED, _c.c.run_id == run_id)
                .order_by(_x.c.version.desc(), _x.c.id.desc())
            ).all()
        ]
    return checkpoints, published


def last_attempt(store: Store, checkpoint_id: int) -> Attempt | None:
    """The newest export row of a checkpoint (None: never exported)."""
    with store.session() as s:
        row = s.execute(
            select(_x.c.status, _x.c.attempt, _x.c.next_attempt_at, _x.c.error)
            .where(_x.c.checkpoint_id == checkpoint_id)
            .order_by(_x.c.id.desc())
            .limit(1)
        ).first()
    return Attempt(*row) if row else None


def listed(store: Store, status: str) -> list[Export]:
    """Every export in ``status``, oldest first."""
    with store.session() as s:
        rows = s.execute(
            select(*_EXPORT_COLUMNS)
            .join(_c, _c.c.id == _x.c.checkpoint_id)
            .where(_x.c.status == status)
            .order_by(_x.c.id)
        ).all()
    return [Export(*row) for row in rows]


def published_under(store: Store, root: str) -> list[Export]:
    """The published exports under the directory ``root``, highest version first."""
    with store.session() as s:
        rows = s.execute(
            select(*_EXPORT_COLUMNS)
            .join(_c, _c.c.id == _x.c.checkpoint_id)
            .where(_x.c.status == PUBLISHED, _in_root(root))
            .order_by(_x.c.version.desc(), _x.c.id.desc())
        ).all()
    return [Export(*row) for row in rows]


def begin(
    store: Store,
    c: Checkpoint,
    *,
    root: str,
    on_disk: int,
    formats: str,
    metric: str | None,
    metric_value: float | None,
    hold: Hold | None = None,
) -> tuple[int, int, int]:
    """The intent: an ``exporting`` row, written before anything is (crash recovery). Its version
    is one more than any export of ``root`` had (failed ones never appeared) and than
    ``on_disk``, the highest numeric directory there; its attempt, one more than the
    checkpoint's previous export if that failed. Returns (export id, version, attempt).
    ``hold``: the daemon's lease of the run, checked in the same transaction
    (:class:`leases.Fenced`, and nothing is written, if it is gone)."""
    with store.session() as s:
        if hold is not None:
            leases.fence(s, hold)
        if store.dialect == "postgresql":  # (SQLite: BEGIN IMMEDIATE serialises writers)
            # Two exports of the run read the highest version one after the other.
            s.execute(select(_r.c.id).where(_r.c.id == c.run_id).with_for_update())
        latest = s.scalar(
            select(func.max(_x.c.version)).where(_in_root(root), _x.c.status != FAILED)
        )
        version = max(latest or 0, on_disk) + 1
        previous = s.execute(
            select(_x.c.status, _x.c.attempt)
            .where(_x.c.checkpoint_id == c.id)
            .order_by(_x.c.id.desc())
            .limit(1)
        ).first()
        attempt = (previous[1] or 1) + 1 if previous and previous[0] == FAILED else 1
        export_id = insert_id(
            s,
            insert(_x).values(
                checkpoint_id=c.id,
                format=formats,
                version=version,
                path=f"{root}/{version}",
                status=EXPORTING,
                verified=False,
                created_at=utcnow(),
                step=c.step,
                metric=metric,
                metric_value=metric_value,
                attempt=attempt,
            ),
        )
    return export_id, version, attempt


def published(
    store: Store,
    export_id: int,
    c: Checkpoint,
    *,
    verified: bool,
    reason: str,
    detail: dict[str, Any],
    hold: Hold | None = None,
    publish: Callable[[], None] | None = None,
) -> None:
    """The export is in place under its numeric name: ``published`` and an ``exported`` row.
    ``publish`` (the rename into place) runs inside this transaction, after ``hold`` is checked:
    the lease row stays locked until the commit, so a daemon that lost the run's lease neither
    renames nor writes (:class:`leases.Fenced`), and an error of ``publish`` writes nothing."""
    with store.session() as s:
        if hold is not None:
            leases.fence(s, hold)
        if publish is not None:
            publish()
        s.execute(
            update(_x).where(_x.c.id == export_id).values(status=PUBLISHED, verified=verified)
        )
        path = s.scalar(select(_x.c.path).where(_x.c.id == export_id))
        audit.record(
            s,
            "exported",
            run_id=c.run_id,
            checkpoint_id=c.id,
            subject=path,
            reason=reason,
            detail=detail,
        )


def failed(
    store: Store,
    export_id: int,
    c: Checkpoint,
    error: str,
    *,
    attempt: int,
    retry_at: datetime | None,
    hold: Hold | None = None,
) -> None:
    """Record failed ``attempt``, tried again at ``retry_at`` (None: not by the daemon).
    ``hold``: the daemon's lease of the run, checked first (:class:`leases.Fenced`, and the
    row stays ``exporting`` for the run's new holder to settle, if it is gone)."""
    with store.session() as s:
        if hold is not None:
            leases.fence(s, hold)
        s.execute(
            update(_x)
            .where(_x.c.id == export_id)
            .values(status=FAILED, error=error, next_attempt_at=retry_at)
        )
        audit.record(
            s,
            "export_failed",
            run_id=c.run_id,
            checkpoint_id=c.id,
            subject=c.prefix,
            reason=error,
            detail={
                "step": c.step,
                "attempt": attempt,
                "final": retry_at is None,
                "retry_at": retry_at.isoformat() if retry_at else None,
            },
        )


def removed(
    store: Store,
    export: Export,
    *,
    reason: str,
    hold: Hold | None = None,
    remove: Callable[[], object] | None = None,
) -> None:
    """A retired export's directory is gone: ``removed`` and an ``export_removed`` row.
    ``remove`` (the removal of the directory) runs inside this transaction, after ``hold`` is
    checked, as ``published``'s rename: a daemon that lost the run's lease removes nothing
    (:class:`leases.Fenced`), and an error of ``remove`` writes nothing."""
    with store.session() as s:
        if hold is not None:
            leases.fence(s, hold)
        if remove is not None:
            remove()
        s.execute(
            update(_x).where(_x.c.id == export.id).values(status=REMOVED, removed_at=utcnow())
        )
        audit.record(s, "export_removed", run_id=export.run_id, subject=export.path, reason=reason)


def recovered(
    store: Store,
    *,
    published: Collection[int] = (),
    failed: Collection[int] = (),
    removed: Collection[int] = (),
    error: str = "",
) -> None:
    """Settle the rows a crash left behind, as recovery found them on disk: an interrupted
    export whose directory exists was published (only its commit was lost), one without failed
    (``error``; redone at once: the interruption was not the export's fault), and a published
    one whose directory is gone was removed."""
    with store.session() as s:
        now = utcnow()
        if published:
            s.execute(
                update(_x)
                .where(_x.c.id.in_(list(published)), _x.c.status == EXPORTING)
                .values(status=PUBLISHED, verified=True)
            )
        if failed:
            s.execute(
                update(_x)
                .where(_x.c.id.in_(list(failed)), _x.c.status == EXPORTING)
                .values(status=FAILED, error=error, next_attempt_at=now)
            )
        if removed:
            s.execute(
                update(_x)
                .where(_x.c.id.in_(list(removed)), _x.c.status == PUBLISHED)
                .values(status=REMOVED, removed_at=now)
            )


def retries(store: Store) -> list[Retry]:
    """The runs whose newest export failed, by run name (what ``status`` shows)."""
    newest = (
        select(func.max(_x.c.id))
        .select_from(_x.join(_c, _c.c.id == _x.c.checkpoint_id))
        .group_by(_c.c.run_id)
    )
    with store.session() as s:
        rows = s.execute(
            select(
                _r.c.name,
                _c.c.prefix,
                _c.c.step,
                _x.c.attempt,
                _x.c.next_attempt_at,
                _x.c.error,
            )
            .select_from(
                _x.join(_c, _c.c.id == _x.c.checkpoint_id).join(_r, _r.c.id == _c.c.run_id)
            )
            .where(_x.c.id.in_(newest), _x.c.status == FAILED)
            .order_by(_r.c.name)
        ).all()
    return [Retry(*row) for row in rows]
