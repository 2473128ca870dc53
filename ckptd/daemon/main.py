"""The daemon's lifecycle: migrate, backfill, watch, schedule, report health, stop cleanly.

Threads: watchdog observers (enqueue dirty runs), one reconcile thread (the single DB writer for
discovery), APScheduler's pool (rescan, heartbeat, later evaluate/freeze/prune). The main thread
only handles signals and sd_notify.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select, update

from ckptd import __version__
from ckptd.config import Config, ConfigError, load_config, warn_missing_paths
from ckptd.daemon import metrics
from ckptd.daemon import runs as runs_mod
from ckptd.daemon.evaluate import Evaluator
from ckptd.daemon.freeze import Freezer
from ckptd.daemon.notify import notify, watchdog_interval
from ckptd.daemon.observe import (
    PARALLEL_MIN_RUNS,
    Observation,
    ObservePool,
    default_workers,
    stop_fork_server,
)
from ckptd.daemon.prune import Pruner
from ckptd.daemon.reconcile import Reconciler
from ckptd.daemon.runs import RunSpec
from ckptd.daemon.scheduler import Scheduler
from ckptd.daemon.watch import Watcher
from ckptd.model import utcnow
from ckptd.store import migrate
from ckptd.store.db import checkpoint_wal, insert_id, make_engine, session_scope
from ckptd.store.tables import ActionRow, CheckpointRow, DaemonRow
from ckptd.worker.client import WorkerClient

log = logging.getLogger(__name__)

WAL_CHECKPOINT_EVERY = timedelta(seconds=1)
BACKFILL_WAL_CHECKPOINT_EVERY = 0.1  # seconds; while the start-up backfill writes
# Every this many periodic rescans, one re-lists every run even if its fingerprint holds.
DEEP_RESCAN_EVERY = 10


class DirtyRuns:
    """A set of runs to rescan, with a short debounce so a burst of events costs one scan."""

    def __init__(self) -> None:
        self._pending: dict[tuple[int, str], RunSpec] = {}
        self._cond = threading.Condition()
        self.first_seen: dict[tuple[int, str], float] = {}

    def add(self, spec: RunSpec) -> None:
        key = (spec.watch_index, spec.name)
        with self._cond:
            if key not in self._pending:
                self._pending[key] = spec
                self.first_seen.setdefault(key, time.monotonic())
                self._cond.notify()

    def take(self, timeout: float, debounce: float) -> list[RunSpec]:
        with self._cond:
            if not self._pending and not self._cond.wait(timeout):
                return []
        if debounce > 0:
            time.sleep(debounce)  # let the rest of a save's renames land in the same scan
        with self._cond:
            out = list(self._pending.values())
            self._pending.clear()
            self.first_seen.clear()
            return out

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)


@dataclass
class Health:
    started: float = field(default_factory=time.time)
    last_reconcile: float = 0.0
    reconcile_errors: int = 0
    db_ok: bool = True


class Daemon:
    def __init__(self, config: Config, *, prefetched: ObservePool | None = None) -> None:
        self.config = config
        self._prefetched = prefetched  # the backfill's first looks, begun by `ckptd run`
        # WAL checkpoints (an fsync) run in their own job, never inside a recording commit.
        self.engine = make_engine(config.daemon.database, wal_autocheckpoint=False)
        self.dirty = DirtyRuns()
        self.health = Health()
        self.reconciler = Reconciler(self.engine, on_recorded=self._on_recorded)
        self.pruner = Pruner(self.engine, on_states=self.reconciler.note_states)
        # One warm TensorFlow worker, shared by evaluation and export (2 cores, ~500 MB each).
        self.worker = WorkerClient()
        self.evaluator = Evaluator(self.engine, config, self.worker)
        self.freezer = Freezer(self.engine, self.worker)
        self._eval_thread: threading.Thread | None = None
        self.watcher = Watcher(config.watches, self._on_path)
        self.scheduler = Scheduler()
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.daemon_id: int | None = None
        self.reload_error: str | None = None
        self._thread: threading.Thread | None = None
        self._known_runs: set[tuple[int, str]] = set()
        self._rescans = 0
        self._reported_runs: set[str] = set()

    # ------------------------------------------------------------ start-up

    def prepare(self) -> None:
        """Upgrade the schema (or refuse with a message) and register this daemon."""
        try:
            before, after = migrate.ensure_schema(self.engine)
        except Exception as exc:
            raise SystemExit(
                f"ckptd: cannot migrate the database {self.config.daemon.database}: "
                f"{exc}. Run `ckptd db upgrade` to see the details."
            ) from exc
        if before != after:
            log.info("database upgraded from %s to %s", before or "empty", after)
        with session_scope(self.engine) as s:
            now = utcnow()
            self.daemon_id = insert_id(
                s,
                insert(DaemonRow).values(
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    version=__version__,
                    config=self.config.source,
                    started_at=now,
                    heartbeat_at=now,
                    status={
                        "state": "starting",
                        "heartbeat_interval": self.config.daemon.heartbeat_interval.total_seconds(),
                        "watches": [str(w.path) for w in self.config.watches],
                    },
                ),
            )

        resumed = self.pruner.resume()
        if resumed:
            log.info("finished %d deletion(s) interrupted by the last stop", resumed)
        if self.evaluator.recover():
            log.info("re-queued evaluations interrupted by the last stop")
        if self.freezer.recover(self.config.watches):
            log.info("exports interrupted by the last stop will be redone")

    def backfill(self) -> int:
        """The start-up scan: what the database knows first, then every run, in parallel."""
        self.reconciler.preload()
        prefetched, self._prefetched = self._prefetched, None
        try:
            with self._checkpointing_wal(every=BACKFILL_WAL_CHECKPOINT_EVERY):
                return self.full_reconcile(workers=default_workers(), prefetched=prefetched)
        finally:
            if prefetched is not None:
                prefetched.close()  # (a no-op once the backfill has used it)
            # started by `ckptd run` even if there were too few runs to use it
            stop_fork_server(wait=False)

    @contextmanager
    def _checkpointing_wal(self, every: float) -> Iterator[None]:
        """Checkpoint the WAL from a thread while the body writes (a backfill writes ~10 MB
        per 10,000 checkpoints, before the scheduler's job runs): copying pages into the
        database then overlaps the writing instead of following it at the end."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(every):
                try:
                    self.checkpoint_wal()
                except Exception:  # a failed checkpoint is retried next time; never fatal
                    log.debug("WAL checkpoint failed", exc_info=True)

        thread = threading.Thread(target=loop, name="wal-checkpoint", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

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
        current = {(s.watch_index, s.name) for s in specs}
        for key in self._known_runs - current:
            i, name = key
            w = self.config.watches[i]
            specs.append(RunSpec(i, name, w.path / name if w.runs else w.path, w))
        if quick:
            specs = [s for s in specs if not self.reconciler.unchanged(s)]
        self._report_unsupported_runs()
        observations: Iterable[Observation | None] = itertools.repeat(None)
        if workers > 1 and len(specs) >= PARALLEL_MIN_RUNS:
            self.reconciler.register(specs)
            observations = self.reconciler.observe_all(specs, workers, prefetched=prefetched)
        count = 0
        for spec, obs in zip(specs, observations, strict=False):
            count += len(self._reconcile(spec, obs).recorded)
        self._known_runs = current
        return count

    def _report_unsupported_runs(self) -> None:
        """Run directories whose names are not UTF-8: one audit entry each, then silence."""
        new = sorted(runs_mod.UNSUPPORTED - self._reported_runs)
        if not new:
            return
        with session_scope(self.engine) as s:
            for shown in new:
                s.execute(
                    insert(ActionRow).values(
                        at=utcnow(),
                        kind="unsupported_name",
                        subject=shown,
                        reason="directory name is not valid UTF-8; ckptd does not watch it as a "
                        "run (rename it to have its checkpoints recorded)",
                        detail={},
                    )
                )
        self._reported_runs |= set(new)

    def _reconcile(self, spec: RunSpec, observation: Observation | None = None) -> Any:
        try:
            outcome = self.reconciler.reconcile(spec, observation)
            self.health.last_reconcile = time.time()
            self.health.db_ok = True
            return outcome
        except Exception as exc:
            self.health.reconcile_errors += 1
            self.health.db_ok = "database" not in str(exc)
            log.exception("reconciling %s failed; the next rescan retries", spec.path)
            from ckptd.daemon.reconcile import Outcome

            return Outcome(spec.name)

    # ------------------------------------------------------------ events

    def _on_path(self, index: int, path: str) -> None:
        spec = runs_mod.run_of(index, self.config.watches[index], path)
        if spec is not None:
            self.dirty.add(spec)

    def _reconcile_loop(self) -> None:
        debounce = self.config.daemon.debounce.total_seconds()
        while not self.stop_event.is_set():
            for spec in self.dirty.take(timeout=0.5, debounce=debounce):
                if self.stop_event.is_set():
                    break
                key = (spec.watch_index, spec.name)
                if key not in self._known_runs and not runs_mod.is_present(spec):
                    continue  # an event under a run directory that does not exist (anymore)
                self._known_runs.add(key)
                self._reconcile(spec)

    # ------------------------------------------------------------ periodic jobs

    def counts(self) -> dict[str, int]:
        with session_scope(self.engine) as s:
            rows = s.execute(
                select(CheckpointRow.state, func.count()).group_by(CheckpointRow.state)
            )
            return {state: n for state, n in rows}

    def checkpoint_wal(self) -> None:
        """Fold the WAL into the database here, off the recording path (see make_engine)."""
        result = checkpoint_wal(self.engine)
        if result is not None and result[0]:
            _busy, pages, done = result
            log.debug("WAL checkpoint held back by a reader: %d of %d pages copied", done, pages)

    def heartbeat(self) -> None:
        counts = self.counts()
        metrics.checkpoints(counts)
        status = {
            "state": "running",
            "heartbeat_interval": self.config.daemon.heartbeat_interval.total_seconds(),
            "watches": self.watcher.describe(),
            "counts": counts,
            "pending_rescans": len(self.dirty),
            "jobs": {k: v for k, v in self.scheduler.last_success.items()},
            "healthy": self.healthy(),
            "reload_error": self.reload_error,
        }
        with session_scope(self.engine) as s:
            s.execute(
                update(DaemonRow)
                .where(DaemonRow.id == self.daemon_id)
                .values(heartbeat_at=utcnow(), status=status)
            )
        text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no checkpoints yet"
        if self.reload_error:
            text += f"; reload failed, running the previous config: {self.reload_error}"
        notify(f"STATUS=watching {len(self.config.watches)} path(s); {text}")

    def prune(self, index: int) -> None:
        """Apply watch ``index``'s retention policy to each of its runs."""
        watch = self.config.watches[index]
        from ckptd.store import queries

        with session_scope(self.engine) as s:
            runs = [r for r in queries.runs(s) if r.watch_path == str(watch.path) and r.present]
        # dry_run = true in the config: the scheduled job only logs its plan.
        dry = watch.retain is not None and watch.retain.dry_run
        for result in self.pruner.prune_runs([(run, watch) for run in runs], dry_run=dry):
            if result.pruned or result.failed:
                log.info(
                    "pruned %d checkpoint(s) of %s (%d bytes freed)%s",
                    len(result.pruned),
                    result.run,
                    result.bytes_freed,
                    f"; {len(result.failed)} failed" if result.failed else "",
                )
            elif result.dry_run and result.plan.delete:
                log.info("dry run: would prune %s", ", ".join(c.label for c in result.plan.delete))

    def _on_recorded(self, ids: list[int]) -> None:
        self.evaluator.enqueue(ids, new=True)

    def evaluate_backlog(self) -> None:
        self.evaluator.enqueue()
        self.evaluator.wake()

    def freeze(self, index: int) -> None:
        """Export the best checkpoint of each run of watch ``index`` if it changed."""
        watch = self.config.watches[index]
        from ckptd.store import queries

        with session_scope(self.engine) as s:
            runs = [r for r in queries.runs(s) if r.watch_path == str(watch.path) and r.present]
        for run in runs:
            outcome = self.freezer.freeze_run(run, watch)
            if outcome.status == "failed":
                log.error("export of %s failed: %s", run.name, outcome.message)

    def _schedule_watch_jobs(self) -> None:
        for name in self.scheduler.jobs():
            if name.startswith(("prune[", "evaluate[", "freeze[")):
                self.scheduler.remove(name)
        for i, w in enumerate(self.config.watches):
            if w.retain is not None:
                self.scheduler.every(
                    f"prune[{i}]", w.retain.every, functools.partial(self.prune, i)
                )
            if w.evaluate is not None and w.evaluate.evaluator != "tfevents":
                self.scheduler.every(
                    f"evaluate[{i}]", w.evaluate.every, self.evaluate_backlog, run_now=True
                )
            if w.freeze is not None and w.freeze.cron:
                self.scheduler.cron(
                    f"freeze[{i}]", w.freeze.cron, functools.partial(self.freeze, i)
                )
            elif w.freeze is not None:
                self.scheduler.every(
                    f"freeze[{i}]", w.freeze.every, functools.partial(self.freeze, i), run_now=True
                )

    def rescan(self) -> None:
        """The periodic safety net for missed events. Most passes are quick (unchanged runs are
        skipped by fingerprint); every DEEP_RESCAN_EVERY-th re-lists and re-stats everything,
        which also catches a checkpoint file rewritten in place without any event."""
        for msg in self.watcher.check():
            log.info(msg)
        self._rescans += 1
        self.full_reconcile(quick=self._rescans % DEEP_RESCAN_EVERY != 0)

    def healthy(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.watcher.healthy() and self.scheduler.running() and self.health.db_ok

    # ------------------------------------------------------------ run

    def run_once(self) -> int:
        """One reconcile, then the due work in lifecycle order: evaluate, export, prune."""
        self.prepare()
        n = self.backfill()
        self.evaluator.enqueue()
        self.evaluator.run_pending()
        for i, w in enumerate(self.config.watches):
            if w.freeze is not None:
                self.freeze(i)
            if w.retain is not None:
                self.prune(i)
        self.worker.close()
        self._mark_stopped()
        return n

    def run(self) -> int:
        # Handlers first: a SIGHUP that arrives during start-up must not kill the daemon (its
        # default action), and a SIGTERM then must still stop it cleanly.
        self._install_signals()
        self.prepare()
        if self.config.daemon.metrics_address:
            try:
                metrics.serve(self.config.daemon.metrics_address)
            except OSError as exc:
                log.error(
                    "cannot serve metrics on %s: %s; continuing without them",
                    self.config.daemon.metrics_address,
                    exc,
                )
        self.watcher.start()  # before the backfill, so nothing written during it is missed
        t0 = time.monotonic()
        recorded = self.backfill()
        log.info(
            "startup scan recorded %d checkpoint(s) in %.2f s", recorded, time.monotonic() - t0
        )
        self._thread = threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True)
        self._thread.start()
        self._eval_thread = threading.Thread(
            target=self.evaluator.serve, args=(self.stop_event,), name="evaluate", daemon=True
        )
        self._eval_thread.start()
        d = self.config.daemon
        self.scheduler.every("rescan", d.rescan_interval, self.rescan)
        self.scheduler.every("heartbeat", d.heartbeat_interval, self.heartbeat, run_now=True)
        self.scheduler.every("wal-checkpoint", WAL_CHECKPOINT_EVERY, self.checkpoint_wal)
        self._schedule_watch_jobs()
        self.scheduler.start()
        notify(
            "READY=1",
            f"STATUS=watching {len(self.config.watches)} path(s)",
            f"MAINPID={os.getpid()}",
        )
        wd = watchdog_interval()
        while not self.stop_event.is_set():
            self.stop_event.wait(wd or 1.0)
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload()
            if wd and self.healthy():
                notify("WATCHDOG=1")
        notify("STOPPING=1")
        self.shutdown()
        return 0

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            self.stop_event.set()

        def hup(_signum: int, _frame: Any) -> None:
            self.reload_event.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def _reload(self) -> None:
        """SIGHUP: re-read the config; keep the old one if the new one is invalid."""
        notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            self.reload_error = str(exc)
            notify("READY=1", f"STATUS=reload failed: {exc}")
            return
        warn_missing_paths(new)
        self.reload_error = None
        if new.daemon.database != self.config.daemon.database:
            log.warning("the database setting changed; it takes effect at the next restart")
        self.watcher.stop()
        self.config = new
        self.watcher = Watcher(new.watches, self._on_path)
        self.watcher.start()
        self.evaluator.config = new
        self.scheduler.every("rescan", new.daemon.rescan_interval, self.rescan, run_now=True)
        self.scheduler.every("heartbeat", new.daemon.heartbeat_interval, self.heartbeat)
        self._schedule_watch_jobs()
        log.info("configuration reloaded from %s", new.source)
        notify("READY=1", "STATUS=configuration reloaded")

    def shutdown(self) -> None:
        self.stop_event.set()
        self.evaluator.wake()
        self.worker.terminate()  # a running evaluation/export is redone at the next start
        self.scheduler.shutdown()
        self.watcher.stop()
        for thread in (self._thread, self._eval_thread):
            if thread is not None:
                thread.join(timeout=30)
        self._mark_stopped()
        self.engine.dispose()
        log.info("stopped")

    def _mark_stopped(self) -> None:
        if self.daemon_id is None:
            return
        with session_scope(self.engine) as s:
            s.execute(
                update(DaemonRow)
                .where(DaemonRow.id == self.daemon_id)
                .values(stopped_at=utcnow(), heartbeat_at=utcnow())
            )
