"""Pins: a checkpoint kept whatever the retention policy says, each change in the audit log."""

from __future__ import annotations

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from ckptd.core.model import Checkpoint, utcnow
from ckptd.store.handle import Store
from ckptd.store.reads import resolve_checkpoint
from ckptd.store.tables import ActionRow, PinRow, table_of

_pins = table_of(PinRow)
_actions = table_of(ActionRow)


def set_pinned(
    store: Store, checkpoint: str, pinned: bool, reason: str | None = None
) -> tuple[Checkpoint, bool]:
    """Pin or unpin the checkpoint named ``checkpoint`` (prefix path or ``RUN@STEP``) and record
    it in the audit log, in one transaction. Returns the checkpoint (as it was) and whether
    anything changed (False: it already was so)."""
    with store.session() as session:
        c = resolve_checkpoint(session, checkpoint)
        if c.pinned == pinned:
            return c, False
        now = utcnow()
        if pinned:
            session.execute(insert(_pins).values(checkpoint_id=c.id, reason=reason, created_at=now))
        else:
            session.execute(delete(_pins).where(_pins.c.checkpoint_id == c.id))
        _audit(session, c, "pinned" if pinned else "unpinned", reason)
    return c, True


def _audit(session: Session, c: Checkpoint, kind: str, reason: str | None) -> None:
    session.execute(
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
