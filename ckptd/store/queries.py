"""Read-side queries shared by the CLI and the daemon; they return domain records."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Row, and_, func, select
from sqlalchemy.orm import Session

from ckptd.core.errors import NotFound
from ckptd.core.model import Action, Checkpoint, Run
from ckptd.store.tables import (
    ActionRow,
    CheckpointRow,
    DaemonRow,
    EvaluationRow,
    ExportRow,
    MetricRow,
    PinRow,
    RunRow,
    table_of,
)

# When the same metric comes from several sources, an evaluation beats the run's own summaries,
# which beat a value parsed from a file name (rounded by the template).
SOURCE_RANK = {"evaluator": 0, "tfevents": 1, "filename": 2}

# The queries below that only read columns use the Core tables: a Core SELECT skips the ORM's
# per-statement compile state and mapper configuration (a large part of `ckptd status`).
_runs = table_of(RunRow).c
_checkpoints = table_of(CheckpointRow).c
_metrics = table_of(MetricRow).c
_pins = table_of(PinRow).c
_evaluations = table_of(EvaluationRow).c
_exports = table_of(ExportRow).c
_actions = table_of(ActionRow).c
_daemons = table_of(DaemonRow)


def to_run(row: RunRow) -> Run:
    return Run(row.id, row.name, row.path, row.watch_path, row.present)


def runs(session: Session) -> list[Run]:
    return [to_run(r) for r in session.scalars(select(RunRow).order_by(RunRow.name))]


def resolve_run(session: Session, text: str) -> Run:
    """A run by name (``mnist``, ``team-a/exp3``) or by absolute path."""
    stmt = select(RunRow)
    if os.path.isabs(text):
        stmt = stmt.where(RunRow.path == os.path.normpath(text))
    else:
        stmt = stmt.where(RunRow.name == text.strip("/"))
    found = list(session.scalars(stmt))
    if len(found) == 1:
        return to_run(found[0])
    if len(found) > 1:
        paths = ", ".join(r.path for r in found)
        raise NotFound(f"run name {text!r} is ambiguous ({paths}); name it by its absolute path")
    names = [r.name for r in session.scalars(select(RunRow).order_by(RunRow.name).limit(20))]
    raise NotFound(
        f"no run {text!r}; known runs: {', '.join(names) or 'none yet'} (see `ckptd status`)"
    )


def resolve_checkpoint(session: Session, text: str) -> Checkpoint:
    """A checkpoint by prefix path or ``RUN@STEP``."""
    run_text, sep, step_text = text.rpartition("@")
    if sep and step_text.isdigit():
        run = resolve_run(session, run_text)
        stmt = select(CheckpointRow).where(
            CheckpointRow.run_id == run.id, CheckpointRow.step == int(step_text)
        )
    else:
        path = os.path.abspath(text)
        stmt = select(CheckpointRow).where(
            CheckpointRow.prefix.in_([path, path.removesuffix(".index")])
        )
    row = session.scalars(stmt.order_by(CheckpointRow.id.desc()).limit(1)).first()
    if row is None:
        raise NotFound(f"no checkpoint {text!r}; list them with `ckptd ls`")
    return checkpoints(session, ids=[row.id])[0]


def checkpoints(
    session: Session,
    *,
    run_id: int | None = None,
    run_ids: Sequence[int] | None = None,
    ids: Sequence[int] | None = None,
    states: Sequence[str] | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[Checkpoint]:
    """Checkpoints with their metrics, pin, evaluation and export flags, oldest step first.

    ``run_ids``: the histories of many runs in one go (the pruner plans many runs at once).
    """
    c, r = _checkpoints, _runs
    # Columns, not ORM entities: loading 100k entities into an identity map is what made
    # `ls` and planning slow, and these rows are read-only here.
    stmt = select(
        c.id,
        r.name,
        c.run_id,
        c.prefix,
        c.step,
        c.format,
        c.state,
        c.reason,
        c.size_bytes,
        c.files,
        c.has_meta,
        c.created_at,
        c.completed_at,
        c.recorded_at,
    ).join(table_of(RunRow), r.id == c.run_id)
    if run_id is not None:
        stmt = stmt.where(c.run_id == run_id)
    if run_ids is not None:
        stmt = stmt.where(c.run_id.in_(list(run_ids)))
    if ids is not None:
        stmt = stmt.where(c.id.in_(list(ids)))
    if states:
        stmt = stmt.where(c.state.in_(list(states)))
    order = (c.id.desc(),) if newest_first else (r.name, c.step, c.id)
    stmt = stmt.order_by(*order)
    if limit:
        stmt = stmt.limit(limit)
    rows = session.execute(stmt).all()
    if not rows:
        return []
    wanted = [r.id for r in rows]
    whole_runs = ids is None and not limit
    extra = _extras(
        session,
        wanted,
        run_id if whole_runs else None,
        run_ids if whole_runs and run_id is None else None,
    )
    out = []
    for row in rows:
        metrics, pinned, evaluation, exported, exporting = extra(row.id)
        out.append(
            Checkpoint(
                id=row.id,
                run=row.name,
                run_id=row.run_id,
                prefix=row.prefix,
                step=row.step,
                format=row.format,
                state=row.state,
                reason=row.reason,
                size=row.size_bytes,
                files=tuple(row.files or ()),
                has_meta=row.has_meta,
                created_at=row.created_at,
                recorded_at=row.completed_at or row.recorded_at,
                metrics=metrics,
                pinned=pinned,
                evaluation=evaluation,
                exported=exported,
                exporting=exporting,
            )
        )
    return out


def best_sources(rows: Iterable[Any]) -> dict[int, dict[str, float]]:
    """Per checkpoint, each metric's value from its best source (SOURCE_RANK), names sorted;
    rows are (checkpoint id, name, value, source). NULL (stored NaN) becomes NaN."""
    slots: dict[int, dict[str, tuple[int, float]]] = {}
    for cid, name, value, source in rows:
        rank = SOURCE_RANK.get(source, 9)
        slot = slots.setdefault(cid, {})
        if name not in slot or rank < slot[name][0]:
            slot[name] = (rank, float("nan") if value is None else value)
    return {cid: {k: v for k, (_r, v) in sorted(slot.items())} for cid, slot in slots.items()}


def _extras(
    session: Session, ids: list[int], run_id: int | None, run_ids: Sequence[int] | None = None
) -> Any:
    """Metrics, pins, evaluations and exports for many checkpoints in four queries."""

    def where(column: Any) -> Any:
        if run_id is not None:
            return column.in_(select(_checkpoints.id).where(_checkpoints.run_id == run_id))
        if run_ids is not None:
            return column.in_(select(_checkpoints.id).where(_checkpoints.run_id.in_(list(run_ids))))
        return column.in_(ids) if len(ids) <= 30000 else True

    metrics = best_sources(
        session.execute(
            select(_metrics.checkpoint_id, _metrics.name, _metrics.value, _metrics.source).where(
                where(_metrics.checkpoint_id)
            )
        )
    )
    pinned = set(session.scalars(select(_pins.checkpoint_id).where(where(_pins.checkpoint_id))))
    evaluations = dict(
        session.execute(
            select(_evaluations.checkpoint_id, _evaluations.status).where(
                where(_evaluations.checkpoint_id)
            )
        ).all()
    )
    exports = session.execute(
        select(_exports.checkpoint_id, _exports.status).where(
            and_(where(_exports.checkpoint_id), _exports.status.in_(["published", "exporting"]))
        )
    ).all()
    exported = {cid for cid, st in exports if st == "published"}
    exporting = {cid for cid, st in exports if st == "exporting"}

    def get(cid: int) -> tuple[dict[str, float], bool, str | None, bool, bool]:
        m = metrics.get(cid, {})
        return m, cid in pinned, evaluations.get(cid), cid in exported, cid in exporting

    return get


def state_counts(session: Session, run_id: int | None = None) -> dict[str, int]:
    stmt = select(_checkpoints.state, func.count()).group_by(_checkpoints.state)
    if run_id is not None:
        stmt = stmt.where(_checkpoints.run_id == run_id)
    return {s: n for s, n in session.execute(stmt)}


def run_summaries(session: Session) -> list[dict[str, Any]]:
    """Per run (by name): checkpoint counts by state and the newest complete step.

    The counts are one pass over the covering index ix_checkpoints_run_state_step (migration
    0002) without a join, cheaper than joining runs in SQL; the few runs are joined here.
    """
    r, c = _runs, _checkpoints
    out: dict[int, dict[str, Any]] = {
        run_id: {"run": name, "path": path, "present": present, "counts": {}, "newest_step": None}
        for run_id, name, path, present in session.execute(
            select(r.id, r.name, r.path, r.present).order_by(r.name)
        )
    }
    for run_id, state, n, newest in session.execute(
        select(c.run_id, c.state, func.count(), func.max(c.step)).group_by(c.run_id, c.state)
    ):
        entry = out.get(run_id)
        if entry is None:
            continue
        entry["counts"][state] = n
        if newest is not None and state == "complete":
            entry["newest_step"] = newest
    return list(out.values())


def actions(
    session: Session,
    *,
    limit: int = 50,
    run_id: int | None = None,
    kinds: Sequence[str] | None = None,
) -> list[Action]:
    """The newest ``limit`` events, oldest first.

    The pruner writes one ``pruned`` audit row per run and prune, whose ``detail`` lists every
    checkpoint it deleted (``{"checkpoints": [...]}``); here such a row becomes one event per
    checkpoint, as each deletion was recorded before (subject: the checkpoint's prefix; detail:
    its step, files, files already missing, bytes and id). The events of one row share its
    ``id``. ``limit`` counts events, not rows.
    """
    a = _actions
    stmt = (
        select(a.id, a.at, a.kind, _runs.name, a.subject, a.reason, a.detail)
        .select_from(table_of(ActionRow))
        .join(table_of(RunRow), _runs.id == a.run_id, isouter=True)
        .order_by(a.id.desc())
    )
    if run_id is not None:
        stmt = stmt.where(a.run_id == run_id)
    if kinds:
        stmt = stmt.where(a.kind.in_(list(kinds)))
    # Every row is at least one event: `limit` rows always hold the newest `limit` events.
    newest_first: list[Action] = []
    for r in session.execute(stmt.limit(limit)):
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


def latest_daemon(session: Session) -> Row[Any] | None:
    """The newest ``daemons`` row (its columns as attributes: ``host``, ``heartbeat_at`` …)."""
    return session.execute(select(_daemons).order_by(_daemons.c.id.desc()).limit(1)).first()


def work_counts(session: Session) -> dict[str, dict[str, int]]:
    """Evaluations and exports by status, for `ckptd status`."""
    evaluations = session.execute(
        select(_evaluations.status, func.count()).group_by(_evaluations.status)
    )
    exports = session.execute(select(_exports.status, func.count()).group_by(_exports.status))
    return {"evaluations": dict(evaluations.all()), "exports": dict(exports.all())}
