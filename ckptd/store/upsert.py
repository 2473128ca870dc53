"""Insert-or-update in one statement, for the dialects ckptd supports (SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def upsert(
    session: Any,
    table: Any,
    rows: list[dict[str, Any]],
    *,
    keys: Sequence[str],
    update: Sequence[str],
) -> None:
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:  # pragma: no cover
        raise NotImplementedError(f"upsert is not implemented for {dialect}")
    stmt = insert(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys), set_={c: stmt.excluded[c] for c in update}
    )
    session.execute(stmt, rows)
