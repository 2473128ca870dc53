"""Acting on a retention plan: two-phase, resumable deletion, then a state file TF can still use.

Phase 1 commits ``pruning`` for every checkpoint to delete (the intent); phase 2 removes the
files recorded for each through :mod:`ckptd.io.fsops`; phase 3 commits ``pruned`` with the
reason. A crash anywhere leaves rows in ``pruning``, which :meth:`Pruner.resume` finishes at the
next start. Then the run's ``checkpoint`` state file is rewritten so that
``tf.train.latest_checkpoint`` and a restarted ``CheckpointManager`` see only what exists.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import BindParameter, Engine, bindparam, insert, select, update

from ckptd.config import WatchConfig
from ckptd.core.model import COMPLETE, PRUNED, PRUNING, Checkpoint, Run, utcnow
from ckptd.core.policy import Plan, Rules, plan_prune
from ckptd.daemon import metrics
from ckptd.io import fsops, safeio, statefile
from ckptd.store import queries
from ckptd.store.db import session_scope
from ckptd.store.reads import CHECKPOINT_COLUMNS, Extras, to_checkpoints
from ckptd.store.tables import (
    ActionRow,
    CheckpointRow,
    EvaluationRow,
    ExportRow,
    MetricRow,
    PinRow,
    RunRow,
    table_of,
)
from ckptd.store.upsert import insert_many

log = logging.getLogger(__name__)


def rules_for(watch: WatchConfig) -> Rules | None:
    r = watch.retain
    if r is None:
        return None
    return Rules(
        keep_last=r.keep_last,
        keep_best=r.keep_best,
        keep_every=r.keep_every,
        keep_every_steps=r.keep_every_steps,
        min_age=r.min_age,
        metric=watch.best.metric,
        mode=watch.best.mode,
    )


def describe(rules: Rules) -> str:
    parts = []
    if rules.keep_last:
        parts.append(f"keep_last={rules.keep_last}")
    if rules.keep_best:
        parts.append(f"keep_best={rules.keep_best}")
    if rules.keep_every:
        parts.append(f"keep_every={rules.keep_every}")
    if rules.keep_every_steps:
        parts.append(f"keep_every_steps={rules.keep_every_steps}")
    return "not kept by " + (", ".join(parts) or "any rule")


@dataclass
class PruneResult:
    """One run's plan and what came of it.

    ``history`` is what planning read (see :meth:`Pruner._histories`): the run's complete
    checkpoints (its whole history when a ``keep_every`` rule needs it), each with only the
    ranking metric in ``metrics`` and ``evaluation`` only when pending or running.
    ``leftovers`` are TensorFlow's stale temporary names of the run's recorded checkpoints (part
    of the plan); ``leftovers_removed`` what of them was removed. ``dry_run_config``: the watch's
    ``[watch.retain] dry_run = true`` made this a dry run.
    """

    run: str
    plan: Plan
    history: list[Checkpoint]
    pruned: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    dry_run: bool = False
    dry_run_config: bool = False
    leftovers: list[fsops.Leftover] = field(default_factory=list)
    leftovers_removed: list[str] = field(default_factory=list)


# Ids per ``IN (...)`` list: far below SQLite's bound-parameter limit, and short statements.
CHUNK = 2_000
# Checkpoints per transaction when pruning many runs at once: runs are read, and then pruned, in
# groups of about this many, so that no transaction holds SQLite's write lock for long (other
# writers wait at most the busy timeout).
BATCH = 20_000
HISTORY_RUNS = 50  # runs read per history query when planning
AUDIT_COLUMNS = ("at", "kind", "run_id", "checkpoint_id", "subject", "reason", "detail")
# Threads rewriting state files: each rewrite is two fsyncs (file, directory), which release the
# GIL; done concurrently the filesystem commits them together instead of one journal commit each.
STATE_FILE_THREADS = 8

_c = table_of(CheckpointRow).c
_m = table_of(MetricRow).c
_pins = table_of(PinRow).c
_evals = table_of(EvaluationRow).c
_exports = table_of(ExportRow).c

# The statements of every prune, built once (SQLAlchemy caches their compiled form): expanding
# IN parameters take a list of ids as one value, without a bind parameter object per id.
_IDS: BindParameter[int] = bindparam("ids", expanding=True)
_RUN_IDS: BindParameter[int] = bindparam("run_ids", expanding=True)
_MARK_PRUNING = (
    update(table_of(CheckpointRow))
    .where(_c.id.in_(_IDS), _c.state == COMPLETE)
    .values(state=PRUNING, reason=bindparam("why"))
)
_MARK_PRUNING_RETURNING = _MARK_PRUNING.returning(_c.id)
_MARK_PRUNED = (
    update(table_of(CheckpointRow))
    .where(_c.id.in_(_IDS))
    .values(state=PRUNED, gone_at=bindparam("at", type_=_c.gone_at.type), reason=bindparam("why"))
)
_PRUNING_OF = select(_c.id).where(_c.id.in_(_IDS), _c.state == PRUNING)
# What planning reads: a run's checkpoints (the columns of every Checkpoint).
_PLAN_COLUMNS = select(*CHECKPOINT_COLUMNS).where(_c.run_id.in_(_RUN_IDS))
_OF_RUNS = select(_c.id).where(_c.run_id.in_(_RUN_IDS))
_PLAN_METRICS = select(_m.checkpoint_id, _m.name, _m.value, _m.source).where(
    _m.checkpoint_id.in_(_OF_RUNS), _m.name.in_(bindparam("names", expanding=True))
)
_PLAN_PINS = select(_pins.checkpoint_id).where(_pins.checkpoint_id.in_(_OF_RUNS))
# Only the evaluations and exports planning looks at: in progress, or published.
_PLAN_EVALS = select(_evals.checkpoint_id, _evals.status).where(
    _evals.checkpoint_id.in_(_OF_RUNS), _evals.status.in_(("pending", "running"))
)
_PLAN_EXPORTS = select(_exports.checkpoint_id, _exports.status).where(
    _exports.checkpoint_id.in_(_OF_RUNS), _exports.status.in_(("published", "exporting"))
)


@contextmanager
def _old_objects_frozen() -> Iterator[None]:
    """Keep the cyclic GC's full passes off everything that existed before the prune.

    A prune of 10,000 checkpoints allocates enough to trigger a full collection, which walks
    every object of the process (SQLAlchemy's alone are hundreds of thousands): ~50 ms of a
    ~0.4 s prune for nothing. Frozen objects are skipped until :func:`gc.unfreeze` returns
    them to the oldest generation; objects made during the prune are still collected.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    ids = list(ids)
    for i in range(0, len(ids), CHUNK):
        yield ids[i : i + CHUNK]


@dataclass
class _Batch:
    """The checkpoints of one run to delete, with where they live and why they go (``reason``,
    unless ``reasons`` names another for a checkpoint id)."""

    ckpts: list[Checkpoint]
    run_dir: str
    root: str
    reason: str
    result: PruneResult
    reasons: dict[int, str] = field(default_factory=dict)

    def reason_of(self, ckpt: Checkpoint) -> str:
        return self.reasons.get(ckpt.id, self.reason)

    def files(self) -> list[Sequence[str]]:
        return [c.files for c in self.ckpts]


class Pruner:
    """Deletes what a plan says, and nothing else. ``on_states`` keeps a reconciler's cache true."""

    def __init__(
        self, engine: Engine, on_states: Callable[[dict[str, str]], None] | None = None
    ) -> None:
        self.engine = engine
        self.on_states = on_states

    def plan(
        self, run: Run, watch: WatchConfig, rules: Rules | None = None
    ) -> tuple[Plan, list[Checkpoint]]:
        rules = rules or rules_for(watch) or Rules()
        history = self._histories([(run, rules)]).get(run.id, [])
        return plan_prune(history, rules, utcnow()), history

    def prune_run(self, run: Run, watch: WatchConfig, *, dry_run: bool = False) -> PruneResult:
        return self.prune_runs([(run, watch)], dry_run=dry_run)[0]

    def prune_runs(
        self, items: Sequence[tuple[Run, WatchConfig]], *, dry_run: bool = False
    ) -> list[PruneResult]:
        """:meth:`prune_run` for many runs, each phase batched across them.

        The same phases and guarantees as one run at a time, with one transaction per phase for
        a whole group of runs (up to about BATCH checkpoints): the intent of every run of the
        group is committed before any of its files is removed, and a crash leaves ``pruning``
        rows that :meth:`resume` finishes.
        """
        with _old_objects_frozen():
            return self._prune_runs(items, dry_run)

    def _prune_runs(
        self, items: Sequence[tuple[Run, WatchConfig]], dry_run: bool
    ) -> list[PruneResult]:
        results: list[PruneResult] = []
        planned: list[tuple[Run, Rules, PruneResult]] = []
        todo: list[tuple[Run, Rules]] = []
        dry_config: set[int] = set()  # runs whose watch says dry_run = true
        seen: set[int] = set()
        for run, watch in items:
            rules = rules_for(watch)
            if rules is not None:
                todo.append((run, rules))
                if watch.retain is not None and watch.retain.dry_run:
                    dry_config.add(run.id)
        histories = self._histories(todo)
        now = utcnow()
        by_id = {}
        for run, rules in todo:
            history = histories.get(run.id, [])
            result = PruneResult(run.name, plan_prune(history, rules, now), history)
            result.dry_run_config = run.id in dry_config
            result.dry_run = dry_run or result.dry_run_config
            by_id[run.id] = (result, rules)
        for run, _watch in items:
            if run.id not in by_id:
                # No [watch.retain] section: nothing is ever deleted.
                results.append(PruneResult(run.name, Plan({}, ()), [], dry_run=True))
                continue
            result, rules = by_id[run.id]
            results.append(result)
            if run.id not in seen:  # a run listed twice is still pruned once
                seen.add(run.id)
                planned.append((run, rules, result))
        self._find_leftovers([(run, result) for run, _rules, result in planned])
        planned = [entry for entry in planned if not entry[2].dry_run]
        group: list[tuple[Run, Rules, PruneResult]] = []
        size = 0
        for entry in planned:  # bounded transactions: runs in groups of about BATCH deletions
            n = len(entry[2].plan.delete)
            if group and size + n > BATCH:
                self._prune_group(group)
                group, size = [], 0
            group.append(entry)
            size += n
        if group:
            self._prune_group(group)
        self._remove_leftovers([(run, result) for run, _rules, result in planned])
        return results

    def _find_leftovers(self, runs: Sequence[tuple[Run, PruneResult]]) -> None:
        """Plan the removal of TensorFlow's stale temporary names in each run directory: only
        those of a checkpoint prefix recorded for that run (a directory scan per run; the
        database is asked only about the rare names that look like TF's)."""
        found = [
            (run, result, fsops.find_leftovers(run.watch_path, run.path)) for run, result in runs
        ]
        found = [item for item in found if item[2]]
        if not found:
            return
        with session_scope(self.engine) as s:
            for run, result, leftovers in found:
                paths = {os.path.join(run.path, f.prefix) for f in leftovers}
                # A name that is not UTF-8 (surrogate-escaped) was never recorded, nor can it be
                # a query parameter.
                paths = {path for path in paths if _utf8(path)}
                recorded = set(
                    s.scalars(
                        select(CheckpointRow.prefix).where(
                            CheckpointRow.run_id == run.id, CheckpointRow.prefix.in_(paths)
                        )
                    )
                )
                result.leftovers = [
                    f for f in leftovers if os.path.join(run.path, f.prefix) in recorded
                ]

    def _remove_leftovers(self, runs: Sequence[tuple[Run, PruneResult]]) -> None:
        """Remove the planned leftovers; one audit row per run names what went."""
        audit: list[tuple[Any, ...]] = []
        now = utcnow()
        for run, result in runs:
            if not result.leftovers:
                continue
            r = fsops.remove_leftovers(run.watch_path, run.path, result.leftovers)
            result.leftovers_removed = r.removed
            for error in r.errors:
                log.warning("TensorFlow temp files in %s: %s", run.path, error)
            if r.removed or r.errors:
                detail = {"removed": r.removed, "bytes": r.bytes_freed, "errors": r.errors}
                why = "TensorFlow's temporary files of recorded checkpoints, untouched for a day"
                audit.append((now, "removed_temp", run.id, None, run.path, why, detail))
        if audit:
            with session_scope(self.engine) as s:
                insert_many(s.connection(), table_of(ActionRow), AUDIT_COLUMNS, audit)

    def _prune_group(self, planned: list[tuple[Run, Rules, PruneResult]]) -> None:
        """Phase 1 for every run of ``planned`` in one transaction, then :meth:`_finish`."""
        wanted: dict[str, list[int]] = {}  # reason -> ids
        for _run, rules, result in planned:
            if result.plan.delete:
                wanted.setdefault(describe(rules), []).extend(c.id for c in result.plan.delete)
        intended: set[int] = set()
        if wanted:
            with session_scope(self.engine) as s:  # phase 1: intent, for every run at once
                conn = s.connection()
                returning = conn.dialect.update_returning
                for reason, ids in wanted.items():
                    for chunk in _chunks(ids):
                        # Only rows still complete: anything else changed since planning.
                        if returning:
                            intended.update(
                                conn.execute(
                                    _MARK_PRUNING_RETURNING, {"ids": chunk, "why": reason}
                                ).scalars()
                            )
                        else:  # pragma: no cover - every supported database has RETURNING
                            conn.execute(_MARK_PRUNING, {"ids": chunk, "why": reason})
                            intended.update(conn.execute(_PRUNING_OF, {"ids": chunk}).scalars())
        batches: list[_Batch] = []
        untouched: list[tuple[str, str]] = []
        for run, rules, result in planned:
            if result.plan.delete:
                ckpts = [c for c in result.plan.delete if c.id in intended]
                batches.append(_Batch(ckpts, run.path, run.watch_path, describe(rules), result))
            elif run.present:
                # A live TF2 CheckpointManager rewrites the state file from its own list at
                # every save, putting back entries ckptd pruned: repair it on every pass
                # (cheap: a read and a compare; it writes only on change).
                untouched.append((run.path, run.watch_path))
        self._notify({c.prefix: PRUNING for b in batches for c in b.ckpts})
        self._finish(batches, repair=untouched)

    def resume(self) -> int:
        """Finish deletions a crash interrupted (rows left in ``pruning``)."""
        with session_scope(self.engine) as s:
            rows = s.execute(
                select(CheckpointRow.id, RunRow.path, RunRow.watch_path, CheckpointRow.reason)
                .join(RunRow, RunRow.id == CheckpointRow.run_id)
                .where(CheckpointRow.state == PRUNING)
            ).all()
            by_run: dict[tuple[str, str], list[int]] = {}
            reasons: dict[int, str] = {}
            for cid, path, watch_path, reason in rows:
                by_run.setdefault((path, watch_path), []).append(cid)
                # Each checkpoint keeps the reason its own intent recorded.
                reasons[cid] = (reason or "pruned") + " (resumed after restart)"
            items = {key: queries.checkpoints(s, ids=ids) for key, ids in by_run.items()}
            # A crash after "pruned" was committed but before the state file was rewritten
            # leaves entries for deleted checkpoints there: fix every run that has pruned ones.
            # Only runs present at their last scan: a run that is not there is never repaired.
            pruned_runs = {
                (path, watch_path)
                for path, watch_path in s.execute(
                    select(RunRow.path, RunRow.watch_path)
                    .join(CheckpointRow, CheckpointRow.run_id == RunRow.id)
                    .where(CheckpointRow.state == PRUNED, RunRow.present)
                    .distinct()
                )
            }
        batches = [
            _Batch(
                ckpts,
                path,
                watch_path,
                reasons[ckpts[0].id],
                PruneResult(os.path.basename(path), Plan({}, ()), []),
                {c.id: reasons[c.id] for c in ckpts},
            )
            for (path, watch_path), ckpts in items.items()
            if ckpts
        ]
        self._finish(batches, repair=sorted(pruned_runs - set(items)))
        for b in batches:
            log.info("resumed pruning of %d checkpoint(s) in %s", len(b.result.pruned), b.run_dir)
        return sum(len(v) for v in items.values())

    # -------------------------------------------------------------- internals

    def _histories(self, todo: Sequence[tuple[Run, Rules]]) -> dict[int, list[Checkpoint]]:
        """What :func:`plan_prune` needs of each run, for many runs per transaction (a new one
        after about BATCH checkpoints).

        Only the columns planning and the plan's display use, as plain tuples: the complete
        checkpoints (the whole history only for runs with a ``keep_every`` rule, which counts
        from the first save ever), their ranking metric, pins, evaluations in progress, and
        exports published or being written. Nothing else of a checkpoint decides its fate.
        """
        out: dict[int, list[Checkpoint]] = {}
        pending: dict[int, tuple[Run, Rules]] = {}
        for run, rules in todo:
            pending.setdefault(run.id, (run, rules))
        queue = list(pending.values())
        while queue:
            with session_scope(self.engine) as s:
                conn = s.connection()
                read = 0
                while queue and read < BATCH:
                    # Several runs per query: a handful of statements whatever their number.
                    chunk, queue = queue[:HISTORY_RUNS], queue[HISTORY_RUNS:]
                    read += self._read_histories(conn, chunk, out)
        return out

    @staticmethod
    def _read_histories(
        conn: Any, chunk: list[tuple[Run, Rules]], out: dict[int, list[Checkpoint]]
    ) -> int:
        names = {run.id: run.name for run, _ in chunk}
        run_ids = list(names)
        whole = any(rules.keep_every for _, rules in chunk)
        metrics_wanted = sorted({rules.metric for _, rules in chunk if rules.metric})
        stmt = _PLAN_COLUMNS if whole else _PLAN_COLUMNS.where(_c.state == COMPLETE)
        rows = conn.execute(stmt, {"run_ids": run_ids}).all()
        for rid in run_ids:
            out[rid] = []
        if not rows:
            return 0
        params = {"run_ids": run_ids}
        metrics = (
            conn.execute(_PLAN_METRICS, {**params, "names": metrics_wanted})
            if metrics_wanted
            else ()
        )
        extras = Extras.of(
            metrics,
            conn.execute(_PLAN_PINS, params).scalars(),
            conn.execute(_PLAN_EVALS, params).all(),
            conn.execute(_PLAN_EXPORTS, params).all(),
        )
        for c in to_checkpoints(rows, names, extras):
            out[c.run_id].append(c)
        return len(rows)

    def _finish(self, batches: list[_Batch], repair: Sequence[tuple[str, str]] = ()) -> None:
        """Phases 2 and 3 for checkpoints already in ``pruning``, then the runs' state files
        (and those of the ``repair`` runs: (run dir, watch root))."""
        outcomes: list[tuple[_Batch, list[tuple[Checkpoint, fsops.Removal]]]] = []
        jobs: dict[str, tuple[str, set[str]]] = {}  # run dir -> (root, prefixes removed)
        for b in batches:  # phase 2: one directory descriptor per run
            pairs = list(
                zip(b.ckpts, fsops.remove_groups(b.root, b.run_dir, b.files()), strict=True)
            )
            outcomes.append((b, pairs))
            _root, removed = jobs.setdefault(b.run_dir, (b.root, set()))
            removed.update(c.prefix for c, r in pairs if r.ok)
        self._commit_results(outcomes)  # phase 3
        # The state file is rewritten when something went (and always for a run to repair).
        tidy = [(path, root, removed, bool(removed)) for path, (root, removed) in jobs.items()]
        tidy += [
            (path, root, set(), True) for path, root in dict.fromkeys(repair) if path not in jobs
        ]
        if len(tidy) <= 1:
            for job in tidy:
                self._tidy_run(*job)
            return
        # Each state-file rewrite waits on two fsyncs (file, directory), which release the GIL:
        # done concurrently, the filesystem commits them together instead of one by one.
        with ThreadPoolExecutor(min(STATE_FILE_THREADS, len(tidy))) as pool:
            for _ in pool.map(lambda job: self._tidy_run(*job), tidy):
                pass

    def _commit_results(
        self, outcomes: list[tuple[_Batch, list[tuple[Checkpoint, fsops.Removal]]]]
    ) -> None:
        """Phase 3: ``pruned`` for each removed checkpoint, and one audit row per run listing
        them all (``ckptd events`` shows one event per checkpoint, see
        :func:`ckptd.store.queries.actions`)."""
        now = utcnow()
        done_ids: dict[str, list[int]] = {}
        audit: list[tuple[Any, ...]] = []  # in AUDIT_COLUMNS order
        failed: list[tuple[Checkpoint, fsops.Removal]] = []
        for b, pairs in outcomes:
            entries: list[dict[str, Any]] = []
            run_id = None
            for c, r in pairs:
                if not r.ok:
                    failed.append((c, r))
                    continue
                reason = b.reason_of(c)
                done_ids.setdefault(reason, []).append(c.id)
                entry = {
                    "checkpoint_id": c.id,
                    "prefix": c.prefix,
                    "step": c.step,
                    "files": r.removed,
                    "already_missing": r.missing,
                    "bytes": r.bytes_freed,
                }
                if reason != b.reason:
                    entry["reason"] = reason
                entries.append(entry)
                run_id = c.run_id
            if entries:
                detail = {"checkpoints": entries}
                audit.append((now, "pruned", run_id, None, b.run_dir, b.reason, detail))
        if audit or failed:
            with session_scope(self.engine) as s:  # for every run at once
                conn = s.connection()
                for reason, ids in done_ids.items():
                    for chunk in _chunks(ids):
                        conn.execute(_MARK_PRUNED, {"ids": chunk, "at": now, "why": reason})
                if audit:
                    # One compiled INSERT, executemany by the driver (no per-row ORM work).
                    insert_many(conn, table_of(ActionRow), AUDIT_COLUMNS, audit)
                for c, r in failed:
                    # Leave it recorded as present: some of its files could not be removed.
                    s.execute(
                        update(CheckpointRow).where(CheckpointRow.id == c.id).values(state=COMPLETE)
                    )
                    s.execute(
                        insert(ActionRow).values(
                            at=now,
                            kind="prune_failed",
                            run_id=c.run_id,
                            checkpoint_id=c.id,
                            subject=c.prefix,
                            reason="; ".join(r.errors),
                            detail={"removed": r.removed},
                        )
                    )
        states: dict[str, str] = {}
        total, freed = 0, 0
        for b, pairs in outcomes:
            done = [(c, r) for c, r in pairs if r.ok]
            bad = [(c, r) for c, r in pairs if not r.ok]
            states.update({c.prefix: PRUNED for c, _ in done})
            states.update({c.prefix: COMPLETE for c, _ in bad})
            b.result.pruned += [c.label for c, _ in done]
            b.result.failed += [f"{c.label}: {'; '.join(r.errors)}" for c, r in bad]
            run_freed = sum(r.bytes_freed for _, r in done)
            b.result.bytes_freed += run_freed
            total += len(done)
            freed += run_freed
        self._notify(states)
        metrics.pruned(total, freed)

    def _tidy_run(self, run_dir: str, root: str, removed: set[str], rewrite: bool) -> None:
        """State-file repair (``rewrite``) of one run."""
        if rewrite:
            self._rewrite_state_file(run_dir, root, removed)

    def _newest_complete(self, run_dir: str) -> str | None:
        with session_scope(self.engine) as s:
            return s.scalar(
                select(CheckpointRow.prefix)
                .join(RunRow, RunRow.id == CheckpointRow.run_id)
                .where(
                    RunRow.path == str(run_dir),
                    CheckpointRow.state == COMPLETE,
                    CheckpointRow.format.in_(("tf1", "tf2")),
                )
                .order_by(CheckpointRow.step.desc(), CheckpointRow.id.desc())
                .limit(1)
            )

    def _rewrite_state_file(self, run_dir: str | Path, root: str | Path, removed: set[str]) -> None:
        """Drop pruned (and otherwise vanished) entries; keep paths' style and TF2 timestamps.

        ``removed`` holds the prefixes (as recorded) this prune deleted: they are dropped without
        a look at the disk; every other entry is dropped only if its files are gone. The run
        directory is reached from the watch ``root`` through :mod:`ckptd.io.safeio`: a run that is
        gone, or whose directory (or anything on the way below the root) is now a symlink, is
        left alone, and a state file that is a symlink, a FIFO or too big is never read.
        """
        try:
            with safeio.open_dir_under(root, run_dir) as dfd:
                self._rewrite_state_file_at(dfd, Path(run_dir), removed)
        except FileNotFoundError:
            return  # the run directory is gone: nothing to repair
        except OSError as exc:  # a symlink below the root, permissions …: left alone
            why = exc.strerror or exc
            log.warning("%s/%s: not rewritten: %s", run_dir, statefile.STATE_FILE, why)

    def _rewrite_state_file_at(self, dfd: int, run_path: Path, removed: set[str]) -> None:
        try:
            state = statefile.read_at(dfd)
        except OSError as exc:
            log.warning(
                "%s/%s: %s; not read or rewritten (ckptd uses only a regular state file: "
                "replace or remove it)",
                run_path,
                statefile.STATE_FILE,
                exc.strerror or exc,
            )
            return
        if state is None:
            return
        base = str(run_path)
        new = _without(state, base, removed, dfd)
        if not new.all_model_checkpoint_paths:
            # TF refuses a state file with no latest checkpoint (latest_checkpoint and
            # CheckpointManager raise): point it at the newest checkpoint that exists.
            newest = self._newest_complete(base)
            if newest is None:
                return
            name = os.path.basename(newest)
            new = statefile.CheckpointState(name, [name], [], state.last_preserved_timestamp)
        if new != state:
            try:
                statefile.write_at(dfd, new)
            except OSError as exc:
                log.error("could not rewrite %s/checkpoint: %s", run_path, exc)

    def _notify(self, states: dict[str, str]) -> None:
        if self.on_states and states:
            self.on_states(states)


def _resolve(run_dir: str, entry: str) -> str:
    """``str(state.resolve(Path(run_dir), entry))`` without building paths for plain base names
    (TF2 writes those); ``run_dir`` must already be normalized (``str(Path(...))``)."""
    if entry and "/" not in entry and entry not in (".", ".."):
        return f"{run_dir}/{entry}" if run_dir != "/" else f"/{entry}"
    return str(statefile.CheckpointState().resolve(Path(run_dir), entry))


def _without(
    state: statefile.CheckpointState, run_dir: str, removed: set[str], dfd: int
) -> statefile.CheckpointState:
    """:func:`statefile.without` of ``removed`` and of every entry whose files are gone.

    Entries in ``removed`` (deleted by this prune) are dropped without looking at the disk.
    Entries in the run directory are looked up in ``dfd`` (never through a symlink); one naming
    another directory (TF1 writes absolute paths, maybe through another mount) only by a stat
    of its path: nothing there is ever opened.
    """
    paths: list[str] = []
    stamps: list[float] = []
    dropped: set[str] = set()
    old_stamps = state.all_model_checkpoint_timestamps
    has_stamps = len(old_stamps) == len(state.all_model_checkpoint_paths)
    real_dir: str | None = None
    for i, entry in enumerate(state.all_model_checkpoint_paths):
        path = _resolve(run_dir, entry)
        directory, name = os.path.split(path)
        in_run = directory == run_dir
        if not in_run:  # TF1 writes absolute paths as the trainer spelt them: maybe the real one
            real_dir = real_dir or os.path.realpath(run_dir)
            in_run = directory == real_dir
        if path in removed or not (_exists(dfd, name) if in_run else _exists_outside(path)):
            dropped.add(path)
            continue
        paths.append(entry)
        if has_stamps:
            stamps.append(old_stamps[i])
    current = state.model_checkpoint_path
    if current:
        path = _resolve(run_dir, current)
        if path in removed or path in dropped:
            current = paths[-1] if paths else ""
    return statefile.CheckpointState(current, paths, stamps, state.last_preserved_timestamp)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _exists(dfd: int, name: str) -> bool:
    """Whether checkpoint ``name`` (its .index, or the file itself) is in the directory ``dfd``."""
    for candidate in (name + ".index", name):
        try:
            os.stat(candidate, dir_fd=dfd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            continue
        except OSError:
            return True  # cannot tell: keep the entry
    return False


def _exists_outside(prefix: str) -> bool:
    return os.path.exists(prefix + ".index") or os.path.exists(prefix)


def run_for(engine: Engine, name_or_path: str) -> Run:
    with session_scope(engine) as s:
        return queries.resolve_run(s, name_or_path)


def all_runs(engine: Engine) -> list[Run]:
    with session_scope(engine) as s:
        return queries.runs(s)
