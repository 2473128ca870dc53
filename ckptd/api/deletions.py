"""A prune's phases 2 and 3, and their resumption after a crash.

Phase 2 removes the files of the checkpoints the intent (phase 1, ``api/prune``) marked
``pruning``, then rewrites each run's ``checkpoint`` state file; phase 3 commits ``pruned`` and
the audit rows. :func:`resume` finishes what a crash left in ``pruning``.

A daemon does all of it only for the runs whose lease it holds (``holds``): phase 3 checks each
lease in its own transaction, and a run lost meanwhile is left in ``pruning`` for its new holder,
who takes the prune claim over (``store.claims``) and finishes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from ckptd.api import objprune
from ckptd.core.model import Checkpoint, utcnow
from ckptd.core.retention import Plan
from ckptd.io import fsops, statefile
from ckptd.io.objstore import is_object_url
from ckptd.store import audit, claims, pruning
from ckptd.store.audit import Entry
from ckptd.store.handle import Store
from ckptd.store.leases import Hold

log = logging.getLogger("ckptd.api.prune")  # the name the journal has always shown

# Run directories cleaned at once (deletions, then the state file): unlink, lstat and the state
# file's fsyncs release the GIL. More threads than cores lose more to handing the GIL back and
# forth between syscalls than they gain (bench/prune.py).
DIRECTORY_THREADS = 2
RESUMED = " (resumed after restart)"
# Why a daemon left a run's deletions, or their record, to the run's new holder.
LAPSED = "its lease lapsed before the deletions: the run's new holder finishes its prune"
FENCED = (
    "its lease lapsed during the deletions: not recorded here, the run's new holder "
    "finishes its prune"
)

Holds = Callable[[int], Hold | None]  # a daemon's lease of a run (None: not held)


def lease_owner(holds: Holds | None, run_ids: Collection[int]) -> str | None:
    """The daemon whose leases ``holds`` gives (None: no daemon, or it holds none of these)."""
    if holds is not None:
        for run_id in run_ids:
            if (hold := holds(run_id)) is not None:
                return hold.owner
    return None


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
class Batch:
    """The checkpoints of one run to delete, where they live and why each goes."""

    ckpts: list[Checkpoint]
    run_dir: str
    root: str
    reason: str  # the run's reason; ``reasons`` names another for some checkpoint ids
    result: PruneResult
    reasons: dict[int, str] = field(default_factory=dict)

    def reason_of(self, ckpt: Checkpoint) -> str:
        return self.reasons.get(ckpt.id, self.reason)


Outcome = tuple[Batch, list[tuple[Checkpoint, fsops.Removal]]]


def finish_interrupted(
    store: Store, held: dict[int, PruneResult], holds: Holds | None = None
) -> None:
    """Finish what an earlier prune of these claimed runs left in ``pruning`` (its process died;
    its claim expired, or was taken over with the run's lease): those deletions count in the
    runs' results."""
    if not held:
        return
    batches = resumed_batches(pruning.interrupted(store, held), held)
    if batches:
        finish(store, batches, holds=holds)
        for b in batches:
            log.info("finished %d interrupted deletion(s) in %s", len(b.ckpts), b.run_dir)


def resumed_batches(
    stuck: list[pruning.Interrupted], results: dict[int, PruneResult] | None = None
) -> list[Batch]:
    """Each checkpoint keeps the reason its own intent recorded."""
    batches = []
    for run_id, path, watch_path, ckpts in stuck:
        if not ckpts:
            continue
        reasons = {c.id: (c.reason or "pruned") + RESUMED for c in ckpts}
        result = (results or {}).get(run_id) or PruneResult(
            os.path.basename(path), Plan({}, ()), []
        )
        batches.append(Batch(ckpts, path, watch_path, reasons[ckpts[0].id], result, reasons))
    return batches


def resume(store: Store, run_ids: Collection[int] | None = None, holds: Holds | None = None) -> int:
    """Finish deletions a crash interrupted (rows left in ``pruning``) and repair the state files
    of runs with pruned checkpoints (of ``run_ids`` only, when given); the number of deletions
    resumed. ``holds``: a daemon's leases, and then only the runs it holds, whose prune claims
    it takes over from another daemon (which lost their leases). Runs another live process
    is pruning are left to it."""
    if holds is not None and run_ids is None:
        raise ValueError("a daemon resumes the prunes of the runs it holds: name them")
    if holds is not None:
        run_ids = {r for r in run_ids or () if holds(r) is not None}
        if not run_ids:
            return 0
    stuck = pruning.interrupted(store, run_ids)
    repair = pruning.runs_with_pruned(store, run_ids)
    wanted = {i.run_id for i in stuck} | {run_id for run_id, _path, _root in repair}
    owner = lease_owner(holds, wanted)
    held = claims.claim_many(store, wanted, claims.PRUNE, lease_owner=owner) if wanted else set()
    try:
        for run_id in sorted(wanted - held):
            log.info("run %d is being pruned by another process; left to it", run_id)
        # Read again under the claims: a prune in flight when first read may have finished since.
        stuck = pruning.interrupted(store, held) if held else []
        batches = resumed_batches(stuck)
        busy_or_done = {i.path for i in stuck}
        again = [(path, root) for run_id, path, root in repair if run_id in held]
        again = sorted(r for r in again if r[0] not in busy_or_done)
        finish(store, batches, repair=again, holds=holds)
    finally:
        if held:
            claims.release_many(store, held, claims.PRUNE)
    for b in batches:
        log.info("resumed pruning of %d checkpoint(s) in %s", len(b.result.pruned), b.run_dir)
    return sum(len(i.checkpoints) for i in stuck)


def finish(
    store: Store,
    batches: list[Batch],
    repair: Sequence[tuple[str, str]] = (),
    holds: Holds | None = None,
) -> None:
    """Phases 2 and 3 for checkpoints already in ``pruning``: each run directory's deletions and
    then its state file, directories in parallel (unlink and fsync wait on the disk, not on
    Python), then one commit of every result (``holds``: under the daemon's leases). The
    ``repair`` runs ((run dir, watch root)) get their state files rewritten too."""
    # Named now: once a lease is lost, ``holds`` no longer says whose it was.
    owner = lease_owner(holds, [b.ckpts[0].run_id for b in batches if b.ckpts])
    by_dir: dict[str, list[Batch]] = {}
    for b in batches:
        by_dir.setdefault(b.run_dir, []).append(b)
    jobs = [(path, group[0].root, group) for path, group in by_dir.items()]
    jobs += [(path, root, []) for path, root in dict.fromkeys(repair) if path not in by_dir]

    def lapsed(b: Batch) -> bool:
        if holds is not None and b.ckpts and holds(b.ckpts[0].run_id) is None:
            # Its lease lapsed (by this daemon's clock, before the database gives the run to
            # another): the files are its new holder's to delete, and to record.
            b.result.skipped = LAPSED
            log.warning("%s: not pruned: %s", b.run_dir, LAPSED)
            return True
        return False

    def clean(job: tuple[str, str, list[Batch]]) -> list[Outcome]:
        path, root, group = job
        kept = [b for b in group if not lapsed(b)]
        if is_object_url(path):
            return objprune.clean(store, path, kept) if kept or not group else []
        outcomes: list[Outcome] = []
        removed: set[str] = set()
        for b in kept:  # one directory descriptor per batch
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
    _commit_results(store, [o for outcomes in done for o in outcomes], holds, owner)  # phase 3


def _commit_results(
    store: Store, outcomes: list[Outcome], holds: Holds | None, owner: str | None
) -> None:
    """Phase 3: ``pruned`` for each removed checkpoint, and one audit row per run listing them
    all (``ckptd events`` shows one event per checkpoint, see ``store.audit_reads.actions``).
    Under ``holds``, nothing is recorded for a run whose lease this daemon lost meanwhile."""
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
    fenced: set[int] = set()
    if entries or failures:
        leases = None
        if holds is not None:
            leases = [h for h in map(holds, sorted(run_ids)) if h is not None]
        fenced = pruning.record_results(
            store, done_ids, restored, entries + failures, run_ids, now, leases
        )
    for b, pairs in outcomes:
        if b.ckpts and b.ckpts[0].run_id in fenced:
            b.result.skipped = FENCED
            continue
        b.result.pruned += [c.label for c, r in pairs if r.ok]
        b.result.failed += [f"{c.label}: {'; '.join(r.errors)}" for c, r in pairs if not r.ok]
        b.result.bytes_freed += sum(r.bytes_freed for _, r in pairs if r.ok)
    if fenced:
        _say_fenced(store, fenced, owner or store.holder, now)


def _say_fenced(store: Store, run_ids: set[int], owner: str, now: datetime) -> None:
    for run_id in sorted(run_ids):
        log.warning("fenced: recording the prune of run %d refused: %s", run_id, FENCED)
    why = f"prune results refused: daemon {owner} no longer holds the run's lease"
    audit.write(store, [Entry(now, "fenced", r, None, owner, why) for r in sorted(run_ids)])
