"""The audit log (``actions``): the one way any part of ckptd records what it did and why."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Connection

from ckptd.core.model import utcnow
from ckptd.store import tables
from ckptd.store.upsert import insert_many

if TYPE_CHECKING:
    from ckptd.store.handle import Store


class Entry(NamedTuple):
    """One audit row, in the table's column order (:func:`record_many` writes them as they are)."""

    at: datetime
    kind: str
    run_id: int | None = None
    checkpoint_id: int | None = None
    subject: str | None = None
    reason: str | None = None
    detail: Mapping[str, Any] | None = None


COLUMNS = Entry._fields


def record(
    conn: Connection,
    kind: str,
    *,
    run_id: int | None = None,
    checkpoint_id: int | None = None,
    subject: str | None = None,
    reason: str | None = None,
    detail: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """One audit row, in the caller's transaction."""
    record_many(conn, [Entry(at or utcnow(), kind, run_id, checkpoint_id, subject, reason, detail)])


def record_many(conn: Connection, entries: Iterable[Entry]) -> None:
    """Many audit rows in one compiled INSERT (executemany by the driver)."""
    rows = [e if e.detail is not None else e._replace(detail={}) for e in entries]
    if rows:
        insert_many(conn, tables.actions, COLUMNS, rows)


def write(store: Store, entries: Iterable[Entry]) -> None:
    """Audit rows in a transaction of their own (for work that changes no other row)."""
    rows = list(entries)
    if rows:
        with store.session() as conn:
            record_many(conn, rows)
