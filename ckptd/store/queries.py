"""Read-side queries shared by the CLI and the daemon; they return domain records."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from ckptd.errors import NotFound
from ckptd.model import Action, Checkpoint, Run
from ckptd.store.tables import (
    ActionRow,
    CheckpointRow,
    DaemonRow,
    EvaluationRow,
    ExportRow,
    MetricRow,
    PinRow,
    RunRow,
)

# When the same metric comes from several sources, an evaluation beats the run's own summaries,
# which beat a value parsed from a file name (rounded by the template).
SOURCE_RANK = {"evaluator": 0, "tfevents": 1, "filename": 2}


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
    ids: Sequence[int] | None = None,
    states: Sequence[str] | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[Checkpoint]:
    """Checkpoints with their metrics, pin, evaluation and export flags, oldest step first."""
    c = CheckpointRow
    # Columns, not ORM entities: loading 100k entities into an identity map is what made
    # `ls` and planning slow, and these rows are read-only here.
    stmt = select(
        c.id,
        RunRow.name,
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
    ).join(RunRow, RunRow.id == c.run_id)
    if run_id is not None:
        stmt = stmt.where(CheckpointRow.run_id == run_id)
    if ids is not None:
        stmt = stmt.where(CheckpointRow.id.in_(list(ids)))
    if states:
        stmt = stmt.where(CheckpointRow.state.in_(list(states)))
    order = (
        (CheckpointRow.id.desc(),)
        if newest_first
        else (RunRow.name, CheckpointRow.step, CheckpointRow.id)
    )
    stmt = stmt.order_by(*order)
    if limit:
        stmt = stmt.limit(limit)
    rows = session.execute(stmt).all()
    if not rows:
        return []
    wanted = [r.id for r in rows]
    extra = _extras(session, wanted, run_id if ids is None and not limit else None)
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


def _extras(session: Session, ids: list[int], run_id: int | None) -> Any:
    """Metrics, pins, evaluations and exports for many checkpoints in four queries."""

    def where(column: Any) -> Any:
        if run_id is not None:
            return column.in_(select(CheckpointRow.id).where(CheckpointRow.run_id == run_id))
        return column.in_(ids) if len(ids) <= 30000 else True

    metrics: dict[int, dict[str, tuple[int, float]]] = {}
    for cid, name, value, source in session.execute(
        select(MetricRow.checkpoint_id, MetricRow.name, MetricRow.value, MetricRow.source).where(
            where(MetricRow.checkpoint_id)
        )
    ):
        rank = SOURCE_RANK.get(source, 9)
        slot = metrics.setdefault(cid, {})
        if name not in slot or rank < slot[name][0]:
            slot[name] = (rank, float("nan") if value is None else value)
    pinned = set(session.scalars(select(PinRow.checkpoint_id).where(where(PinRow.checkpoint_id))))
    evaluations = dict(
        session.execute(
            select(EvaluationRow.checkpoint_id, EvaluationRow.status).where(
                where(EvaluationRow.checkpoint_id)
            )
        ).all()
    )
    exports = session.execute(
        select(ExportRow.checkpoint_id, ExportRow.status).where(
            and_(where(ExportRow.checkpoint_id), ExportRow.status.in_(["published", "exporting"]))
        )
    ).all()
    exported = {cid for cid, st in exports if st == "published"}
    exporting = {cid for cid, st in exports if st == "exporting"}

    def get(cid: int) -> tuple[dict[str, float], bool, str | None, bool, bool]:
        m = {k: v for k, (_r, v) in sorted(metrics.get(cid, {}).items())}
        return m, cid in pinned, evaluations.get(cid), cid in exported, cid in exporting

    return get


def state_counts(session: Session, run_id: int | None = None) -> dict[str, int]:
    stmt = select(CheckpointRow.state, func.count()).group_by(CheckpointRow.state)
    if run_id is not None:
        stmt = stmt.where(CheckpointRow.run_id == run_id)
    return {s: n for s, n in session.execute(stmt)}


def run_summaries(session: Session) -> list[dict[str, Any]]:
    """Per run: checkpoint counts by state and the newest step."""
    stmt = (
        select(
            RunRow.name,
            RunRow.path,
            RunRow.present,
            CheckpointRow.state,
            func.count(),
            func.max(CheckpointRow.step),
        )
        .join(CheckpointRow, CheckpointRow.run_id == RunRow.id, isouter=True)
        .group_by(RunRow.id, CheckpointRow.state)
        .order_by(RunRow.name)
    )
    out: dict[str, dict[str, Any]] = {}
    for name, path, present, state, n, newest in session.execute(stmt):
        entry = out.setdefault(
            path, {"run": name, "path": path, "present": present, "counts": {}, "newest_step": None}
        )
        if state:
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
    stmt = (
        select(ActionRow, RunRow.name)
        .join(RunRow, RunRow.id == ActionRow.run_id, isouter=True)
        .order_by(ActionRow.id.desc())
    )
    if run_id is not None:
        stmt = stmt.where(ActionRow.run_id == run_id)
    if kinds:
        stmt = stmt.where(ActionRow.kind.in_(list(kinds)))
    rows = session.execute(stmt.limit(limit)).all()
    return [
        Action(r.id, r.at, r.kind, name, r.subject, r.reason, dict(r.detail or {}))
        for r, name in reversed(rows)
    ]


def latest_daemon(session: Session) -> DaemonRow | None:
    return session.scalars(select(DaemonRow).order_by(DaemonRow.id.desc()).limit(1)).first()


def work_counts(session: Session) -> dict[str, dict[str, int]]:
    """Evaluations and exports by status, for `ckptd status`."""
    evaluations = session.execute(
        select(EvaluationRow.status, func.count()).group_by(EvaluationRow.status)
    )
    exports = session.execute(select(ExportRow.status, func.count()).group_by(ExportRow.status))
    return {"evaluations": dict(evaluations.all()), "exports": dict(exports.all())}
