"""Pruning: plan each run by its retention rules, then delete what the plan says, and nothing else.

Two-phase and resumable: phase 1 commits ``pruning`` for every checkpoint to delete (the intent);
phase 2 removes the files recorded for each through :mod:`ckptd.io.fsops`; phase 3 commits
``pruned`` with the reason (phases 2 and 3: ``api/deletions``). A crash anywhere leaves rows in
``pruning``, which :func:`resume` (or the next prune of that run) finishes. Then the run's
``checkpoint`` state file is rewritten so that ``tf.train.latest_checkpoint`` and a restarted
``CheckpointManager`` see only what exists.

Each run's prune is claimed (``store.claims``, job ``prune``) for the whole of its work, so the
daemon and ``ckptd prune`` never prune the same run at once: a run claimed by another process is
skipped, and says by whom. Dry runs only read, and take no claim. A daemon prunes only the runs
whose lease it holds (``holds``), under that lease at phases 1 and 3; it takes over the prune
claim of another daemon that lost the lease (cut off by a database outage, say).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ckptd.api import objprune, objstores
from ckptd.api.deletions import (
    Batch,
    Holds,
    PruneResult,
    finish,
    finish_interrupted,
    lease_owner,
    resume,
)
from ckptd.config import WatchConfig
from ckptd.core import retention
from ckptd.core.model import Run, iso, utcnow
from ckptd.core.retention import Plan
from ckptd.io import fsops, statefile
from ckptd.io.objstore import StoreError, is_object_url
from ckptd.store import audit, claims, pruning
from ckptd.store.audit import Entry
from ckptd.store.handle import Store
from ckptd.store.leases import Fenced, Hold

__all__ = ["PruneResult", "prune", "resume", "rules_for", "runs"]  # resume: api.deletions

log = logging.getLogger(__name__)

LEFTOVERS_WHY = "TensorFlow's temporary files of recorded checkpoints, untouched for a day"


def rules_for(watch: WatchConfig) -> tuple[retention.Rule, ...] | None:
    """The watch's retention rules; None without a ``[watch.retain]`` section (never pruned)."""
    return watch.retain.rules(watch.best) if watch.retain is not None else None


def runs(store: Store, name: str | None = None, watch_path: str | None = None) -> list[Run]:
    """The run named ``name`` (``NotFound`` if none), or those present under ``watch_path``, or
    every run."""
    return pruning.runs(store, name, watch_path)


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
    objstores.configure(w for _, w in items)
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
    owner = lease_owner(holds, acting)
    held = claims.claim_many(store, acting, claims.PRUNE, lease_owner=owner) if acting else set()
    try:
        _skip_busy(store, [planned[rid] for rid in acting if rid not in held])
        todo = [p for p in planned.values() if p.result.skipped is None]
        finish_interrupted(store, {rid: planned[rid].result for rid in held}, holds)
        _plan(store, todo, rules)
        _find_leftovers(store, todo)
        todo = [p for p in todo if not p.result.dry_run and p.result.skipped is None]
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
        try:
            trainer = _trainer_state(p.run) if history and p.run.present else retention.NO_STATE
        except StoreError as exc:  # what TF resumes from is unknown: nothing may go
            p.result.skipped = f"its state file could not be read: {exc}"
            log.warning("%s: not pruned: %s", p.run.name, p.result.skipped)
            continue
        p.result.plan = retention.plan(history, rules[p.run.id], now, trainer)


def _trainer_state(run: Run) -> retention.TrainerState:
    if is_object_url(run.path):
        return objprune.trainer_state(run.path)
    return statefile.trainer_state(run.path, run.watch_path)


def _find_leftovers(store: Store, todo: list[_Planned]) -> None:
    """Plan the removal of TensorFlow's stale temporary names in each run directory: only those
    of a checkpoint prefix recorded for that run (a directory scan per run; the database is
    asked only about the rare names that look like TF's)."""
    # (An object store has no temporary names: TensorFlow writes final names there.)
    local = [p for p in todo if not is_object_url(p.run.path)]
    found = {p.run.id: fsops.find_leftovers(p.run.watch_path, p.run.path) for p in local}
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
    batches: list[Batch] = []
    untouched: list[tuple[str, str]] = []
    for p in group:
        if p.result.plan.delete:
            ckpts = [c for c in p.result.plan.delete if c.id in intended]
            batches.append(Batch(ckpts, p.run.path, p.run.watch_path, p.reason, p.result))
        elif p.run.present:
            # A live TF2 CheckpointManager rewrites the state file from its own list at every
            # save, putting back entries ckptd pruned: repair it on every pass (cheap: a read
            # and a compare; it writes only on change).
            untouched.append((p.run.path, p.run.watch_path))
    finish(store, batches, repair=untouched, holds=holds)
