"""The audit log (``actions``): what ckptd did, to what, why, when. Every writer uses this."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.orm import Session

from ckptd.core.model import utcnow
from ckptd.store.tables import ActionRow, table_of
from ckptd.store.upsert import insert_many

_COLUMNS = ("at", "kind", "run_id", "checkpoint_id", "subject", "reason", "detail")


class Entry(NamedTuple):
    kind: str
    run_id: int | None = None
    checkpoint_id: int | None = None
    subject: str | None = None
    reason: str | None = None
    detail: Mapping[str, Any] | None = None


def record(
    session: Session,
    kind: str,
    *,
    run_id: int | None = None,
    checkpoint_id: int | None = None,
    subject: str | None = None,
    reason: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """One audit entry, in the caller's transaction."""
    record_many(session, [Entry(kind, run_id, checkpoint_id, subject, reason, detail)])


def record_many(session: Session, entries: Iterable[Entry], at: datetime | None = None) -> int:
    """Many audit entries in one executemany (a backfill writes one per run); returns how many."""
    when = at or utcnow()
    return insert_many(
        session.connection(),
        table_of(ActionRow),
        _COLUMNS,
        [(when, *e[:5], dict(e.detail or {})) for e in entries],
    )
