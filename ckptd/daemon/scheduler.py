"""Periodic jobs with APScheduler 3.x (the only module that imports it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ckptd.daemon import metrics
from ckptd.daemon.health import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A job ready to schedule: building one is where a bad schedule fails, before anything
    running is touched (a reload applies a whole new set of jobs or none)."""

    name: str
    trigger: Any  # an APScheduler trigger
    func: Callable[[], object]
    run_now: bool = False
    when: str = ""  # for the log line of a failed run


def interval(
    name: str, every: timedelta, func: Callable[[], object], *, run_now: bool = False
) -> Job:
    seconds = max(every.total_seconds(), 0.05)
    return Job(name, IntervalTrigger(seconds=seconds, timezone="UTC"), func, run_now, f"in {every}")


def cron(name: str, crontab: str, func: Callable[[], object]) -> Job:
    """A crontab schedule ("0 * * * *" = hourly), in UTC; ValueError when APScheduler rejects it."""
    try:
        trigger = CronTrigger.from_crontab(crontab, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"{name}: cron {crontab!r}: {exc}") from exc
    return Job(name, trigger, func, False, "at its next time")


class Scheduler:
    """Named jobs; a job never overlaps itself and a slow run is not stacked up. Each run is
    marked busy in ``progress``, so one that never ends shows as stuck."""

    def __init__(self, progress: Progress, threads: int = 4) -> None:
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(threads)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        self.progress = progress
        self.last_success: dict[str, float] = {}

    def add(self, job: Job) -> None:
        def run() -> None:
            try:
                with self.progress.busy(f"job {job.name}"):
                    job.func()
                self.last_success[job.name] = time.time()
                metrics.job_succeeded(job.name, self.last_success[job.name])
            except Exception:
                log.exception("job %s failed; it will run again %s", job.name, job.when)

        kwargs = {"next_run_time": datetime.now(UTC)} if job.run_now else {}
        self._scheduler.add_job(
            run, job.trigger, id=job.name, name=job.name, replace_existing=True, **kwargs
        )

    def every(
        self, name: str, every: timedelta, func: Callable[[], object], *, run_now: bool = False
    ) -> None:
        self.add(interval(name, every, func, run_now=run_now))

    def remove(self, name: str) -> None:
        if self._scheduler.get_job(name):
            self._scheduler.remove_job(name)
        self.last_success.pop(name, None)  # a removed watch's jobs leave `ckptd status`

    def jobs(self) -> list[str]:
        return [j.id for j in self._scheduler.get_jobs()]

    def start(self) -> None:
        self._scheduler.start()

    def running(self) -> bool:
        return bool(self._scheduler.running)

    def shutdown(self) -> None:
        """Stop scheduling; a job still running is not waited for here (the daemon's stop joins
        what it can within its grace, and a stuck job must not hold the exit forever)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
