"""The audit log (``actions``): what ckptd did, to what, why, when — one way to write a row."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from ckptd.core.model import utcnow
from ckptd.store.tables import ActionRow, table_of

_actions = table_of(ActionRow)


def record(
    session: Session,
    kind: str,
    *,
    run_id: int | None = None,
    checkpoint_id: int | None = None,
    subject: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """Add one audit row inside the caller's transaction (so it commits with the change)."""
    session.execute(
        insert(_actions).values(
            at=at or utcnow(),
            kind=kind,
            run_id=run_id,
            checkpoint_id=checkpoint_id,
            subject=subject,
            reason=reason,
            detail=detail or {},
        )
    )
