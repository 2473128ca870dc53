"""The daemon: its parts and the wiring between them, and the recording side it runs itself
(migrate and claim the database, backfill, reconcile dirty runs, rescan).

Threads: watchdog observers (enqueue dirty runs, ``dirty.py``), one reconcile thread (the single
DB writer for discovery), APScheduler's pool (rescan, heartbeat, evaluate/freeze/prune:
``jobs.py``), and a start-up thread for the migration and backfill. The main thread never touches
the database or a run: it handles signals, sd_notify and the watchdog (``lifecycle.py``), so it
can always tell what is stuck and stop within a bound (``health.py``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ckptd import __version__
from ckptd.api import prune as api_prune
from ckptd.api import steps
from ckptd.api.evaluate import Evaluator
from ckptd.api.freeze import Freezer
from ckptd.config import Config, WatchConfig
from ckptd.core.errors import StoreError
from ckptd.core.model import utcnow
from ckptd.core.recording import Observation
from ckptd.daemon import runs as runs_mod
from ckptd.daemon.dbfile import DatabaseFile, checkpointing_wal
from ckptd.daemon.dirty import DirtyRuns, RunKey, run_key
from ckptd.daemon.evaluate import EvaluationLoop
from ckptd.daemon.health import DatabaseHealth, Progress, Stuck, stall_bound
from ckptd.daemon.jobs import Jobs
from ckptd.daemon.leases import LeaseKeeper
from ckptd.daemon.lifecycle import Supervisor
from ckptd.daemon.objwatch import ObjectWatches, is_object_watch
from ckptd.daemon.reconcile import Outcome, Reconciler
from ckptd.daemon.requests import RequestServer
from ckptd.daemon.runs import RunSpec
from ckptd.daemon.scheduler import Scheduler
from ckptd.daemon.watch import Watcher
from ckptd.io.observe import (
    PARALLEL_MIN_RUNS,
    ObservePool,
    Request,
    default_workers,
    observe,
    stop_fork_server,
)
from ckptd.store import audit, daemons, migrate
from ckptd.store import runs as store_runs
from ckptd.store.db import DatabaseUnreachable
from ckptd.store.handle import Store
from ckptd.worker.client import WorkerClient

__all__ = ["DEEP_RESCAN_EVERY", "PARALLEL_MIN_RUNS", "Daemon", "Health"]

log = logging.getLogger(__name__)

BACKFILL_WAL_CHECKPOINT_EVERY = 0.1  # seconds; while the start-up backfill writes
# Every this many periodic rescans, one re-lists every run even if its fingerprint holds.
DEEP_RESCAN_EVERY = 10


@dataclass
class Health:
    started: float = field(default_factory=time.time)
    last_reconcile: float = 0.0
    reconcile_errors: int = 0
    db_ok: bool = True  # the last reconcile met no database error (an outage aside)


class Daemon:
    """One daemon's parts and shared state; its scheduled work is ``jobs``, its life in the main
    thread is ``supervisor``."""

    def __init__(self, config: Config, *, prefetched: ObservePool | None = None) -> None:
        # Object store watches are polled (objwatch.py), local ones watched with inotify and
        # scanned (``config``); evaluation, export and prune act on every watch (``acting``).
        self.object_watches = tuple(w for w in config.watches if is_object_watch(w))
        self.acting = config
        config = runs_mod.local_only(config)
        self.config = config
        self._prefetched = prefetched  # the backfill's first looks, begun by `ckptd run`
        # WAL checkpoints (an fsync) run in their own job, never inside a recording commit.
        self.store = Store.open(
            config.daemon.database, wal_autocheckpoint=False, recreate=False, daemon=True
        )
        self.dirty = DirtyRuns()
        self.health = Health()
        self.db = DatabaseHealth()
        self.progress = Progress(stall_bound(config.daemon.heartbeat_interval))
        # Which runs this daemon acts on among those sharing the database (renewed in a thread).
        self.leases = LeaseKeeper(
            self.store, config.daemon.name, config.daemon.lease_ttl.total_seconds()
        )
        self.reconciler = Reconciler(self.store, leases=self.leases)
        self.step_mismatches = steps.Reporter(self.store)
        # One warm TensorFlow worker, shared by evaluation and export (each one is a big process).
        self.worker = WorkerClient()
        self.evaluator = Evaluator(self.store, self.acting, self.worker)
        self.freezer = Freezer(self.store, self.worker, self.leases)
        # What `ckptd evaluate`/`freeze` hand over while this runs, done in the evaluation thread.
        self.requests = RequestServer(
            self.store, config.daemon.database, self.evaluator, self.freezer, runs=self.leases.held
        )
        self.eval_loop = EvaluationLoop(
            self.evaluator,
            self.requests,
            runs=self.leases.held,
            local=config.daemon.evaluate_on == "local",  # else `ckptd worker`s do it
        )
        self.eval_thread: threading.Thread | None = None
        self.watcher = Watcher(config.watches, self.on_path, on_armed=self.on_armed)
        self.objwatch = ObjectWatches(self.object_watches, self.record_with, self.present_runs)
        self.scheduler = Scheduler(self.progress)
        self.jobs = Jobs(self)
        self.supervisor = Supervisor(self)
        self.stop_event = threading.Event()
        self.daemon_id: int | None = None
        self.reload_error: str | None = None
        self.reconcile_thread: threading.Thread | None = None
        self._known_runs: set[RunKey] = set()
        self._rescans = 0
        self._reported_runs: set[str] = set()
        self.db_file = DatabaseFile(config.daemon.database)  # noticed if replaced

    # ------------------------------------------------------------ start-up

    def prepare(self) -> None:
        """Upgrade the schema (or refuse with a message) and claim the database for this daemon."""
        with self.progress.busy("migrating the database"):
            try:
                before, after = migrate.ensure_store_schema(self.store)
            except Exception as exc:
                raise SystemExit(
                    f"ckptd: cannot migrate the database {self.config.daemon.database}: "
                    f"{exc}. Run `ckptd db upgrade` to see the details."
                ) from exc
        if before != after:
            log.info("database upgraded from %s to %s", before or "empty", after)
        self.db_file.remember()
        with self.progress.busy("claiming the database"):
            try:
                self.daemon_id = daemons.claim(
                    self.store,
                    name=self.config.daemon.name,
                    version=__version__,
                    config=self.config.source,
                    status={
                        "state": "starting",
                        "heartbeat_interval": self.config.daemon.heartbeat_interval.total_seconds(),
                        "evaluate_on": self.config.daemon.evaluate_on,
                        # The shape of WatchSet.describe(), before any observer exists.
                        "watches": [
                            {"path": str(w.path), "observer": "starting", "alive": False}
                            for w in self.config.watches
                        ],
                    },
                )
            except daemons.AlreadyRunning as exc:
                raise SystemExit(f"ckptd: refusing to start: {exc}") from None
            except StoreError as exc:
                raise SystemExit(f"ckptd: cannot register this daemon: {exc}") from None
            self.leases.adopt()
        self.recover(set(self.leases.held()))  # what this daemon's previous run left
        self.leases.on_taken = self.recover  # and each run's previous holder, as it is taken

    def recover(self, run_ids: set[int]) -> None:
        """Finish what the last holder of these runs left half done (never another's runs)."""
        with self.progress.busy("recovering interrupted evaluations, deletions and exports"):
            if self.evaluator.recover():
                log.info("re-queued evaluations of processes that have exited")
            if resumed := api_prune.resume(self.store, run_ids, holds=self.leases.current):
                log.info("finished %d deletion(s) interrupted by the last stop", resumed)
            if self.freezer.recover(self.acting.watches, run_ids):
                log.info("exports interrupted by the last stop will be redone")

    def backfill(self) -> int:
        """The start-up scan: what the database knows first, then every run, in parallel."""
        prefetched, self._prefetched = self._prefetched, None
        try:
            with checkpointing_wal(self.checkpoint_wal, every=BACKFILL_WAL_CHECKPOINT_EVERY):
                return self.full_reconcile(workers=default_workers(), prefetched=prefetched)
        finally:
            if prefetched is not None:
                prefetched.close()  # (a no-op once the backfill has used it)
            # started by `ckptd run` even if there were too few runs to use it
            stop_fork_server(wait=False)

    def all_runs(self) -> list[RunSpec]:
        specs = []
        for i, w in enumerate(self.config.watches):
            specs += runs_mod.discover(i, w)
        return specs

    def full_reconcile(
        self, workers: int = 1, *, quick: bool = False, prefetched: ObservePool | None = None
    ) -> int:
        """Rescan every run (backfill at start, then every ``rescan_interval``).

        ``workers`` > 1 (the start-up backfill): runs are observed — listed, .index files and
        event files read — in that many processes while this one writes what they saw.
        ``quick``: skip runs whose directory and event-file fingerprint has not changed since
        they were last observed (a few stats per run instead of listing and stat'ing every file).
        ``prefetched``: observations begun before the database was read (``prefetch.py``).
        """
        specs = self.all_runs()
        # Runs recorded before but missing now: reconcile them too, so their checkpoints go "gone".
        # (A run whose watch was removed from the config is no longer ours to reconcile.)
        current = {run_key(s) for s in specs}
        watches = {str(w.path): (i, w) for i, w in enumerate(self.config.watches)}
        for watch_path, name in self._known_runs - current:
            if watch_path in watches:
                i, w = watches[watch_path]
                root = w.local_path
                specs.append(RunSpec(i, name, root / name if w.runs else root, w))
        if quick:
            specs = self.reconciler.changed(specs)
        self._report_unsupported_runs()
        observations: Iterable[Observation | None] = itertools.repeat(None)
        self.reconciler.register(specs)  # every run's state in a few queries, not a few each
        if workers > 1 and len(specs) >= PARALLEL_MIN_RUNS:
            observations = self.reconciler.observe_all(specs, workers, prefetched=prefetched)
        count = 0
        try:
            for spec, obs in zip(specs, observations, strict=False):
                if self.stop_event.is_set():
                    return count  # stopping: the rest is reconciled at the next start
                with self.progress.busy(f"reconcile of {spec.path}"):
                    count += len(self._reconcile(spec, obs).recorded)
        finally:
            close = getattr(observations, "close", None)
            if close is not None:
                close()  # ends the backfill's worker pool when the loop stopped early
        self._known_runs = current
        self._report_step_mismatches()
        return count

    def _report_step_mismatches(self) -> None:
        """Runs whose logged steps match no checkpoint: one event and one warning each."""
        try:
            for m in self.step_mismatches.report():
                log.warning("run %s: %s", m.run, m.message)
        except Exception:  # a report is retried after the next scan; never breaks recording
            log.exception("checking the runs' steps failed")

    def _report_unsupported_runs(self) -> None:
        """Run directories whose names are not UTF-8: one audit entry each, then silence."""
        new = sorted(runs_mod.UNSUPPORTED - self._reported_runs)
        if not new:
            return
        why = (
            "directory name is not valid UTF-8; ckptd does not watch it as a run (rename it to "
            "have its checkpoints recorded)"
        )
        now = utcnow()
        audit.write(
            self.store, [audit.Entry(now, "unsupported_name", subject=s, reason=why) for s in new]
        )
        self._reported_runs |= set(new)

    def present_runs(self, watch_path: str) -> list[str]:
        """Names of the runs of a watch recorded present (what an object store poller checks
        first: a run deleted while no daemon watched)."""
        return [r.name for r in store_runs.present_runs(self.store, watch_path)]

    def record_with(self, spec: RunSpec, observer: Callable[[Request], Observation]) -> Outcome:
        """Record ``spec`` as ``observer`` sees it (an object store run, from its listing)."""
        with self.progress.busy(f"reconcile of {spec.url or spec.path}"):
            return self._reconcile(spec, observer=observer)

    def _reconcile(
        self,
        spec: RunSpec,
        observation: Observation | None = None,
        observer: Callable[[Request], Observation] = observe,
    ) -> Outcome:
        try:
            outcome = self.reconciler.reconcile(spec, observation, observer)
            self.health.last_reconcile = time.time()
            self.health.db_ok = True
        except Exception as exc:
            self.health.reconcile_errors += 1
            if isinstance(exc, DatabaseUnreachable):  # said once; caught up on when it ends
                self.db.failed(exc)
                return Outcome(spec.name)
            self.health.db_ok = "database" not in str(exc)
            log.exception("reconciling %s failed; the next rescan retries", spec.path)
            return Outcome(spec.name)
        if outcome.new_complete_ids:
            try:
                self.eval_loop.enqueue(outcome.new_complete_ids, new=True)
            except Exception:  # evaluation is queued again by its own job; never breaks recording
                log.exception("queueing evaluations of %s failed", spec.path)
        return outcome

    # ------------------------------------------------------------ events

    def on_path(self, watch: WatchConfig, path: str) -> None:
        # By identity: an event from an observer of the config before a reload is dropped.
        for i, w in enumerate(self.config.watches):
            if w is watch:
                spec = runs_mod.run_of(i, w, path)
                if spec is not None:
                    self.dirty.add(spec)
                return

    def on_armed(self, watch: WatchConfig) -> None:
        """A watch path observed again (it appeared, or was recreated): scan its runs now, as
        anything written before its observer started was seen by no one."""
        for i, w in enumerate(self.config.watches):
            if w is watch:
                for spec in runs_mod.discover(i, w):
                    self.dirty.add(spec)
                return

    def reconcile_loop(self) -> None:
        debounce = self.config.daemon.debounce.total_seconds()
        while not self.stop_event.is_set():
            for spec in self.dirty.take(timeout=0.5, debounce=debounce):
                if self.stop_event.is_set():
                    break
                key = run_key(spec)
                with self.progress.busy(f"reconcile of {spec.path}"):
                    if key not in self._known_runs and not runs_mod.is_present(spec):
                        continue  # an event under a run directory that does not exist (anymore)
                    self._known_runs.add(key)
                    self._reconcile(spec)

    # ------------------------------------------------------------ periodic jobs

    def checkpoint_wal(self) -> None:
        """Fold the WAL into the database here, off the recording path (see make_engine)."""
        result = self.store.checkpoint_wal()
        if result is not None and result[0]:
            _busy, pages, done = result
            log.debug("WAL checkpoint held back by a reader: %d of %d pages copied", done, pages)

    def rescan(self) -> None:
        """The periodic safety net for missed events. Most passes are quick (unchanged runs are
        skipped by fingerprint); every DEEP_RESCAN_EVERY-th re-lists and re-stats everything,
        which also catches a checkpoint file rewritten in place without any event."""
        for msg in self.watcher.check():
            log.info(msg)
        self._rescans += 1
        self.full_reconcile(quick=self._rescans % DEEP_RESCAN_EVERY != 0)

    def working(self, stuck: list[Stuck] | None = None) -> bool:
        """Threads alive *and making progress*: nothing stuck for longer than its bound (what
        the systemd watchdog is pinged for: a restart would not bring a database back)."""
        if stuck is None:
            stuck = self.progress.stuck()
        alive = self.reconcile_thread is not None and self.reconcile_thread.is_alive()
        threads = alive and self.watcher.healthy() and self.scheduler.running()
        threads = threads and self.objwatch.healthy()
        return threads and not stuck and self.health.db_ok

    def healthy(self, stuck: list[Stuck] | None = None) -> bool:
        """Working, and the database answers."""
        return self.working(stuck) and self.db.up

    # ------------------------------------------------------------ run

    def run_once(self) -> int:
        """One reconcile, then the due work in lifecycle order: evaluate, export, prune."""
        self.prepare()
        self.leases.start()
        n = self.backfill()
        n += self.objwatch.poll_once()
        self.evaluator.enqueue()
        if self.eval_loop.local:
            self.evaluator.run_pending(run_ids=self.leases.held())
        for w in self.acting.watches:
            if w.freeze is not None:
                self.jobs.freeze(w)
            if w.retain is not None:
                self.jobs.prune(w)
        self.worker.close()
        self.mark_stopped()
        return n

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (reloading on SIGHUP); the exit status (``lifecycle.py``)."""
        return self.supervisor.run()

    def shutdown(self) -> bool:
        """Stop every thread and close the database; False when some thread is stuck."""
        return self.supervisor.shutdown()

    def mark_stopped(self) -> None:
        """Release the leases (the others take the runs over now); mark the daemon stopped."""
        if self.daemon_id is None:
            return
        self.leases.stop()
        daemons.mark_stopped(self.store, self.daemon_id)
