"""Audit log reads: the events `ckptd events` and `ckptd status` show."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, select

from ckptd.core.model import Action
from ckptd.store import tables
from ckptd.store.handle import Store
from ckptd.store.runs import resolve_run

_actions_table = tables.actions
_a = _actions_table.c


def actions(
    conn: Connection,
    *,
    limit: int = 50,
    run_id: int | None = None,
    kinds: Sequence[str] | None = None,
) -> list[Action]:
    """The newest ``limit`` events, oldest first (inside the caller's transaction).

    The pruner writes one ``pruned`` audit row per run and prune, whose ``detail`` lists every
    checkpoint it deleted (``{"checkpoints": [...]}``); here such a row becomes one event per
    checkpoint, as each deletion was recorded before (subject: the checkpoint's prefix; detail:
    its step, files, files already missing, bytes and id). The events of one row share its
    ``id``. ``limit`` counts events, not rows.
    """
    stmt = (
        select(_a.id, _a.at, _a.kind, tables.runs.c.name, _a.subject, _a.reason, _a.detail)
        .select_from(_actions_table)
        .join(tables.runs, tables.runs.c.id == _a.run_id, isouter=True)
        .order_by(_a.id.desc())
    )
    if run_id is not None:
        stmt = stmt.where(_a.run_id == run_id)
    if kinds:
        stmt = stmt.where(_a.kind.in_(list(kinds)))
    # Every row is at least one event: `limit` rows always hold the newest `limit` events.
    newest_first: list[Action] = []
    for r in conn.execute(stmt.limit(limit)):
        newest_first += reversed(_events_of(r))
        if len(newest_first) >= limit:
            break
    return newest_first[:limit][::-1]


def _events_of(r: Any) -> list[Action]:
    """The events of one audit row, oldest first (a batched ``pruned`` row holds many)."""
    detail = dict(r.detail or {})
    batch = detail.get("checkpoints") if r.kind == "pruned" else None
    if not isinstance(batch, list) or not batch:
        return [Action(r.id, r.at, r.kind, r.name, r.subject, r.reason, detail)]
    return [
        Action(
            r.id,
            r.at,
            r.kind,
            r.name,
            e.get("prefix"),
            e.get("reason", r.reason),
            {
                "step": e.get("step"),
                "files": e.get("files", []),
                "already_missing": e.get("already_missing", []),
                "bytes": e.get("bytes", 0),
                "checkpoint_id": e.get("checkpoint_id"),
            },
        )
        for e in batch
    ]


def load_events(
    store: Store, *, run: str | None = None, kinds: Sequence[str] | None = None, limit: int = 50
) -> list[Action]:
    """:func:`actions` of the run named ``run`` (a name or an absolute path; :class:`NotFound`
    when there is none), or of every run."""
    with store.session() as conn:
        run_id = resolve_run(conn, run).id if run else None
        return actions(conn, limit=limit, run_id=run_id, kinds=kinds)
