"""Pins: a checkpoint kept whatever the retention policy says, each change in the audit log."""

from __future__ import annotations

from sqlalchemy import Connection, delete, insert

from ckptd.core.model import Checkpoint, utcnow
from ckptd.store import tables
from ckptd.store.handle import Store
from ckptd.store.reads import resolve_checkpoint

_pins = tables.pins
_actions = tables.actions


def set_pinned(
    store: Store, checkpoint: str, pinned: bool, reason: str | None = None
) -> tuple[Checkpoint, bool]:
    """Pin or unpin the checkpoint named ``checkpoint`` (prefix path or ``RUN@STEP``) and record
    it in the audit log, in one transaction. Returns the checkpoint (as it was) and whether
    anything changed (False: it already was so)."""
    with store.session() as conn:
        c = resolve_checkpoint(conn, checkpoint)
        if c.pinned == pinned:
            return c, False
        now = utcnow()
        if pinned:
            conn.execute(insert(_pins).values(checkpoint_id=c.id, reason=reason, created_at=now))
        else:
            conn.execute(delete(_pins).where(_pins.c.checkpoint_id == c.id))
        _audit(conn, c, "pinned" if pinned else "unpinned", reason)
    return c, True


def _audit(conn: Connection, c: Checkpoint, kind: str, reason: str | None) -> None:
    conn.execute(
        insert(_actions).values(
            at=utcnow(),
            kind=kind,
            run_id=c.run_id,
            checkpoint_id=c.id,
            subject=c.prefix,
            reason=reason,
            detail={"step": c.step},
        )
    )
