"""Pruning: plan each run by its retention rules, then delete what the plan says, and nothing else.

Two-phase and resumable: phase 1 commits ``pruning`` for every checkpoint to delete (the intent);
phase 2 removes the files recorded for each through :mod:`ckptd.io.fsops`; phase 3 commits
``pruned`` with the reason. A crash anywhere leaves rows in ``pruning``, which :func:`resume`
(or the next prune of that run) finishes. Then the run's ``checkpoint`` state file is rewritten
so that ``tf.train.latest_checkpoint`` and a restarted ``CheckpointManager`` see only what exists.

Each run's prune is claimed (``store.claims``, job ``prune``) for the whole of its work, so the
daemon and ``ckptd prune`` never prune the same run at once: a run claimed by another process is
skipped, and says by whom. Dry runs only read, and take no claim.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from ckptd.config import WatchConfig
from ckptd.core import retention
from ckptd.core.model import Checkpoint, Run, iso, utcnow
from ckptd.core.retention import Plan
from ckptd.io import fsops, statefile
from ckptd.store import audit, claims, pruning
from ckptd.store.audit import Entry
from ckptd.store.handle import Store
from ckptd.store.leases import Fenced, Hold

log = logging.getLogger(__name__)

# Run directories cleaned at once (deletions, then the state file): unlink, lstat and the state
# file's fsyncs release the GIL. More threads than cores lose more to handing the GIL back and
# forth between syscalls than they gain (bench/prune.py).
DIRECTORY_THREADS = 2
RESUMED = " (resumed after restart)"
LEFTOVERS_WHY = "TensorFlow's temporary files of recorded checkpoints, untouched for a day"


def rules_for(watch: WatchConfig) -> tuple[retention.Rule, ...] | None:
    """The watch's retention rules; None without a ``[watch.retain]`` section (never pruned)."""
    return watch.retain.rules(watch.best) if watch.retain is not None else None


def runs(store: Store, name: str | None = None, watch_path: str | None = None) -> list[Run]:
    """The run named ``name`` (``NotFound`` if none), or those present under ``watch_path``, or
    every run."""
    return pruning.runs(store, name, watch_path)


@dataclass
class PruneResult:
    """One run's plan and what came of it.

    ``history`` is what planning read (:func:`ckptd.store.pruning.histories`). ``leftovers`` are
    TensorFlow's stale temporary names of the run's recorded checkpoints (part of the plan);
    ``leftovers_removed`` what of them was removed. ``dry_run_config``: the watch's
    ``[watch.retain] dry_run = true`` made this a dry run. ``skipped``: why nothing was done
    (another process is pruning the run).
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
    skipped: str | None = None


@dataclass
class _Batch:
    """The checkpoints of one run to delete, where they live and why each goes."""

    ckpts: list[Checkpoint]
    run_dir: str
    root: str
    reason: str  # the run's reason; ``reasons`` names another for some checkpoint ids
    result: PruneResult
    reasons: dict[int, str] = field(default_factory=dict)

    def reason_of(self, ckpt: Checkpoint) -> str:
        return self.reasons.get(ckpt.id, self.reason)


_Outcome = tuple[_Batch, list[tuple[Checkpoint, fsops.Removal]]]


@dataclass
class _Planned:
    run: Run
    reason: str  # ``describe`` of its [watch.retain]: the reason of each deletion
    result: PruneResult


@contextmanager
def _old_objects_frozen() -> Iterator[None]:
    """Keep the cyclic GC's full passes off everything that existed before the prune: a prune
    of many checkpoints allocates enough to trigger full collections, which walk every object
    of the process (SQLAlchemy's alone are hundreds of thousands) for nothing. Objects made
    during the prune are still collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


Holds = Callable[[int], Hold | None]  # a daemon's lease of a run (None: not held)


def prune(
    store: Store,
    items: Sequence[tuple[Run, WatchConfig]],
    *,
    dry_run: bool = False,
    holds: Holds | None = None,
) -> list[PruneResult]:
    """Prune each run by its watch's rules (one result per item; a run listed twice is pruned
    once), every phase batched across the runs: one transaction per phase for a group of runs
    of up to about ``pruning.BATCH`` deletions, the intent of every run of the group committed
    before any of its files is removed. ``holds``: a daemon's leases; the intent is written only
    while it still holds each run's lease (fencing), else the run is skipped."""
    with _old_objects_frozen():
        return _prune(store, items, dry_run, holds)


def _prune(
    store: Store, items: Sequence[tuple[Run, WatchConfig]], dry_run: bool, holds: Holds | None
) -> list[PruneResult]:
    results: list[PruneResult] = []
    rules: dict[int, tuple[retention.Rule, ...]] = {}
    planned: dict[int, _Planned] = {}
    for run, watch in items:
        if watch.retain is None:
            # No [watch.retain] section: nothing is ever deleted.
            results.append(PruneResult(run.name, Plan({}, ()), [], dry_run=True))
            continue
        if run.id not in planned:
            result = PruneResult(run.name, Plan({}, ()), [])
            result.dry_run_config = watch.retain.dry_run
            result.dry_run = dry_run or result.dry_run_config
            planned[run.id] = _Planned(run, retention.describe(watch.retain), result)
            rules[run.id] = watch.retain.rules(watch.best)
        results.append(planned[run.id].result)
    acting = [p.run.id for p in planned.values() if not p.result.dry_run]
    held = claims.claim_many(store, acting, claims.PRUNE) if acting else set()
    try:
        _skip_busy(store, [planned[rid] for rid in acting if rid not in held])
        todo = [p for p in planned.values() if p.result.skipped is None]
        _finish_interrupted(store, {rid: planned[rid].result for rid in held})
        _plan(store, todo, rules)
        _find_leftovers(store, todo)
        todo = [p for p in todo if not p.result.dry_run]
        group: list[_Planned] = []
        size = 0
        for p in todo:  # bounded transactions: runs in groups of about BATCH deletions
            n = len(p.result.plan.delete)
            if group and size + n > pruning.BATCH:
                _prune_group(store, group, holds)
                group, size = [], 0
            group.append(p)
            size += n
        if group:
            _prune_group(store, group, holds)
        _remove_leftovers(store, [p for p in todo if p.result.skipped is None])
    finally:
        if held:
            claims.release_many(store, held, claims.PRUNE)
    return results


def _skip_busy(store: Store, busy: list[_Planned]) -> None:
    """Mark the runs another process is pruning as skipped, naming it."""
    if not busy:
        return
    holders = claims.holders(store, [p.run.id for p in busy], claims.PRUNE)
    for p in busy:
        held = holders.get(p.run.id)
        p.result.skipped = (
            f"another prune of it is running ({held[0]}, claimed until {iso(held[1])})"
            if held
            else "another prune of it is running"
        )
        log.info("%s: not pruned: %s", p.run.name, p.result.skipped)


def _plan(store: Store, todo: list[_Planned], rules: dict[int, tuple[retention.Rule, ...]]) -> None:
    wanted = [
        pruning.Wanted(
            p.run,
            retention.needs_whole_history(rules[p.run.id]),
            retention.metrics_of(rules[p.run.id]),
        )
        for p in todo
    ]
    histories = pruning.histories(store, wanted)
    now = utcnow()
    for p in todo:
        history = histories.get(p.run.id, [])
        p.result.history = history
        # One read of the run's state file: what TF resumes from is never deleted, and its
        # CheckpointManager's anchor for keep_every.
        trainer = (
            statefile.trainer_state(p.run.path, p.run.watch_path)
            if history and p.run.present
            else retention.NO_STATE
        )
        p.result.plan = retention.plan(history, rules[p.run.id], now, trainer)


def _find_leftovers(store: Store, todo: list[_Planned]) -> None:
    """Plan the removal of TensorFlow's stale temporary names in each run directory: only those
    of a checkpoint prefix recorded for that run (a directory scan per run; the database is
    asked only about the rare names that look like TF's)."""
    found = {p.run.id: fsops.find_leftovers(p.run.watch_path, p.run.path) for p in todo}
    found = {rid: leftovers for rid, leftovers in found.items() if leftovers}
    if not found:
        return
    paths = {p.run.id: p.run.path for p in todo}
    recorded = pruning.recorded_prefixes(
        store, {rid: {os.path.join(paths[rid], f.prefix) for f in lo} for rid, lo in found.items()}
    )
    for p in todo:
        if p.run.id in found:
            p.result.leftovers = [
                f
                for f in found[p.run.id]
                if os.path.join(p.run.path, f.prefix) in recorded[p.run.id]
            ]


def _remove_leftovers(store: Store, todo: list[_Planned]) -> None:
    """Remove the planned leftovers; one audit row per run names what went."""
    entries: list[Entry] = []
    now = utcnow()
    for p in todo:
        run, result = p.run, p.result
        if not result.leftovers:
            continue
        r = fsops.remove_leftovers(run.watch_path, run.path, result.leftovers)
        result.leftovers_removed = r.removed
        for error in r.errors:
            log.warning("TensorFlow temp files in %s: %s", run.path, error)
        if r.removed or r.errors:
            detail = {"removed": r.removed, "bytes": r.bytes_freed, "errors": r.errors}
            entries.append(
                Entry(now, "removed_temp", run.id, None, run.path, LEFTOVERS_WHY, detail)
            )
    audit.write(store, entries)


def _prune_group(store: Store, group: list[_Planned], holds: Holds | None) -> None:
    """Phase 1 for every run of ``group`` in one transaction, then :func:`_finish`."""
    still = claims.renew_many(store, [p.run.id for p in group], claims.PRUNE)
    for p in group:
        if p.run.id not in still:  # expired while earlier groups were deleted, and taken
            p.result.skipped = "its claim expired and another process took it"
            log.warning("%s: not pruned: %s", p.run.name, p.result.skipped)
    group = [p for p in group if p.run.id in still]
    leases: list[Hold] = []
    if holds is not None:
        for p in group:
            hold = holds(p.run.id)
            if hold is None:
                p.result.skipped = "another daemon holds its lease"
            else:
                leases.append(hold)
        group = [p for p in group if p.result.skipped is None]
    wanted: dict[str, list[int]] = {}  # reason -> ids
    for p in group:
        if p.result.plan.delete:
            wanted.setdefault(p.reason, []).extend(c.id for c in p.result.plan.delete)
    try:
        intended = pruning.mark_pruning(store, wanted, leases) if wanted else set()
    except Fenced as exc:
        for p in group:
            p.result.skipped = f"fenced: {exc}; another daemon holds it now"
            log.warning("%s: not pruned: %s", p.run.name, p.result.skipped)
        return
    batches: list[_Batch] = []
    untouched: list[tuple[str, str]] = []
    for p in group:
        if p.result.plan.delete:
            ckpts = [c for c in p.result.plan.delete if c.id in intended]
            batches.append(_Batch(ckpts, p.run.path, p.run.watch_path, p.reason, p.result))
        elif p.run.present:
            # A live TF2 CheckpointManager rewrites the state file from its own list at every
            # save, putting back entries ckptd pruned: repair it on every pass (cheap: a read
            # and a compare; it writes only on change).
            untouched.append((p.run.path, p.run.watch_path))
    _finish(store, batches, repair=untouched)


def _finish_interrupted(store: Store, held: dict[int, PruneResult]) -> None:
    """Finish what an earlier prune of these claimed runs left in ``pruning`` (its process died;
    its claim expired): those deletions count in the runs' results."""
    if not held:
        return
    batches = _resumed_batches(pruning.interrupted(store, held), held)
    if batches:
        _finish(store, batches)
        for b in batches:
            log.info("finished %d interrupted deletion(s) in %s", len(b.ckpts), b.run_dir)


def _resumed_batches(
    stuck: list[pruning.Interrupted], results: dict[int, PruneResult] | None = None
) -> list[_Batch]:
    """Each checkpoint keeps the reason its own intent recorded."""
    batches = []
    for run_id, path, watch_path, ckpts in stuck:
        if not ckpts:
            continue
        reasons = {c.id: (c.reason or "pruned") + RESUMED for c in ckpts}
        result = (results or {}).get(run_id) or PruneResult(
            os.path.basename(path), Plan({}, ()), []
        )
        batches.append(_Batch(ckpts, path, watch_path, reasons[ckpts[0].id], result, reasons))
    return batches


def resume(store: Store) -> int:
    """Finish deletions a crash interrupted (rows left in ``pruning``) and repair the state files
    of runs with pruned checkpoints; the number of deletions resumed. Runs another live process
    is pruning are left to it."""
    stuck = pruning.interrupted(store)
    repair = pruning.runs_with_pruned(store)
    wanted = {i.run_id for i in stuck} | {run_id for run_id, _path, _root in repair}
    held = claims.claim_many(store, wanted, claims.PRUNE) if wanted else set()
    try:
        for run_id in sorted(wanted - held):
            log.info("run %d is being pruned by another process; left to it", run_id)
        # Read again under the claims: a prune in flight when first read may have finished since.
        stuck = pruning.interrupted(store, held)
        batches = _resumed_batches(stuck)
        busy_or_done = {i.path for i in stuck}
        again = [(path, root) for run_id, path, root in repair if run_id in held]
        _finish(store, batches, repair=sorted(r for r in again if r[0] not in busy_or_done))
    finally:
        if held:
            claims.release_many(store, held, claims.PRUNE)
    for b in batches:
        log.info("resumed pruning of %d checkpoint(s) in %s", len(b.result.pruned), b.run_dir)
    return sum(len(i.checkpoints) for i in stuck)


def _finish(store: Store, batches: list[_Batch], repair: Sequence[tuple[str, str]] = ()) -> None:
    """Phases 2 and 3 for checkpoints already in ``pruning``: each run directory's deletions and
    then its state file, directories in parallel (unlink and fsync wait on the disk, not on
    Python), then one commit of every result. The ``repair`` runs ((run dir, watch root)) get
    their state files rewritten too."""
    by_dir: dict[str, list[_Batch]] = {}
    for b in batches:
        by_dir.setdefault(b.run_dir, []).append(b)
    jobs = [(path, group[0].root, group) for path, group in by_dir.items()]
    jobs += [(path, root, []) for path, root in dict.fromkeys(repair) if path not in by_dir]

    def clean(job: tuple[str, str, list[_Batch]]) -> list[_Outcome]:
        path, root, group = job
        outcomes: list[_Outcome] = []
        removed: set[str] = set()
        for b in group:  # one directory descriptor per batch
            removals = fsops.remove_groups(root, path, [c.files for c in b.ckpts])
            pairs = list(zip(b.ckpts, removals, strict=True))
            outcomes.append((b, pairs))
            removed.update(c.prefix for c, r in pairs if r.ok)
        # The state file is rewritten when something went (and always for a run to repair).
        if removed or not group:
            newest = lambda: pruning.newest_complete(store, path)  # noqa: E731 - rarely called
            statefile.drop_entries(path, root, removed, newest)
        return outcomes

    if len(jobs) <= 1:
        done = [clean(job) for job in jobs]
    else:
        # Every directory is cleaned even if another's job raised (map would cancel the rest).
        with ThreadPoolExecutor(min(DIRECTORY_THREADS, len(jobs))) as pool:
            futures = [pool.submit(clean, job) for job in jobs]
        done = [f.result() for f in futures]
    _commit_results(store, [o for outcomes in done for o in outcomes])  # phase 3


def _commit_results(store: Store, outcomes: list[_Outcome]) -> None:
    """Phase 3: ``pruned`` for each removed checkpoint, and one audit row per run listing them
    all (``ckptd events`` shows one event per checkpoint, see ``store.audit_reads.actions``)."""
    now = utcnow()
    done_ids: dict[str, list[int]] = {}
    entries: list[Entry] = []  # one "pruned" row per run, then one per failed checkpoint
    failures: list[Entry] = []
    restored: list[int] = []
    run_ids: set[int] = set()
    for b, pairs in outcomes:
        listed: list[dict[str, object]] = []
        for c, r in pairs:
            run_ids.add(c.run_id)
            if not r.ok:
                # Left recorded as present: some of its files could not be removed.
                restored.append(c.id)
                why = "; ".join(r.errors)
                failed = {"removed": r.removed}
                failures.append(Entry(now, "prune_failed", c.run_id, c.id, c.prefix, why, failed))
                continue
            reason = b.reason_of(c)
            done_ids.setdefault(reason, []).append(c.id)
            entry: dict[str, object] = {
                "checkpoint_id": c.id,
                "prefix": c.prefix,
                "step": c.step,
                "files": r.removed,
                "already_missing": r.missing,
                "bytes": r.bytes_freed,
            }
            if reason != b.reason:
                entry["reason"] = reason
            listed.append(entry)
        if listed:
            detail = {"checkpoints": listed}
            run_id = b.ckpts[0].run_id
            entries.append(Entry(now, "pruned", run_id, None, b.run_dir, b.reason, detail))
        b.result.pruned += [c.label for c, r in pairs if r.ok]
        b.result.failed += [f"{c.label}: {'; '.join(r.errors)}" for c, r in pairs if not r.ok]
        b.result.bytes_freed += sum(r.bytes_freed for _, r in pairs if r.ok)
    if entries or failures:
        pruning.record_results(store, done_ids, restored, entries + failures, run_ids, now)
