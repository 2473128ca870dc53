"""Periodic jobs with APScheduler 3.x (the only module that imports it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from ckptd.daemon import metrics

log = logging.getLogger(__name__)


class Scheduler:
    """Named interval jobs; a job never overlaps itself and a slow run is not stacked up."""

    def __init__(self, threads: int = 4) -> None:
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(threads)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        self.last_success: dict[str, float] = {}

    def every(
        self, name: str, interval: timedelta, func: Callable[[], object], *, run_now: bool = False
    ) -> None:
        def job() -> None:
            try:
                func()
                self.last_success[name] = time.time()
                metrics.job_succeeded(name, self.last_success[name])
            except Exception:
                log.exception("job %s failed; it will run again in %s", name, interval)

        kwargs = {}
        if run_now:
            from datetime import UTC, datetime

            kwargs["next_run_time"] = datetime.now(UTC)
        self._scheduler.add_job(
            job,
            "interval",
            seconds=max(interval.total_seconds(), 0.05),
            id=name,
            name=name,
            replace_existing=True,
            **kwargs,
        )

    def cron(self, name: str, crontab: str, func: Callable[[], object]) -> None:
        """Run ``func`` on a crontab schedule ("0 * * * *" = hourly), in UTC."""
        from apscheduler.triggers.cron import CronTrigger

        trigger = CronTrigger.from_crontab(crontab, timezone="UTC")

        def job() -> None:
            try:
                func()
                self.last_success[name] = time.time()
                metrics.job_succeeded(name, self.last_success[name])
            except Exception:
                log.exception("job %s failed; it will run again at its next time", name)

        self._scheduler.add_job(job, trigger, id=name, name=name, replace_existing=True)

    def remove(self, name: str) -> None:
        if self._scheduler.get_job(name):
            self._scheduler.remove_job(name)

    def jobs(self) -> list[str]:
        return [j.id for j in self._scheduler.get_jobs()]

    def start(self) -> None:
        self._scheduler.start()

    def running(self) -> bool:
        return bool(self._scheduler.running)

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
