"""Every statement of a prune: what planning reads, the ``pruning`` intent, the results.

Set-based throughout: a prune of many runs is a handful of statements per phase whatever their
number (ids go in ``IN (...)`` lists of up to CHUNK), and every transaction is bounded (about
BATCH checkpoints) so that no writer holds SQLite's write lock for long. Every state change bumps
the version of the runs it touches, in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import BindParameter, and_, bindparam, case, exists, func, or_, select, update

from ckptd.core.model import COMPLETE, PRUNED, PRUNING, Checkpoint, Run, utcnow
from ckptd.store import audit, claims, evaluations, leases, reads, tables, versions
from ckptd.store import runs as store_runs
from ckptd.store.handle import Store
from ckptd.store.leases import Hold, still_held

# Ids per ``IN (...)`` list: far below SQLite's bound-parameter limit, and short statements.
CHUNK = 2_000
# Checkpoints per transaction when pruning many runs at once: runs are read, and then pruned, in
# groups of about this many, so that no transaction holds SQLite's write lock for long (other
# writers wait at most the busy timeout).
BATCH = 20_000
HISTORY_RUNS = 50  # runs read per history query when planning

_c = tables.checkpoints.c
_r = tables.runs.c
_m = tables.metrics.c
_pins = tables.pins.c
_evals = tables.evaluations.c
_exports = tables.exports.c
_claims = tables.run_claims.c

# Built once (SQLAlchemy caches their compiled form): expanding IN parameters take a list of ids
# as one value, without a bind parameter object per id.
_IDS: BindParameter[int] = bindparam("ids", expanding=True)
_RUN_IDS: BindParameter[int] = bindparam("run_ids", expanding=True)
_MARK_PRUNING = (
    update(tables.checkpoints)
    .where(_c.id.in_(_IDS), _c.state == COMPLETE)
    .values(state=PRUNING, reason=bindparam("why"))
    .returning(_c.id, _c.run_id)
)
_MARK_PRUNED = (
    update(tables.checkpoints)
    .where(_c.id.in_(_IDS))
    .values(state=PRUNED, gone_at=bindparam("at", type_=_c.gone_at.type), reason=bindparam("why"))
)
# When the trainer wrote a checkpoint, as retention's save order reads it.
_SAVED = func.coalesce(_c.created_at, _c.completed_at, _c.recorded_at)
_RESTORE = update(tables.checkpoints).where(_c.id.in_(_IDS)).values(state=COMPLETE)
# A pruned checkpoint's evaluation whose holder's claim had expired (planning saw it as not in
# progress) goes back to the queue, as any expired job does: else it stays 'running' for good,
# since nobody claims the jobs of checkpoints that are no longer complete.
_REQUEUE_EXPIRED = (
    update(tables.evaluations)
    .where(
        _evals.checkpoint_id.in_(_IDS),
        _evals.status == evaluations.RUNNING,
        _evals.claimed_until < bindparam("at", type_=_evals.claimed_until.type),
    )
    .values(**evaluations.REQUEUED)
)
# What planning reads: a run's checkpoints, with the columns every Checkpoint is built from.
_PLAN_COLUMNS = select(*reads.CHECKPOINT_COLUMNS).where(_c.run_id.in_(_RUN_IDS))
_OF_RUNS = select(_c.id).where(_c.run_id.in_(_RUN_IDS))
_PLAN_METRICS = select(_m.checkpoint_id, _m.name, _m.value, _m.source).where(
    _m.checkpoint_id.in_(_OF_RUNS), _m.name.in_(bindparam("names", expanding=True))
)
_PLAN_PINS = select(_pins.checkpoint_id).where(_pins.checkpoint_id.in_(_OF_RUNS))
# Only the evaluations and exports planning looks at: in progress, or published. Work in
# progress counts only while its holder's claim is live: the job of a holder that died (its claim
# expired) is back in the queue (pending), and its export was interrupted, not in progress.
_NOW = bindparam("now", type_=_evals.claimed_until.type)
_PLAN_EVALS = select(
    _evals.checkpoint_id,
    case(
        (and_(_evals.status == "running", _evals.claimed_until >= _NOW), "running"),
        else_="pending",
    ),
).where(_evals.checkpoint_id.in_(_OF_RUNS), _evals.status.in_(("pending", "running")))
_FREEZING = exists().where(
    _claims.run_id == _c.run_id, _claims.job == claims.FREEZE, _claims.claimed_until >= _NOW
)
_PLAN_EXPORTS = (
    select(_exports.checkpoint_id, _exports.status)
    .join(tables.checkpoints, _c.id == _exports.checkpoint_id)
    .where(
        _c.run_id.in_(_RUN_IDS),
        or_(_exports.status == "published", and_(_exports.status == "exporting", _FREEZING)),
    )
)


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    ids = list(ids)
    for i in range(0, len(ids), CHUNK):
        yield ids[i : i + CHUNK]


class Wanted(NamedTuple):
    """What planning needs of a run: the whole history (``keep_every``) or only its complete
    checkpoints, and the metrics its rules rank by."""

    run: Run
    whole: bool
    metrics: Collection[str]


def runs(store: Store, name: str | None = None, watch_path: str | None = None) -> list[Run]:
    """The run named ``name`` (:class:`NotFound` if none), or those present under ``watch_path``,
    or every run."""
    if name is not None:
        return [store_runs.find_run(store, name)]
    if watch_path is not None:
        return store_runs.present_runs(store, watch_path)
    return store_runs.all_runs(store)


def histories(store: Store, wanted: Sequence[Wanted]) -> dict[int, list[Checkpoint]]:
    """Each run's history as planning sees it, many runs per statement and per transaction (a
    new one after about BATCH checkpoints).

    Only the columns planning and the plan's display use: the complete checkpoints (the whole
    history when asked), their ranking metrics, pins, evaluations in progress, and exports
    published or being written. Nothing else of a checkpoint decides its fate. ``metrics`` holds
    only the ranking metrics; ``evaluation`` is set only when pending or running.
    """
    out: dict[int, list[Checkpoint]] = {}
    first: dict[int, Wanted] = {}
    for w in wanted:
        first.setdefault(w.run.id, w)
    queue = list(first.values())
    while queue:
        with store.session() as conn:
            read = 0
            while queue and read < BATCH:
                chunk, queue = queue[:HISTORY_RUNS], queue[HISTORY_RUNS:]
                read += _read_histories(conn, chunk, out)
    return out


def _read_histories(conn: Any, chunk: list[Wanted], out: dict[int, list[Checkpoint]]) -> int:
    names = {w.run.id: w.run.name for w in chunk}
    run_ids = list(names)
    metrics_wanted = sorted({m for w in chunk for m in w.metrics})
    stmt = (
        _PLAN_COLUMNS if any(w.whole for w in chunk) else _PLAN_COLUMNS.where(_c.state == COMPLETE)
    )
    rows = conn.execute(stmt, {"run_ids": run_ids}).all()
    for rid in run_ids:
        out[rid] = []
    if not rows:
        return 0
    params = {"run_ids": run_ids}
    now = {**params, "now": utcnow()}
    best: dict[int, dict[str, float]] = {}
    if metrics_wanted:
        best = reads.best_sources(conn.execute(_PLAN_METRICS, {**params, "names": metrics_wanted}))
    pinned = set(conn.execute(_PLAN_PINS, params).scalars())
    evaluations = dict(conn.execute(_PLAN_EVALS, now).all())
    exports = conn.execute(_PLAN_EXPORTS, now).all()
    exported = {cid for cid, st in exports if st == "published"}
    exporting = {cid for cid, st in exports if st == "exporting"}
    # Every row's file list in one json.loads (a fifth of the time of one call per row).
    files = json.loads("[" + ",".join(row[8] or "null" for row in rows) + "]")
    for row, names_of in zip(rows, files, strict=True):
        cid = row[0]
        out[row[1]].append(
            Checkpoint(
                id=cid,
                run=names[row[1]],
                run_id=row[1],
                prefix=row[2],
                step=row[3],
                format=row[4],
                state=row[5],
                reason=row[6],
                size=row[7],
                files=tuple(names_of or ()),
                has_meta=row[9],
                created_at=row[10],
                recorded_at=row[11] or row[12],
                metrics=best.get(cid, {}),
                pinned=cid in pinned,
                evaluation=evaluations.get(cid),
                exported=cid in exported,
                exporting=cid in exporting,
            )
        )
    return len(rows)


def recorded_prefixes(store: Store, wanted: Mapping[int, Collection[str]]) -> dict[int, set[str]]:
    """Which of these prefixes (run id -> prefixes) are recorded checkpoints of that run."""
    out: dict[int, set[str]] = {}
    with store.session() as s:
        for run_id, prefixes in wanted.items():
            # A name that is not UTF-8 (surrogate-escaped) was never recorded, nor can it be a
            # query parameter.
            asked = [p for p in prefixes if _utf8(p)]
            out[run_id] = set(
                s.scalars(select(_c.prefix).where(_c.run_id == run_id, _c.prefix.in_(asked)))
            )
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def mark_pruning(
    store: Store, wanted: Mapping[str, Sequence[int]], holds: Sequence[Hold] = ()
) -> set[int]:
    """Phase 1, the intent: ``pruning`` with its reason (reason -> ids) for the checkpoints still
    complete (anything else changed since planning); the ids so marked. ``holds``: the leases
    of the runs, checked in the same transaction (:class:`leases.Fenced` if one is gone, and
    nothing is marked)."""
    marked: set[int] = set()
    runs_touched: set[int] = set()
    with store.session() as conn:
        for hold in sorted(holds, key=lambda h: h.run_id):  # run id order, as renewals lock
            leases.fence(conn, hold)
        for reason, ids in wanted.items():
            for chunk in _chunks(ids):
                for cid, run_id in conn.execute(_MARK_PRUNING, {"ids": chunk, "why": reason}):
                    marked.add(cid)
                    runs_touched.add(run_id)
        versions.bump(conn, runs_touched)
    return marked


def record_results(
    store: Store,
    pruned: Mapping[str, Sequence[int]],
    restored: Sequence[int],
    entries: Sequence[audit.Entry],
    run_ids: Collection[int],
    at: datetime,
    holds: Sequence[Hold] | None = None,
) -> set[int]:
    """Phase 3, in one transaction: ``pruned`` (reason -> ids) for what was removed, back to
    ``complete`` for what could not be (some of its files remain), and the audit rows.
    ``holds``: the daemon's leases of ``run_ids``, checked in the same transaction; nothing is
    written for a run whose lease is gone or not among them (its new holder finishes its
    prune). Returns those fenced runs."""
    with store.session() as conn:
        fenced: set[int] = set()
        if holds is not None:
            live = {h.run_id for h in sorted(holds, key=lambda h: h.run_id) if still_held(conn, h)}
            fenced = set(run_ids) - live
        mark, restore = _MARK_PRUNED, _RESTORE
        if fenced:  # (rare: the lease lapsed during the deletions)
            mark = mark.where(_c.run_id.not_in(sorted(fenced)))
            restore = restore.where(_c.run_id.not_in(sorted(fenced)))
            entries = [e for e in entries if e.run_id not in fenced]
        for reason, ids in pruned.items():
            for chunk in _chunks(ids):
                conn.execute(mark, {"ids": chunk, "at": at, "why": reason})
                conn.execute(_REQUEUE_EXPIRED, {"ids": chunk, "at": at})
        for chunk in _chunks(restored):
            conn.execute(restore, {"ids": chunk})
        audit.record_many(conn, entries)
        versions.bump(conn, set(run_ids) - fenced)
    return fenced


class Interrupted(NamedTuple):
    """A run's checkpoints left in ``pruning`` (each with the reason its intent recorded)."""

    run_id: int
    path: str
    watch_path: str
    checkpoints: list[Checkpoint]


def interrupted(store: Store, run_ids: Collection[int] | None = None) -> list[Interrupted]:
    """The checkpoints left in ``pruning`` by a prune that stopped, by run (of ``run_ids`` only,
    when given)."""
    stmt = (
        select(_c.id, _c.run_id, _r.path, _r.watch_path)
        .join(tables.runs, _r.id == _c.run_id)
        .where(_c.state == PRUNING)
    )
    with store.session() as s:
        by_run: dict[tuple[int, str, str], list[int]] = {}
        for scoped in _of_runs(stmt, _c.run_id, run_ids):
            for cid, run_id, path, watch_path in s.execute(scoped):
                by_run.setdefault((run_id, path, watch_path), []).append(cid)
        return [Interrupted(*key, reads.checkpoints(s, ids=ids)) for key, ids in by_run.items()]


def _of_runs(stmt: Any, column: Any, run_ids: Collection[int] | None) -> Iterator[Any]:
    """``stmt`` for every run (``run_ids`` None), or for ``run_ids``, CHUNK per statement (an
    index lookup each: a daemon that takes a few runs over reads only theirs)."""
    if run_ids is None:
        yield stmt
        return
    for chunk in _chunks(sorted(run_ids)):
        yield stmt.where(column.in_(chunk))


def runs_with_pruned(
    store: Store, run_ids: Collection[int] | None = None
) -> list[tuple[int, str, str]]:
    """(run id, run dir, watch root) of every run present at its last scan that has pruned
    checkpoints (of ``run_ids`` only, when given): a crash after ``pruned`` was committed but
    before the state file was rewritten leaves entries for deleted checkpoints there."""
    stmt = (
        select(_r.id, _r.path, _r.watch_path)
        .join(tables.checkpoints, _c.run_id == _r.id)
        .where(_c.state == PRUNED, _r.present)
        .distinct()
    )
    out: list[tuple[int, str, str]] = []
    with store.session() as s:
        for scoped in _of_runs(stmt, _r.id, run_ids):
            out += [(run_id, path, root) for run_id, path, root in s.execute(scoped)]
    return out


def newest_complete(store: Store, run_dir: str) -> str | None:
    """The prefix of the run's newest complete TF checkpoint (what a state file may name): the
    last saved, as retention orders them (``core.ranking.save_order``)."""
    with store.session() as s:
        return s.scalar(
            select(_c.prefix)
            .join(tables.runs, _r.id == _c.run_id)
            .where(_r.path == run_dir, _c.state == COMPLETE, _c.format.in_(("tf1", "tf2")))
            .order_by(_SAVED.desc(), _c.step.desc(), _c.id.desc())
            .limit(1)
        )
