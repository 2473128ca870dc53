"""The daemon's scheduled work: each watch's prune, evaluate and freeze, and the daemon's own
rescan, heartbeat (status row and sd_notify STATUS line) and WAL checkpoint; and the job lists
that schedule them, rebuilt from the config at start and on each reload."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from ckptd.api import handoff
from ckptd.api import prune as api_prune
from ckptd.api import status as api_status
from ckptd.config import Config, WatchConfig
from ckptd.core.model import Run
from ckptd.daemon import metrics
from ckptd.daemon.health import Stuck
from ckptd.daemon.notify import notify
from ckptd.daemon.scheduler import Job, cron, interval
from ckptd.store import daemons, reads
from ckptd.store.db import DatabaseUnreachable

if TYPE_CHECKING:
    from ckptd.daemon.main import Daemon

log = logging.getLogger("ckptd.daemon.main")  # the name the journal has always shown

WAL_CHECKPOINT_EVERY = timedelta(seconds=1)


class Jobs:
    """The bodies of the scheduled jobs, run on the daemon's parts (its config as of now)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def counts(self) -> dict[str, int]:
        return reads.count_states(self.daemon.store)

    def heartbeat(self) -> None:
        """Write this daemon's status row and say it to systemd (and to the metrics). It is
        also the database's probe: an outage is noticed and its end caught up on here."""
        d = self.daemon
        stuck = d.progress.stuck()
        text = ""
        try:
            counts = self.counts()
            if d.db.answered() is not None:
                self.catch_up()
            status = {
                "state": "running",
                "heartbeat_interval": d.config.daemon.heartbeat_interval.total_seconds(),
                "evaluate_on": "local" if d.eval_loop.local else "workers",
                "watches": d.watcher.describe() + d.objwatch.describe(),
                "counts": counts,
                "pending_rescans": len(d.dirty),
                "jobs": {k: v for k, v in d.scheduler.last_success.items()},
                "healthy": d.healthy(stuck),
                "stuck": [{"what": s.what, "seconds": round(s.seconds, 1)} for s in stuck],
                "stall_bound": d.progress.bound,
                "reload_error": d.reload_error,
            }
            daemons.heartbeat(d.store, d.daemon_id, status)
            metrics.checkpoints(counts)
            if metrics.enabled():
                metrics.cluster(api_status.cluster(d.store))
            text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no checkpoints yet"
        except DatabaseUnreachable as exc:
            d.db.failed(exc)
        metrics.database_up(d.db.up)
        notify(self.status_line(stuck, text))

    def status_line(self, stuck: list[Stuck], counts: str = "") -> str:
        text = f"STATUS=watching {len(self.daemon.config.watches)} path(s)"
        if counts:
            text += f"; {counts}"
        if not self.daemon.db.up:
            text += "; " + self.daemon.db.status_text()
        if stuck:
            text += "; unhealthy, stuck: " + ", ".join(str(s) for s in stuck)
        if self.daemon.reload_error:
            text += f"; reload failed, running the previous config: {self.daemon.reload_error}"
        return text

    def catch_up(self) -> None:
        """The database answers again: finish deletions it interrupted, and rescan now (not at
        the next rescan), so that what was written meanwhile is recorded (a quick rescan will do:
        a reconcile that failed kept no fingerprint, so its run is listed again)."""
        d = self.daemon
        resumed = api_prune.resume(d.store)
        if resumed:
            log.info("finished %d deletion(s) interrupted by the outage", resumed)
        d.scheduler.add(self.rescan_job(d.config, run_now=True))

    def rescan_job(self, config: Config, *, run_now: bool) -> Job:
        rescan = self.needs_database(self.daemon.rescan)
        return interval("rescan", config.daemon.rescan_interval, rescan, run_now=run_now)

    def needs_database(self, func: Callable[[], None]) -> Callable[[], None]:
        """``func`` as a job that is skipped while the database is unreachable (prune and
        export act on files the database must account for) and that notices an outage."""

        def job() -> None:
            if not self.daemon.db.up:
                return  # the heartbeat said so; the next run after the outage does the work
            try:
                func()
            except DatabaseUnreachable as exc:
                self.daemon.db.failed(exc)

        return job

    def held_runs(self, watch: WatchConfig) -> list[Run]:
        """The runs of ``watch`` this daemon holds the leases of (the others' are theirs)."""
        runs = api_prune.runs(self.daemon.store, watch_path=str(watch.path))
        return [r for r in runs if self.daemon.leases.holds(r.id)]

    def prune(self, watch: WatchConfig) -> None:
        """Apply ``watch``'s retention policy to each of its runs."""
        store = self.daemon.store
        runs = self.held_runs(watch)
        # The prune honours [watch.retain] dry_run = true: then this only logs the plan.
        results = api_prune.prune(
            store, [(run, watch) for run in runs], holds=self.daemon.leases.current
        )
        metrics.pruned(sum(len(r.pruned) for r in results), sum(r.bytes_freed for r in results))
        for result in results:
            self.daemon.progress.tick()  # one run done
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
        self.daemon.eval_loop.enqueue()
        self.daemon.eval_loop.wake()

    def freeze(self, watch: WatchConfig) -> None:
        """Export the best checkpoint of each run of ``watch`` if it changed."""
        assert watch.freeze is not None
        d = self.daemon
        if not d.eval_loop.local:  # evaluate_on = "workers": a job in the queue for them
            for run in self.held_runs(watch):
                if handoff.queue_export(d.store, run):
                    log.info("queued the export of %s for a worker", run.name)
            return
        # An export may wait for the shared worker to finish an evaluation, then runs under its
        # own timeout: only past both is it stuck.
        waits = watch.freeze.timeout + max(
            (w.evaluate.timeout for w in d.config.watches if w.evaluate is not None),
            default=timedelta(0),
        )
        for run in self.held_runs(watch):
            with d.progress.busy(f"export of {run.path}", extra=waits.total_seconds()):
                # A failed export waits out its backoff (as evaluations), not every `every`.
                outcome = d.freezer.freeze_run(run, watch, honour_backoff=True)
            if outcome.status in ("published", "failed"):  # the freezer logged a failure
                metrics.export(outcome.status, outcome.seconds)

    def watch_jobs(self, config: Config) -> list[Job]:
        """The per-watch jobs of ``config``, named by watch path (stable when another watch is
        added or removed). Raises ValueError for a schedule APScheduler rejects."""
        jobs = []
        for w in config.watches:
            if w.retain is not None:
                jobs.append(
                    interval(
                        f"prune[{w.path}]",
                        w.retain.every,
                        self.needs_database(functools.partial(self.prune, w)),
                    )
                )
            if w.evaluate is not None and w.evaluate.evaluator != "tfevents":
                jobs.append(
                    interval(
                        f"evaluate[{w.path}]",
                        w.evaluate.every,
                        self.needs_database(self.evaluate_backlog),
                        run_now=True,
                    )
                )
            if w.freeze is not None and w.freeze.cron:
                jobs.append(
                    cron(
                        f"freeze[{w.path}]",
                        w.freeze.cron,
                        self.needs_database(functools.partial(self.freeze, w)),
                    )
                )
            elif w.freeze is not None:
                jobs.append(
                    interval(
                        f"freeze[{w.path}]",
                        w.freeze.every,
                        self.needs_database(functools.partial(self.freeze, w)),
                        run_now=True,
                    )
                )
        return jobs

    def daemon_jobs(self, config: Config, *, reload: bool = False) -> list[Job]:
        d = config.daemon
        return [
            self.rescan_job(config, run_now=reload),
            interval("heartbeat", d.heartbeat_interval, self.heartbeat, run_now=not reload),
            interval("wal-checkpoint", WAL_CHECKPOINT_EVERY, self.daemon.checkpoint_wal),
            *self.watch_jobs(config),
        ]

    def schedule(self, jobs: list[Job]) -> None:
        """Make ``jobs`` the scheduled set: per-watch jobs not among them are removed."""
        scheduler = self.daemon.scheduler
        names = {j.name for j in jobs}
        for name in scheduler.jobs():
            if name not in names and name.startswith(("prune[", "evaluate[", "freeze[")):
                scheduler.remove(name)
        for job in jobs:
            scheduler.add(job)
