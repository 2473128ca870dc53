"""The ``exports`` rows: an ``exporting`` intent, then ``published``, ``failed`` or ``removed``.

The export itself (worker calls, temp directory, rename) is ``api/freeze``; the claim that keeps
two processes from exporting one run at once is ``store/claims`` (``FREEZE``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update

from ckptd.core.model import Checkpoint, utcnow
from ckptd.store import audit, reads
from ckptd.store.db import insert_id
from ckptd.store.handle import Store
from ckptd.store.tables import CheckpointRow, ExportRow, table_of

EXPORTING, PUBLISHED, FAILED, REMOVED = "exporting", "published", "failed", "removed"

_x = table_of(ExportRow)
_c = table_of(CheckpointRow)


@dataclass(frozen=True)
class Export:
    id: int
    run_id: int
    checkpoint_id: int
    path: str


def history(store: Store, run_id: int) -> tuple[list[Checkpoint], dict[int, str]]:
    """A run's checkpoints, and the path of each published export of one (by checkpoint id)."""
    with store.session() as s:
        checkpoints = reads.checkpoints(s, run_id=run_id)
        published = dict(
            s.execute(
                select(_x.c.checkpoint_id, _x.c.path)
                .join(_c, _c.c.id == _x.c.checkpoint_id)
                .where(_x.c.status == PUBLISHED, _c.c.run_id == run_id)
            ).all()
        )
    return checkpoints, published


def listed(store: Store, status: str) -> list[Export]:
    """Every export in ``status``, oldest first."""
    with store.session() as s:
        rows = s.execute(
            select(_x.c.id, _c.c.run_id, _x.c.checkpoint_id, _x.c.path)
            .join(_c, _c.c.id == _x.c.checkpoint_id)
            .where(_x.c.status == status)
            .order_by(_x.c.id)
        ).all()
    return [Export(*row) for row in rows]


def published_under(store: Store, root: str) -> list[Export]:
    """The published exports under the directory ``root``, newest first."""
    with store.session() as s:
        rows = s.execute(
            select(_x.c.id, _c.c.run_id, _x.c.checkpoint_id, _x.c.path)
            .join(_c, _c.c.id == _x.c.checkpoint_id)
            .where(_x.c.status == PUBLISHED, _x.c.path.like(f"{root}/%"))
            .order_by(_x.c.created_at.desc(), _x.c.id.desc())
        ).all()
    return [Export(*row) for row in rows]


def begin(store: Store, c: Checkpoint, *, formats: str, version: int, path: str) -> int:
    """The intent: an ``exporting`` row, written before anything is (crash recovery)."""
    with store.session() as s:
        return insert_id(
            s,
            insert(_x).values(
                checkpoint_id=c.id,
                format=formats,
                version=version,
                path=path,
                status=EXPORTING,
                verified=False,
                created_at=utcnow(),
            ),
        )


def published(
    store: Store,
    export_id: int,
    c: Checkpoint,
    *,
    verified: bool,
    reason: str,
    detail: dict[str, Any],
) -> None:
    """The export is in place under its numeric name: ``published`` and an ``exported`` row."""
    with store.session() as s:
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


def failed(store: Store, export_id: int, c: Checkpoint, error: str) -> None:
    with store.session() as s:
        s.execute(update(_x).where(_x.c.id == export_id).values(status=FAILED, error=error))
        audit.record(
            s,
            "export_failed",
            run_id=c.run_id,
            checkpoint_id=c.id,
            subject=c.prefix,
            reason=error,
            detail={"step": c.step},
        )


def removed(store: Store, export: Export, *, reason: str) -> None:
    """A retired export's directory is gone: ``removed`` and an ``export_removed`` row."""
    with store.session() as s:
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
    (``error``), and a published one whose directory is gone was removed."""
    with store.session() as s:
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
                .values(status=FAILED, error=error)
            )
        if removed:
            s.execute(
                update(_x)
                .where(_x.c.id.in_(list(removed)), _x.c.status == PUBLISHED)
                .values(status=REMOVED, removed_at=utcnow())
            )
