"""The daemon's life from the main thread: start up in a thread of its own, watch over the
threads (sd_notify, the watchdog, stuck items, the database file), handle signals and SIGHUP
reloads, and stop within a bound."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from ckptd.config import (
    Config,
    WatchConfig,
    check_object_stores,
    load_config,
    warn_missing_paths,
)
from ckptd.core.errors import StoreError
from ckptd.daemon import metrics
from ckptd.daemon import runs as runs_mod
from ckptd.daemon.health import Stuck, stall_bound, start_timeout
from ckptd.daemon.notify import notify, watchdog_interval
from ckptd.daemon.objwatch import ObjectWatches, is_object_watch
from ckptd.daemon.scheduler import Job
from ckptd.daemon.watch import Watcher
from ckptd.io.observe import stop_fork_server

if TYPE_CHECKING:
    from ckptd.daemon.main import Daemon

log = logging.getLogger("ckptd.daemon.main")  # the name the journal has always shown

# How long a stop waits for threads to finish their current item (a stuck one never does; what
# it was doing is redone at the next start). With the last DB write under the busy timeout, the
# stop stays well inside the unit's TimeoutStopSec=90.
STOP_GRACE = 10.0


class Supervisor:
    """Runs a daemon until it is stopped; the only part that runs in the main thread."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.reload_event = threading.Event()
        self.fatal: str | None = None  # why the daemon stops by itself (exit status 1)
        self._reported_stuck: set[str] = set()

    def run(self) -> int:
        d = self.daemon
        # Handlers first: a SIGHUP that arrives during start-up must not kill the daemon (its
        # default action), and a SIGTERM then must still stop it cleanly.
        self._install_signals()
        if self._start():
            notify(
                "READY=1",
                f"STATUS=watching {len(d.config.watches)} path(s)",
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
        d = self.daemon
        d.prepare()
        d.leases.start()
        if d.config.daemon.metrics_address:
            try:
                metrics.serve(d.config.daemon.metrics_address)
            except OSError as exc:
                log.error(
                    "cannot serve metrics on %s: %s; continuing without them",
                    d.config.daemon.metrics_address,
                    exc,
                )
        d.watcher.start()  # before the backfill, so nothing written during it is missed
        d.objwatch.start()  # (its first poll records what the buckets hold)
        t0 = time.monotonic()
        recorded = d.backfill()
        if d.stop_event.is_set():
            return
        log.info(
            "startup scan recorded %d checkpoint(s) in %.2f s", recorded, time.monotonic() - t0
        )
        d.reconcile_thread = threading.Thread(
            target=d.reconcile_loop, name="ckptd-reconcile", daemon=True
        )
        d.reconcile_thread.start()
        d.eval_thread = threading.Thread(
            target=d.eval_loop.serve, args=(d.stop_event,), name="ckptd-evaluate", daemon=True
        )
        d.eval_thread.start()
        for job in d.jobs.daemon_jobs(d.acting):
            d.scheduler.add(job)
        d.scheduler.start()

    def _start(self) -> bool:
        """Start up in a thread of its own while this one keeps handling signals: a SIGTERM
        during a long backfill stops it between runs, and a start-up that does not finish by its
        deadline (``$CKPTD_START_TIMEOUT``, see health.py) exits 1, so systemd counts a failed
        start. An item stuck before that is logged and shown in STATUS; it is not fatal by
        itself (a large run's first reconcile may legitimately be long). False when stopped
        before it finished."""
        d = self.daemon
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
            if d.stop_event.is_set():
                thread.join(STOP_GRACE)
                break
            stuck = d.progress.stuck()
            self._report_stuck(stuck)
            if deadline is not None and time.monotonic() > deadline:
                doing = ", ".join(str(s) for s in stuck) or ", ".join(d.progress.busy_with())
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
        return not d.stop_event.is_set()

    def _watch_over(self) -> None:
        """The main loop: reload on SIGHUP, check the database file, and ping the watchdog only
        while every thread makes progress; returns when stopping."""
        d = self.daemon
        wd = watchdog_interval()
        last_status = ""
        # At least every second: a stall or a vanished database file is noticed promptly even
        # with a long WatchdogSec (pinging more often than needed costs one datagram).
        while not d.stop_event.wait(min(wd or 1.0, 1.0)):
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload()
            problem = d.db_file.replaced()
            if problem:
                self.fatal = problem
                d.daemon_id = None  # its row is not in the file now at that path
                log.critical("%s", problem)
                notify(f"STATUS={problem}")
                return
            stuck = d.progress.stuck()
            self._report_stuck(stuck)
            if stuck:
                # The heartbeat may be the stuck one: say it from here, where nothing blocks.
                line = d.jobs.status_line(stuck)
                if line != last_status:
                    notify(line)
                last_status = line
            else:
                last_status = ""
            if wd and d.working(stuck):
                notify("WATCHDOG=1")

    def _report_stuck(self, stuck: list[Stuck]) -> None:
        whats = {s.what for s in stuck}
        for s in stuck:
            if s.what not in self._reported_stuck:
                log.error(
                    "stuck: %s, over the bound of %.0f s; not pinging the watchdog until it "
                    "finishes",
                    s,
                    self.daemon.progress.bound,
                )
        for what in self._reported_stuck - whats:
            log.info("no longer stuck: %s", what)
        self._reported_stuck = whats

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            self.daemon.stop_event.set()

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
        d = self.daemon
        notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        old = d.config
        try:
            new = load_config(old.source)
            check_object_stores(new, transient=False)
            objects = tuple(w for w in new.watches if is_object_watch(w))
            acting = new  # evaluation, export and prune: every watch
            new = runs_mod.local_only(new)
            jobs = d.jobs.daemon_jobs(acting, reload=True)
        except Exception as exc:  # whatever the cause, the running config stays
            self._reload_failed(exc)
            return
        warn_missing_paths(new)
        for key in ("database", "name", "lease_ttl", "evaluate_on"):
            if getattr(new.daemon, key) != getattr(old.daemon, key):
                log.warning("the %s setting changed; it takes effect at the next restart", key)
        before, acted = d.object_watches, d.acting
        try:
            self._apply(new, jobs, objects, acting)
        except Exception as exc:
            log.exception("applying the new config failed; going back to the running one")
            self._apply(old, d.jobs.daemon_jobs(acted, reload=True), before, acted)
            self._reload_failed(exc)
            return
        d.reload_error = None
        log.info("configuration reloaded from %s", new.source)
        notify("READY=1", "STATUS=configuration reloaded")

    def _apply(
        self, config: Config, jobs: list[Job], objects: tuple[WatchConfig, ...], acting: Config
    ) -> None:
        d = self.daemon
        d.watcher.stop()
        d.config = config
        d.acting = acting
        d.evaluator.config = acting
        d.progress.bound = stall_bound(config.daemon.heartbeat_interval)
        d.watcher = Watcher(config.watches, d.on_path, on_armed=d.on_armed)
        d.watcher.start()
        d.objwatch.stop()
        d.object_watches = objects
        d.objwatch = ObjectWatches(objects, d.record_with, d.present_runs)
        d.objwatch.start()
        d.jobs.schedule(jobs)

    def _reload_failed(self, exc: Exception) -> None:
        d = self.daemon
        d.reload_error = str(exc) or type(exc).__name__
        log.error("reload failed, keeping the running config: %s", d.reload_error)
        notify("READY=1", f"STATUS=reload failed, running the previous config: {d.reload_error}")

    def shutdown(self) -> bool:
        """Stop every thread, waiting at most STOP_GRACE for each to finish its item; mark this
        daemon stopped and close the database. False when some thread is still busy (stuck):
        the caller then exits without waiting for it."""
        d = self.daemon
        d.stop_event.set()
        d.eval_loop.wake()
        d.worker.terminate()  # a running evaluation/export is redone at the next start
        d.scheduler.shutdown()
        d.watcher.stop()
        d.objwatch.stop()
        deadline = time.monotonic() + STOP_GRACE
        for thread in (d.reconcile_thread, d.eval_thread):
            if thread is not None:
                thread.join(timeout=max(deadline - time.monotonic(), 0))
        while d.progress.busy_with() and time.monotonic() < deadline:
            time.sleep(0.05)  # scheduled jobs finishing their item (APScheduler has no join)
        busy = d.progress.busy_with()
        try:
            d.mark_stopped()
        except StoreError as exc:
            log.error("could not mark this daemon stopped: %s", exc)
        d.requests.close()
        d.store.close()
        if busy:
            return False
        log.info("stopped")
        return True

    def _exit_now(self, code: int) -> None:
        """Exit without waiting for threads stuck in a system call (they would hold the
        interpreter's exit forever); what they were doing is redone at the next start."""
        log.error(
            "exiting now; still busy with: %s (redone at the next start)",
            ", ".join(self.daemon.progress.busy_with()) or "nothing",
        )
        self.daemon.worker.terminate()
        stop_fork_server(wait=False)
        logging.shutdown()
        os._exit(code)
