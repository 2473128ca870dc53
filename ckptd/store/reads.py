"""Checkpoint reads: the one row → :class:`Checkpoint` mapper and the queries built on it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, select

from ckptd.core.errors import NotFound
from ckptd.core.model import Action, Checkpoint
from ckptd.store import daemons, leases, tables
from ckptd.store.audit_reads import actions
from ckptd.store.handle import Store
from ckptd.store.runs import RunSummary, resolve_run, run_summaries, state_counts
from ckptd.store.tables import LIVE, json_text

# When the same metric comes from several sources, an evaluation beats the run's own summaries,
# which beat a value parsed from a file name (rounded by the template).
SOURCE_RANK = {"evaluator": 0, "tfevents": 1, "filename": 2}

_c = tables.checkpoints.c
_metrics = tables.metrics.c
_pins = tables.pins.c
_evaluations = tables.evaluations.c
_exports = tables.exports.c

# What every Checkpoint is built from, in :func:`to_checkpoints`' order; ``files`` as its JSON
# text, so that all rows' lists decode in one ``json.loads``.
CHECKPOINT_COLUMNS = (
    _c.id,
    _c.run_id,
    _c.prefix,
    _c.step,
    _c.format,
    _c.state,
    _c.reason,
    _c.size_bytes,
    json_text(_c.files),
    _c.has_meta,
    _c.created_at,
    _c.completed_at,
    _c.recorded_at,
    _c.incarnation,
)


@dataclass(frozen=True)
class Extras:
    """What the other tables say about checkpoints, by checkpoint id."""

    metrics: Mapping[int, dict[str, float]]
    pinned: set[int]
    evaluations: Mapping[int, str]
    exported: set[int]  # behind a published export
    exporting: set[int]  # an export of it is being written
    export_versions: Mapping[int, int] = field(default_factory=dict)  # highest published
    serving: set[int] = field(default_factory=set)  # its run's highest version is of it

    @classmethod
    def of(
        cls,
        metric_rows: Iterable[Any],
        pinned: Iterable[int],
        evaluation_rows: Iterable[tuple[int, str]],
        export_rows: Iterable[Any],
        serving_versions: Mapping[int, int] | None = None,
    ) -> Extras:
        """From rows of (checkpoint id, name, value, source), pinned ids, (checkpoint id,
        evaluation status), (checkpoint id, export status, version, run id) and each run's
        highest published version (by run id)."""
        exports = list(export_rows)
        published = sorted(
            (v, cid, run) for cid, status, v, run in exports if status == "published"
        )
        serving_versions = serving_versions or {}
        return cls(
            best_sources(metric_rows),
            set(pinned),
            {cid: status for cid, status in evaluation_rows},
            {cid for _v, cid, _r in published},
            {cid for cid, status, *_ in exports if status == "exporting"},
            {cid: v for v, cid, _r in published},  # ascending: the highest wins
            {cid for v, cid, run in published if serving_versions.get(run) == v},
        )


def to_checkpoints(
    rows: Sequence[Any], run_names: Mapping[int, str], extras: Extras
) -> list[Checkpoint]:
    """Rows of :data:`CHECKPOINT_COLUMNS` as domain records: the one mapper."""
    files = json.loads("[" + ",".join(row[8] or "null" for row in rows) + "]")
    return [
        Checkpoint(
            id=row[0],
            run=run_names[row[1]],
            run_id=row[1],
            prefix=row[2],
            step=row[3],
            format=row[4],
            state=row[5],
            reason=row[6],
            size=row[7],
            files=tuple(names or ()),
            has_meta=row[9],
            created_at=row[10],
            recorded_at=row[11] or row[12],
            metrics=extras.metrics.get(row[0], {}),
            pinned=row[0] in extras.pinned,
            evaluation=extras.evaluations.get(row[0]),
            exported=row[0] in extras.exported,
            exporting=row[0] in extras.exporting,
            export_version=extras.export_versions.get(row[0]),
            serving=row[0] in extras.serving,
            incarnation=row[13],
        )
        for row, names in zip(rows, files, strict=True)
    ]


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


def checkpoints(
    conn: Connection,
    *,
    run_id: int | None = None,
    run_ids: Sequence[int] | None = None,
    ids: Sequence[int] | None = None,
    states: Sequence[str] | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[Checkpoint]:
    """Checkpoints with their metrics, pin, evaluation and export flags, by run name and step
    (``newest_first``: newest recorded first). Inside the caller's transaction.

    ``run_ids``: the histories of many runs in one go.
    """
    r = tables.runs.c
    stmt = select(*CHECKPOINT_COLUMNS, r.name).join(tables.runs, r.id == _c.run_id)
    if run_id is not None:
        stmt = stmt.where(_c.run_id == run_id)
    if run_ids is not None:
        stmt = stmt.where(_c.run_id.in_(list(run_ids)))
    if ids is not None:
        stmt = stmt.where(_c.id.in_(list(ids)))
    if states:
        stmt = stmt.where(_c.state.in_(list(states)))
    stmt = stmt.order_by(*((_c.id.desc(),) if newest_first else (r.name, _c.step, _c.id)))
    if limit:
        stmt = stmt.limit(limit)
    rows = conn.execute(stmt).all()
    if not rows:
        return []
    whole_runs = ids is None and not limit
    # The other tables are read for whole runs by a subquery when the rows are whole runs, by
    # the ids otherwise (or unfiltered past the size of an IN list worth sending).
    of: Any
    if whole_runs and run_id is not None:
        of = select(_c.id).where(_c.run_id == run_id)
    elif whole_runs and run_ids is not None:
        of = select(_c.id).where(_c.run_id.in_(list(run_ids)))
    else:
        of = [row[0] for row in rows] if len(rows) <= 30000 else None
    extras = _extras(conn, of)
    return to_checkpoints(rows, {row[1]: row[-1] for row in rows}, extras)


def _extras(conn: Connection, of: Any) -> Extras:
    """Metrics, pins, evaluations and exports of the checkpoints ``of`` (ids, a subquery of
    ids, or None for all) in four queries."""

    def where(column: Any) -> Any:
        return True if of is None else column.in_(of)

    m = _metrics
    exports = conn.execute(
        select(_exports.checkpoint_id, _exports.status, _exports.version, _c.run_id)
        .join_from(tables.exports, tables.checkpoints, _c.id == _exports.checkpoint_id)
        .where(and_(where(_exports.checkpoint_id), _exports.status.in_(["published", "exporting"])))
    ).all()
    return Extras.of(
        conn.execute(
            select(m.checkpoint_id, m.name, m.value, m.source).where(where(m.checkpoint_id))
        ),
        conn.scalars(select(_pins.checkpoint_id).where(where(_pins.checkpoint_id))),
        conn.execute(
            select(_evaluations.checkpoint_id, _evaluations.status).where(
                where(_evaluations.checkpoint_id)
            )
        ).all(),
        exports,
        _serving_versions(conn, {row[3] for row in exports if row[1] == "published"}),
    )


def _serving_versions(conn: Connection, run_ids: set[int]) -> dict[int, int]:
    """Each run's highest published export version (what TF Serving serves), by run id."""
    if not run_ids:
        return {}
    stmt = (
        select(_c.run_id, func.max(_exports.version))
        .join_from(tables.exports, tables.checkpoints, _c.id == _exports.checkpoint_id)
        .where(_exports.status == "published", _c.run_id.in_(sorted(run_ids)))
        .group_by(_c.run_id)
    )
    return {run_id: version for run_id, version in conn.execute(stmt)}


def resolve_checkpoint(conn: Connection, text: str) -> Checkpoint:
    """A checkpoint by prefix path or ``RUN@STEP``."""
    run_text, sep, step_text = text.rpartition("@")
    if sep and step_text.isdigit():
        run = resolve_run(conn, run_text)
        where = and_(_c.run_id == run.id, _c.step == int(step_text))
    else:
        path = os.path.abspath(text)
        where = and_(_c.prefix.in_([path, path.removesuffix(".index")]), LIVE)
    found = conn.scalar(select(_c.id).where(where).order_by(_c.id.desc()).limit(1))
    if found is None:
        raise NotFound(f"no checkpoint {text!r}; list them with `ckptd ls`")
    return checkpoints(conn, ids=[found])[0]


def work_counts(conn: Connection) -> dict[str, dict[str, int]]:
    """Evaluations and exports by status."""
    from ckptd.store import evaluation_reads  # (its evaluations module imports this one)

    return {
        "evaluations": evaluation_reads.status_counts(conn),
        "exports": _by_status(conn, _exports.status),
    }


def _by_status(conn: Connection, column: Any) -> dict[str, int]:
    return {s: n for s, n in conn.execute(select(column, func.count()).group_by(column))}


# ---------------------------------------------------------------- for the layers above


def load_checkpoints(
    store: Store,
    *,
    run_id: int | None = None,
    run_ids: Sequence[int] | None = None,
    states: Sequence[str] | None = None,
) -> list[Checkpoint]:
    """:func:`checkpoints` in a transaction of its own."""
    with store.session() as conn:
        return checkpoints(conn, run_id=run_id, run_ids=run_ids, states=states)


def count_states(store: Store) -> dict[str, int]:
    """How many checkpoints are in each state (the daemon's heartbeat and metrics)."""
    with store.session() as conn:
        return state_counts(conn)


def locate_checkpoint(store: Store, text: str) -> tuple[Checkpoint, str | None]:
    """A checkpoint by prefix path or ``RUN@STEP``, and its watch root (where its files are
    reached from)."""
    with store.session() as conn:
        checkpoint = resolve_checkpoint(conn, text)
        root = conn.scalar(
            select(tables.runs.c.watch_path).where(tables.runs.c.id == checkpoint.run_id)
        )
    return checkpoint, root


@dataclass(frozen=True)
class StatusRows:
    """What `ckptd status` reads, from one transaction (one consistent snapshot)."""

    daemon: daemons.DaemonRecord | None
    others: list[daemons.DaemonRecord]  # the other daemons and the workers sharing the database
    held: dict[str, list[tuple[str, datetime]]]  # daemon name -> (run, lease expiry), by run
    runs: list[RunSummary]
    newest: list[Checkpoint]
    work: dict[str, dict[str, int]]
    problems: list[Action]


def status_rows(
    store: Store,
    *,
    newest: int,
    problems: int,
    kinds: Sequence[str],
    seen_since: datetime | None = None,
) -> StatusRows:
    """The newest daemon, the other daemons and workers seen since ``seen_since``, every live
    lease, every run's summary, the ``newest`` complete checkpoints, work counts and the
    ``problems`` newest events of ``kinds``. Set-based: a handful of statements however many
    checkpoints there are."""
    with store.session() as conn:
        newest_daemon = daemons.latest(conn)
        return StatusRows(
            newest_daemon,
            [
                m
                for m in daemons.members(conn, seen_since=seen_since)
                if newest_daemon is None or m.id != newest_daemon.id
            ],
            held_runs(conn),
            run_summaries(conn),
            checkpoints(conn, states=["complete"], limit=newest, newest_first=True),
            work_counts(conn),
            actions(conn, limit=problems, kinds=kinds),
        )


def cluster_rows(
    store: Store, *, seen_since: datetime | None = None
) -> tuple[list[daemons.DaemonRecord], dict[str, list[tuple[str, datetime]]]]:
    """Every daemon and worker seen since ``seen_since`` and every live lease (two SELECTs)."""
    with store.session() as conn:
        return daemons.members(conn, seen_since=seen_since), held_runs(conn)


def held_runs(conn: Connection) -> dict[str, list[tuple[str, datetime]]]:
    """Each daemon's live leases as (run name, expiry), by daemon name then run name: one
    SELECT joining the leases to their runs."""
    r, lease = tables.runs.c, tables.run_leases.c
    rows = conn.execute(
        select(lease.owner, r.name, lease.expires_at)
        .join(tables.runs, r.id == lease.run_id)
        .where(lease.expires_at > leases.db_now())
        .order_by(lease.owner, r.name)
    )
    held: dict[str, list[tuple[str, datetime]]] = {}
    for owner, run, expires_at in rows:
        held.setdefault(owner, []).append((run, expires_at))
    return held
