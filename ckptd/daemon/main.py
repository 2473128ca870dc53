"""The daemon's lifecycle: migrate, backfill, watch, schedule, report health, stop cleanly.

Threads: watchdog observers (enqueue dirty runs), one reconcile thread (the single DB writer for
discovery), APScheduler's pool (rescan, heartbeat, later evaluate/freeze/prune), and a start-up
thread for the migration and backfill. The main thread never touches the database or a run: it
handles signals, sd_notify and the watchdog, so it can always tell what is stuck and stop within
a bound (``health.py``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ckptd import __version__
from ckptd.api import prune as api_prune
from ckptd.api.evaluate import Evaluator
from ckptd.api.freeze import Freezer
from ckptd.config import Config, WatchConfig, load_config, warn_missing_paths
from ckptd.core.errors import StoreError
from ckptd.core.model import utcnow
from ckptd.core.recording import Observation
from ckptd.daemon import metrics
from ckptd.daemon import runs as runs_mod
from ckptd.daemon.evaluate import EvaluationLoop
from ckptd.daemon.health import Progress, Stuck, stall_bound, start_timeout
from ckptd.daemon.notify import notify, watchdog_interval
from ckptd.daemon.reconcile import Outcome, Reconciler
from ckptd.daemon.runs import RunSpec
from ckptd.daemon.scheduler import Job, Scheduler, cron, interval
from ckptd.daemon.watch import Watcher
from ckptd.io.observe import PARALLEL_MIN_RUNS, ObservePool, default_workers, stop_fork_server
from ckptd.store import audit, daemons, migrate, reads
from ckptd.store.handle import Store
from ckptd.store.urls import sqlite_path
from ckptd.worker.client import WorkerClient

log = logging.getLogger(__name__)

WAL_CHECKPOINT_EVERY = timedelta(seconds=1)
BACKFILL_WAL_CHECKPOINT_EVERY = 0.1  # seconds; while the start-up backfill writes
# Every this many periodic rescans, one re-lists every run even if its fingerprint holds.
DEEP_RESCAN_EVERY = 10
# How long a stop waits for threads to finish their current item (a stuck one never does; what
# it was doing is redone at the next start). With the last DB write under the busy timeout, the
# stop stays well inside the unit's TimeoutStopSec=90.
STOP_GRACE = 10.0

RunKey = tuple[str, str]  # (watch path, run name): stable across reloads, unlike a watch's index


def run_key(spec: RunSpec) -> RunKey:
    return (str(spec.watch.path), spec.name)


class DirtyRuns:
    """A set of runs to rescan, with a short debounce so a burst of events costs one scan."""

    def __init__(self) -> None:
        self._pending: dict[RunKey, RunSpec] = {}
        self._cond = threading.Condition()

    def add(self, spec: RunSpec) -> None:
        key = run_key(spec)
        with self._cond:
            if key not in self._pending:
                self._pending[key] = spec
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
        self.store = Store.open(config.daemon.database, wal_autocheckpoint=False, recreate=False)
        self.dirty = DirtyRuns()
        self.health = Health()
        self.progress = Progress(stall_bound(config.daemon.heartbeat_interval))
        self.reconciler = Reconciler(self.store)
        # One warm TensorFlow worker, shared by evaluation and export (each one is a big process).
        self.worker = WorkerClient()
        self.evaluator = Evaluator(self.store, config, self.worker)
        self.eval_loop = EvaluationLoop(self.evaluator)
        self.freezer = Freezer(self.store, self.worker)
        self._eval_thread: threading.Thread | None = None
        self.watcher = Watcher(config.watches, self._on_path)
        self.scheduler = Scheduler(self.progress)
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.daemon_id: int | None = None
        self.reload_error: str | None = None
        self.fatal: str | None = None  # why the daemon stops by itself (exit status 1)
        self._thread: threading.Thread | None = None
        self._known_runs: set[RunKey] = set()
        self._rescans = 0
        self._reported_runs: set[str] = set()
        self._db_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the SQLite file
        self._reported_stuck: set[str] = set()

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
        self._db_file = self._database_file()
        with self.progress.busy("claiming the database"):
            try:
                self.daemon_id = daemons.claim(
                    self.store,
                    version=__version__,
                    config=self.config.source,
                    status={
                        "state": "starting",
                        "heartbeat_interval": self.config.daemon.heartbeat_interval.total_seconds(),
                        "watches": [str(w.path) for w in self.config.watches],
                    },
                )
            except daemons.AlreadyRunning as exc:
                raise SystemExit(f"ckptd: refusing to start: {exc}") from None
            except StoreError as exc:
                raise SystemExit(f"ckptd: cannot register this daemon: {exc}") from None

        with self.progress.busy("finishing interrupted deletions"):
            resumed = api_prune.resume(self.store)
        if resumed:
            log.info("finished %d deletion(s) interrupted by the last stop", resumed)
        with self.progress.busy("recovering interrupted evaluations and exports"):
            if self.evaluator.recover():
                log.info("re-queued evaluations of processes that have exited")
            if self.freezer.recover(self.config.watches):
                log.info("exports interrupted by the last stop will be redone")

    def _database_file(self) -> tuple[int, int] | None:
        path = sqlite_path(self.config.daemon.database)
        if path is None:
            return None
        st = os.stat(path)
        return (st.st_dev, st.st_ino)

    def database_replaced(self) -> str | None:
        """Why the SQLite file this daemon opened is no longer the one at its path, if it is not:
        writes would go into a deleted inode (lost at exit) or miss the new file."""
        if self._db_file is None:
            return None
        path = sqlite_path(self.config.daemon.database)
        try:
            st = os.stat(path)  # type: ignore[arg-type]
        except FileNotFoundError:
            how = "was deleted"
        except OSError:
            return None  # cannot tell now (EACCES, EIO): checked again at the next tick
        else:
            if (st.st_dev, st.st_ino) == self._db_file:
                return None
            how = "was replaced"
        return (
            f"the database file {path} {how} while ckptd was running; exiting so that the "
            "restart records everything on disk into the database now at that path"
        )

    def backfill(self) -> int:
        """The start-up scan: what the database knows first, then every run, in parallel."""
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
        """Checkpoint the WAL from a thread while the body writes (a backfill writes many pages
        before the scheduler's job runs): copying pages into the
        database then overlaps the writing instead of following it at the end."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(every):
                try:
                    self.checkpoint_wal()
                except Exception:  # a failed checkpoint is retried next time; never fatal
                    log.debug("WAL checkpoint failed", exc_info=True)

        thread = threading.Thread(target=loop, name="ckptd-wal-checkpoint", daemon=True)
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
        # (A run whose watch was removed from the config is no longer ours to reconcile.)
        current = {run_key(s) for s in specs}
        watches = {str(w.path): (i, w) for i, w in enumerate(self.config.watches)}
        for watch_path, name in self._known_runs - current:
            if watch_path in watches:
                i, w = watches[watch_path]
                specs.append(RunSpec(i, name, w.path / name if w.runs else w.path, w))
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
        return count

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

    def _reconcile(self, spec: RunSpec, observation: Observation | None = None) -> Outcome:
        try:
            outcome = self.reconciler.reconcile(spec, observation)
            self.health.last_reconcile = time.time()
            self.health.db_ok = True
        except Exception as exc:
            self.health.reconcile_errors += 1
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

    def _on_path(self, watch: WatchConfig, path: str) -> None:
        # By identity: an event from an observer of the config before a reload is dropped.
        for i, w in enumerate(self.config.watches):
            if w is watch:
                spec = runs_mod.run_of(i, w, path)
                if spec is not None:
                    self.dirty.add(spec)
                return

    def _reconcile_loop(self) -> None:
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

    def counts(self) -> dict[str, int]:
        return reads.count_states(self.store)

    def checkpoint_wal(self) -> None:
        """Fold the WAL into the database here, off the recording path (see make_engine)."""
        result = self.store.checkpoint_wal()
        if result is not None and result[0]:
            _busy, pages, done = result
            log.debug("WAL checkpoint held back by a reader: %d of %d pages copied", done, pages)

    def heartbeat(self) -> None:
        counts = self.counts()
        metrics.checkpoints(counts)
        stuck = self.progress.stuck()
        status = {
            "state": "running",
            "heartbeat_interval": self.config.daemon.heartbeat_interval.total_seconds(),
            "watches": self.watcher.describe(),
            "counts": counts,
            "pending_rescans": len(self.dirty),
            "jobs": {k: v for k, v in self.scheduler.last_success.items()},
            "healthy": self.healthy(stuck),
            "stuck": [{"what": s.what, "seconds": round(s.seconds, 1)} for s in stuck],
            "stall_bound": self.progress.bound,
            "reload_error": self.reload_error,
        }
        daemons.heartbeat(self.store, self.daemon_id, status)
        text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no checkpoints yet"
        notify(self._status_line(stuck, text))

    def _status_line(self, stuck: list[Stuck], counts: str = "") -> str:
        text = f"STATUS=watching {len(self.config.watches)} path(s)"
        if counts:
            text += f"; {counts}"
        if stuck:
            text += "; unhealthy, stuck: " + ", ".join(str(s) for s in stuck)
        if self.reload_error:
            text += f"; reload failed, running the previous config: {self.reload_error}"
        return text

    def prune(self, watch: WatchConfig) -> None:
        """Apply ``watch``'s retention policy to each of its runs."""
        runs = api_prune.runs(self.store, watch_path=str(watch.path))
        # The prune honours [watch.retain] dry_run = true: then this only logs the plan.
        results = api_prune.prune(self.store, [(run, watch) for run in runs])
        metrics.pruned(sum(len(r.pruned) for r in results), sum(r.bytes_freed for r in results))
        for result in results:
            self.progress.tick()  # one run done
            if result.pruned or result.failed:
                log.info(
                    "pruned %d checkpoint(s) of %s (%d bytes freed)%s",
                    len(result.pruned),
                    result.run,
                    result.bytes_freed,
                    f"; {len(result.failed)} failed" if result.failed else "",
                )
            elif result.dry_run and (result.plan.delete or result.leftovers):
                log.info(
                    "dry_run = true in [watch.retain]: would prune %s of %s",
                    ", ".join(
                        [c.label for c in result.plan.delete] + [f.label for f in result.leftovers]
                    ),
                    result.run,
                )

    def evaluate_backlog(self) -> None:
        self.eval_loop.enqueue()
        self.eval_loop.wake()

    def freeze(self, watch: WatchConfig) -> None:
        """Export the best checkpoint of each run of ``watch`` if it changed."""
        assert watch.freeze is not None
        # An export may wait for the shared worker to finish an evaluation, then runs under its
        # own timeout: only past both is it stuck.
        waits = watch.freeze.timeout + max(
            (w.evaluate.timeout for w in self.config.watches if w.evaluate is not None),
            default=timedelta(0),
        )
        for run in api_prune.runs(self.store, watch_path=str(watch.path)):
            with self.progress.busy(f"export of {run.path}", extra=waits.total_seconds()):
                outcome = self.freezer.freeze_run(run, watch)
            if outcome.status in ("published", "failed"):
                metrics.export(outcome.status, outcome.seconds)
            if outcome.status == "failed":
                log.error("export of %s failed: %s", run.name, outcome.message)

    def watch_jobs(self, config: Config) -> list[Job]:
        """The per-watch jobs of ``config``, named by watch path (stable when another watch is
        added or removed). Raises ValueError for a schedule APScheduler rejects."""
        jobs = []
        for w in config.watches:
            if w.retain is not None:
                jobs.append(
                    interval(f"prune[{w.path}]", w.retain.every, functools.partial(self.prune, w))
                )
            if w.evaluate is not None and w.evaluate.evaluator != "tfevents":
                jobs.append(
                    interval(
                        f"evaluate[{w.path}]", w.evaluate.every, self.evaluate_backlog, run_now=True
                    )
                )
            if w.freeze is not None and w.freeze.cron:
                jobs.append(
                    cron(f"freeze[{w.path}]", w.freeze.cron, functools.partial(self.freeze, w))
                )
            elif w.freeze is not None:
                jobs.append(
                    interval(
                        f"freeze[{w.path}]",
                        w.freeze.every,
                        functools.partial(self.freeze, w),
                        run_now=True,
                    )
                )
        return jobs

    def daemon_jobs(self, config: Config, *, reload: bool = False) -> list[Job]:
        d = config.daemon
        return [
            interval("rescan", d.rescan_interval, self.rescan, run_now=reload),
            interval("heartbeat", d.heartbeat_interval, self.heartbeat, run_now=not reload),
            interval("wal-checkpoint", WAL_CHECKPOINT_EVERY, self.checkpoint_wal),
            *self.watch_jobs(config),
        ]

    def _schedule(self, jobs: list[Job]) -> None:
        """Make ``jobs`` the scheduled set: per-watch jobs not among them are removed."""
        names = {j.name for j in jobs}
        for name in self.scheduler.jobs():
            if name not in names and name.startswith(("prune[", "evaluate[", "freeze[")):
                self.scheduler.remove(name)
        for job in jobs:
            self.scheduler.add(job)

    def rescan(self) -> None:
        """The periodic safety net for missed events. Most passes are quick (unchanged runs are
        skipped by fingerprint); every DEEP_RESCAN_EVERY-th re-lists and re-stats everything,
        which also catches a checkpoint file rewritten in place without any event."""
        for msg in self.watcher.check():
            log.info(msg)
        self._rescans += 1
        self.full_reconcile(quick=self._rescans % DEEP_RESCAN_EVERY != 0)

    def healthy(self, stuck: list[Stuck] | None = None) -> bool:
        """Threads alive *and making progress*: nothing stuck for longer than its bound."""
        if stuck is None:
            stuck = self.progress.stuck()
        alive = self._thread is not None and self._thread.is_alive()
        return (
            alive
            and not stuck
            and self.watcher.healthy()
            and self.scheduler.running()
            and self.health.db_ok
        )

    # ------------------------------------------------------------ run

    def run_once(self) -> int:
        """One reconcile, then the due work in lifecycle order: evaluate, export, prune."""
        self.prepare()
        n = self.backfill()
        self.evaluator.enqueue()
        self.evaluator.run_pending()
        for w in self.config.watches:
            if w.freeze is not None:
                self.freeze(w)
            if w.retain is not None:
                self.prune(w)
        self.worker.close()
        self._mark_stopped()
        return n

    def run(self) -> int:
        # Handlers first: a SIGHUP that arrives during start-up must not kill the daemon (its
        # default action), and a SIGTERM then must still stop it cleanly.
        self._install_signals()
        if self._start():
            notify(
                "READY=1",
                f"STATUS=watching {len(self.config.watches)} path(s)",
                f"MAINPID={os.getpid()}",
            )
            self._watch_over()
        notify("STOPPING=1")
        code = 1 if self.fatal else 0
        if not self.shutdown():
            self._exit_now(code)
        return code

    def _start_up(self) -> None:
        """Everything before READY=1 (in the start-up thread)."""
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
        if self.stop_event.is_set():
            return
        log.info(
            "startup scan recorded %d checkpoint(s) in %.2f s", recorded, time.monotonic() - t0
        )
        self._thread = threading.Thread(
            target=self._reconcile_loop, name="ckptd-reconcile", daemon=True
        )
        self._thread.start()
        self._eval_thread = threading.Thread(
            target=self.eval_loop.serve, args=(self.stop_event,), name="ckptd-evaluate", daemon=True
        )
        self._eval_thread.start()
        for job in self.daemon_jobs(self.config):
            self.scheduler.add(job)
        self.scheduler.start()

    def _start(self) -> bool:
        """Start up in a thread of its own while this one keeps handling signals: a SIGTERM
        during a long backfill stops it between runs, and a start-up that does not finish by its
        deadline (``$CKPTD_START_TIMEOUT``, see health.py) exits 1, so systemd counts a failed
        start. An item stuck before that is logged and shown in STATUS; it is not fatal by
        itself (a large run's first reconcile may legitimately be long). False when stopped
        before it finished."""
        failure: list[BaseException] = []

        def body() -> None:
            try:
                self._start_up()
            except BaseException as exc:  # re-raised in the main thread
                failure.append(exc)

        thread = threading.Thread(target=body, name="ckptd-start-up", daemon=True)
        thread.start()
        timeout = start_timeout()
        deadline = time.monotonic() + timeout if timeout is not None else None
        while thread.is_alive():
            thread.join(0.2)
            if self.stop_event.is_set():
                thread.join(STOP_GRACE)
                break
            stuck = self.progress.stuck()
            self._report_stuck(stuck)
            if deadline is not None and time.monotonic() > deadline:
                doing = ", ".join(str(s) for s in stuck) or ", ".join(self.progress.busy_with())
                self.fatal = (
                    f"start-up did not finish within {timeout:g} s (busy with: "
                    f"{doing or 'starting'}); exiting"
                )
                log.error("%s", self.fatal)
                notify(f"STATUS={self.fatal}")
                return False
        if failure:
            if isinstance(failure[0], StoreError):  # one line, not a traceback
                raise SystemExit(f"ckptd: start-up failed: {failure[0]}")
            raise failure[0]
        return not self.stop_event.is_set()

    def _watch_over(self) -> None:
        """The main loop: reload on SIGHUP, check the database file, and ping the watchdog only
        while every thread makes progress; returns when stopping."""
        wd = watchdog_interval()
        last_status = ""
        # At least every second: a stall or a vanished database file is noticed promptly even
        # with a long WatchdogSec (pinging more often than needed costs one datagram).
        while not self.stop_event.wait(min(wd or 1.0, 1.0)):
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload()
            problem = self.database_replaced()
            if problem:
                self.fatal = problem
                self.daemon_id = None  # its row is not in the file now at that path
                log.critical("%s", problem)
                notify(f"STATUS={problem}")
                return
            stuck = self.progress.stuck()
            self._report_stuck(stuck)
            if stuck:
                # The heartbeat may be the stuck one: say it from here, where nothing blocks.
                line = self._status_line(stuck)
                if line != last_status:
                    notify(line)
                last_status = line
            else:
                last_status = ""
            if wd and self.healthy(stuck):
                notify("WATCHDOG=1")

    def _report_stuck(self, stuck: list[Stuck]) -> None:
        whats = {s.what for s in stuck}
        for s in stuck:
            if s.what not in self._reported_stuck:
                log.error(
                    "stuck: %s, over the bound of %.0f s; not pinging the watchdog until it "
                    "finishes",
                    s,
                    self.progress.bound,
                )
        for what in self._reported_stuck - whats:
            log.info("no longer stuck: %s", what)
        self._reported_stuck = whats

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
        """SIGHUP: re-read the config and apply it, or keep the running one and say why.

        Everything that can fail (reading and checking the file, building every job's schedule)
        happens before anything running is touched; jobs and observers are then rebuilt from the
        new config, keyed by watch path, so no index into the old list of watches survives."""
        notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        old = self.config
        try:
            new = load_config(old.source)
            jobs = self.daemon_jobs(new, reload=True)
        except Exception as exc:  # whatever the cause, the running config stays
            self._reload_failed(exc)
            return
        warn_missing_paths(new)
        if new.daemon.database != old.daemon.database:
            log.warning("the database setting changed; it takes effect at the next restart")
        try:
            self._apply(new, jobs)
        except Exception as exc:
            log.exception("applying the new config failed; going back to the running one")
            self._apply(old, self.daemon_jobs(old, reload=True))
            self._reload_failed(exc)
            return
        self.reload_error = None
        log.info("configuration reloaded from %s", new.source)
        notify("READY=1", "STATUS=configuration reloaded")

    def _apply(self, config: Config, jobs: list[Job]) -> None:
        self.watcher.stop()
        self.config = config
        self.evaluator.config = config
        self.progress.bound = stall_bound(config.daemon.heartbeat_interval)
        self.watcher = Watcher(config.watches, self._on_path)
        self.watcher.start()
        self._schedule(jobs)

    def _reload_failed(self, exc: Exception) -> None:
        self.reload_error = str(exc) or type(exc).__name__
        log.error("reload failed, keeping the running config: %s", self.reload_error)
        notify("READY=1", f"STATUS=reload failed, running the previous config: {self.reload_error}")

    def shutdown(self) -> bool:
        """Stop every thread, waiting at most STOP_GRACE for each to finish its item; mark this
        daemon stopped and close the database. False when some thread is still busy (stuck):
        the caller then exits without waiting for it."""
        self.stop_event.set()
        self.eval_loop.wake()
        self.worker.terminate()  # a running evaluation/export is redone at the next start
        self.scheduler.shutdown()
        self.watcher.stop()
        deadline = time.monotonic() + STOP_GRACE
        for thread in (self._thread, self._eval_thread):
            if thread is not None:
                thread.join(timeout=max(deadline - time.monotonic(), 0))
        while self.progress.busy_with() and time.monotonic() < deadline:
            time.sleep(0.05)  # scheduled jobs finishing their item (APScheduler has no join)
        busy = self.progress.busy_with()
        try:
            self._mark_stopped()
        except StoreError as exc:
            log.error("could not mark this daemon stopped: %s", exc)
        self.store.close()
        if busy:
            return False
        log.info("stopped")
        return True

    def _exit_now(self, code: int) -> None:
        """Exit without waiting for threads stuck in a system call (they would hold the
        interpreter's exit forever); what they were doing is redone at the next start."""
        log.error(
            "exiting now; still busy with: %s (redone at the next start)",
            ", ".join(self.progress.busy_with()) or "nothing",
        )
        self.worker.terminate()
        stop_fork_server(wait=False)
        logging.shutdown()
        os._exit(code)

    def _mark_stopped(self) -> None:
        if self.daemon_id is None:
            return
        daemons.mark_stopped(self.store, self.daemon_id)
