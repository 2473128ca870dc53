"""Recording's SQL: apply a diff conditional on the run's version (loading: ``runstate.py``).

:func:`apply` is one transaction that first bumps the run's version from the one its state was
loaded at; if another writer (a prune, a second daemon, ``ckptd`` from the CLI) bumped it
meanwhile, nothing is written and the caller loads the state again. Bulk paths stay bulk: one
executemany per table, new ids read back by prefix, a new checkpoint's event-file values copied by
one INSERT … SELECT inside the database (``metric_attach.py``).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)

from ckptd.core.model import COMPLETE, CORRUPT, GONE, PRUNED, REPLACED, utcnow
from ckptd.core.recording import Changes, Found, RunState
from ckptd.store import audit, leases, tables
from ckptd.store.db import insert_id
from ckptd.store.handle import Store
from ckptd.store.leases import Hold
from ckptd.store.metric_attach import METRIC_COLUMNS, attach_event_values
from ckptd.store.runstate import load_state as load_state
from ckptd.store.runstate import load_states as load_states
from ckptd.store.runstate import run_versions as run_versions
from ckptd.store.tables import LIVE
from ckptd.store.upsert import insert_many, insert_returning

_CHUNK = 500  # ids or paths per IN (...): SQLite is slow with long lists
# mtimes a datetime can hold: a file may claim any (year 10000 is legal on tmpfs and btrfs)
_MIN_TS = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_MAX_TS = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


class _Stale(Exception):
    """The run changed since its state was loaded (raised to roll the transaction back)."""


def apply(
    store: Store, state: RunState, changes: Changes, hold: Hold | None = None
) -> dict[str, int] | None:
    """Write ``changes`` in one transaction if the run is still at ``state.version`` (and, with
    ``hold``, its lease still this daemon's at that epoch: else :class:`Fenced` is raised and
    nothing is written). Returns the ids of the new checkpoints by prefix, or None (nothing
    written) if the run changed."""
    try:
        with store.session() as conn:
            if hold is not None:
                leases.fence(conn, hold)
            return _apply(conn, state, changes)
    except _Stale:
        return None


# ----------------------------------------------------------------------------- applying


def _apply(conn: Connection, state: RunState, changes: Changes) -> dict[str, int]:
    now = utcnow()
    run = state.run_id
    bumped = conn.execute(
        _BUMP, {"run": run, "expected": state.version, "at": now, "is_present": changes.present}
    )
    if not bumped.rowcount:
        raise _Stale
    starts = state.incarnation_starts
    if changes.incarnation_starts is not None:
        starts = changes.incarnation_starts
        conn.execute(_STARTS, {"run": run, "starts": list(starts)})

    # Event files and scalars first: new checkpoints then take every value logged at their step.
    new_files = [w for w in changes.event_files if w.new]
    insert_many(
        conn,
        _files,
        ("run_id", "path", "offset", "error", "updated_at"),
        [(run, w.path, w.offset, w.error, now) for w in new_files],
    )
    old_files = [
        {"p": w.path, "o": w.offset, "e": w.error, "at": now}
        for w in changes.event_files
        if not w.new
    ]
    if old_files:
        conn.execute(_UPDATE_FILE, old_files)
    insert_many(
        conn,
        _scalars,
        ("run_id", "name", "step", "value", "wall_time", "born"),
        [(run, n, step, _num(v), w, b) for n, step, v, w, b in changes.scalars],
        conflict_keys=("run_id", "name", "step", "born"),
        update=("value", "wall_time"),
    )

    for u in changes.updated:
        # Guarded by state as well: a writer that changed the row without bumping the version.
        if not conn.execute(_update_checkpoint(u.id, u.found, now, u.completed)).rowcount:
            raise _Stale
    gone = [g.id for g in changes.gone]
    for i in range(0, len(gone), _CHUNK):
        chunk = gone[i : i + _CHUNK]
        values = {"ids": chunk, "at": now, "why": changes.gone_reason}
        if conn.execute(_GONE, values).rowcount != len(chunk):
            raise _Stale

    replaced = [r.id for r in changes.replaced]
    for i in range(0, len(replaced), _CHUNK):
        chunk = replaced[i : i + _CHUNK]
        if conn.execute(_REPLACED, {"ids": chunk, "at": now}).rowcount != len(chunk):
            raise _Stale
        conn.execute(_UNQUEUE, {"ids": chunk})  # its files are gone: nothing to evaluate

    new_ids = _insert_checkpoints(conn, run, changes, now)

    def id_of(prefix: str) -> int:
        return new_ids[prefix] if prefix in new_ids else state.checkpoints[prefix].id

    for new in (False, True):
        insert_many(
            conn,
            _metrics,
            METRIC_COLUMNS,
            [
                (id_of(m.prefix), m.name, _num(m.value), m.step, m.source, now)
                for m in changes.metrics
                if (m.prefix in new_ids) == new
            ],
            conflict_keys=() if new else ("checkpoint_id", "name", "source"),
            update=() if new else ("value", "step", "recorded_at"),
        )
    attach_event_values(conn, run, changes, new_ids, starts, now)
    audit.record_many(
        conn,
        [
            audit.Entry(
                now,
                a.kind,
                run,
                a.checkpoint_id
                if a.checkpoint_id is not None
                else id_of(a.prefix)
                if a.prefix is not None
                else None,
                a.subject,
                a.reason,
                a.detail,
            )
            for a in changes.audit
        ],
    )
    return new_ids


def _update_checkpoint(cid: int, f: Found, now: datetime, completed: bool) -> Any:
    values: dict[str, Any] = dict(
        step=f.step,
        format=f.format,
        state=f.state,
        reason=f.reason,
        size_bytes=f.size,
        files=list(f.files),
        has_meta=f.has_meta,
        signature=list(f.signature),
        created_at=_from_ts(f.mtime),
    )
    if completed:
        values.update(completed_at=now, gone_at=None)
    return (
        update(_ckpts)
        .where(_ckpts.c.id == cid, _ckpts.c.state.in_((COMPLETE, CORRUPT, GONE, PRUNED)))
        .values(**values)
    )


def _insert_checkpoints(
    conn: Connection, run: int, changes: Changes, now: datetime
) -> dict[str, int]:
    """Insert the new checkpoints; their ids by prefix. One executemany, then the ids by prefix
    (unique among live rows): cheaper than SQLAlchemy's INSERT … RETURNING of many rows, which
    re-processes every row. On PostgreSQL the one INSERT returns them (a SELECT by prefix there
    was planned once, as a prepared statement, while the table was small: a sequential scan)."""
    new = changes.new
    rows = [
        (
            run,
            f.prefix,
            f.step,
            f.format,
            f.state,
            f.reason,
            f.size,
            list(f.files),
            f.has_meta,
            list(f.signature),
            _from_ts(f.mtime),
            now,
            now if f.state == COMPLETE else None,
            changes.incarnations.get(f.prefix, 1),
        )
        for f in new
    ]
    if len(rows) == 1:
        values = dict(zip(_CHECKPOINT_COLUMNS, rows[0], strict=True))
        return {new[0].prefix: insert_id(conn, insert(_ckpts).values(**values))}
    if conn.dialect.name == "postgresql":  # the ids come back from the INSERT itself
        return dict(insert_returning(conn, _ckpts, _CHECKPOINT_COLUMNS, rows, ("prefix", "id")))
    insert_many(conn, _ckpts, _CHECKPOINT_COLUMNS, rows)
    ids: dict[str, int] = {}
    prefixes = [f.prefix for f in new]
    for i in range(0, len(prefixes), _CHUNK):
        chunk = prefixes[i : i + _CHUNK]
        ids.update((p, cid) for p, cid in conn.execute(_IDS_BY_PREFIX, {"prefixes": chunk}))
    return ids


def _num(value: float | None) -> float | None:
    """SQLite stores NaN as NULL; NULL ranks worst, exactly as NaN must."""
    return None if value is None or math.isnan(value) else value


def _from_ts(ts: float) -> datetime | None:
    """A file time as a naive UTC datetime, clamped to the range a datetime can represent."""
    if not ts:
        return None
    return datetime.fromtimestamp(min(max(ts, _MIN_TS), _MAX_TS), UTC).replace(tzinfo=None)


# Statements built once (building one costs more than running it, and a backfill runs a few
# per run).
_runs, _ckpts, _files = tables.runs, tables.checkpoints, tables.event_files
_scalars, _metrics = tables.scalars, tables.metrics
_evaluations = tables.evaluations
_CHECKPOINT_COLUMNS = (
    "run_id",
    "prefix",
    "step",
    "format",
    "state",
    "reason",
    "size_bytes",
    "files",
    "has_meta",
    "signature",
    "created_at",
    "recorded_at",
    "completed_at",
    "incarnation",
)
_BUMP = (
    update(_runs)
    .where(_runs.c.id == bindparam("run"), _runs.c.version == bindparam("expected"))
    .values(
        version=_runs.c.version + 1,
        scanned_at=bindparam("at"),
        present=bindparam("is_present"),
    )
)
_UPDATE_FILE = (
    update(_files)
    .where(_files.c.path == bindparam("p"))
    .values(offset=bindparam("o"), error=bindparam("e"), updated_at=bindparam("at"))
)
_GONE = (
    update(_ckpts)
    .where(_ckpts.c.id.in_(bindparam("ids", expanding=True)))
    .where(_ckpts.c.state.in_((COMPLETE, CORRUPT)))
    .values(state=GONE, gone_at=bindparam("at"), reason=bindparam("why"))
)
_IDS_BY_PREFIX = select(_ckpts.c.prefix, _ckpts.c.id).where(
    _ckpts.c.prefix.in_(bindparam("prefixes", expanding=True)), LIVE
)
_REPLACED = (
    update(_ckpts)
    .where(_ckpts.c.id.in_(bindparam("ids", expanding=True)))
    .where(_ckpts.c.state.in_((COMPLETE, CORRUPT, GONE, PRUNED)))
    .values(
        state=REPLACED,
        reason="replaced by a newer file of the same name",
        gone_at=func.coalesce(_ckpts.c.gone_at, bindparam("at", type_=DateTime)),
    )
)
_UNQUEUE = delete(_evaluations).where(
    _evaluations.c.checkpoint_id.in_(bindparam("ids", expanding=True)),
    _evaluations.c.status == "pending",
)
_STARTS = (
    update(_runs)
    .where(_runs.c.id == bindparam("run"))
    .values(incarnation_starts=bindparam("starts", type_=_runs.c.incarnation_starts.type))
)
