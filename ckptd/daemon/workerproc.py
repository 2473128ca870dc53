"""``ckptd worker``: no watching; claims evaluation and export jobs from the database and does
them in warm TensorFlow workers, so evaluation runs on GPU hosts while the daemons stay small.

The queue is the daemons': ``evaluations`` rows (queued as checkpoints are recorded) and the
``requests`` rows of ``ckptd evaluate``/``freeze`` and of daemons' scheduled exports
(``evaluate_on = "workers"``). Each of ``[worker] concurrency`` slots has its own TensorFlow
worker subprocess and works one job at a time under a claim it renews; a worker killed
mid-job leaves a claim that expires, and another worker (or daemon) then does the job. Results
are written only while the claim is still this worker's. The main thread handles signals and
writes the heartbeat (``daemons`` row, role ``worker``) with the jobs in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Collection
from typing import Any

from ckptd import __version__
from ckptd.api.evaluate import Evaluator
from ckptd.api.freeze import Freezer
from ckptd.config import Config
from ckptd.core.errors import StoreError
from ckptd.core.model import iso
from ckptd.daemon.evaluate import EvaluationLoop
from ckptd.daemon.notify import notify, watchdog_interval
from ckptd.daemon.requests import RequestServer
from ckptd.store import daemons, migrate, requests
from ckptd.store.handle import Store
from ckptd.worker.client import WorkerClient

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds a stop waits for each slot to release its job
REQUEST_KINDS = {"evaluate": requests.EVALUATE, "export": requests.FREEZE}


class Slot:
    """One warm TensorFlow worker and the loop that feeds it jobs."""

    def __init__(self, worker: WorkerProcess, index: int) -> None:
        cfg = worker.config.worker
        self.client = WorkerClient()
        self.evaluator = Evaluator(
            worker.store, worker.served, self.client, claim_ttl=cfg.claim_ttl
        )
        self.freezer = Freezer(worker.store, self.client)
        self.requests = RequestServer(
            worker.store,
            worker.config.daemon.database,
            self.evaluator,
            self.freezer,
            kinds=[REQUEST_KINDS[k] for k in cfg.kinds],
            runs=worker.run_ids,
            ttl=cfg.claim_ttl,
        )
        # Without "evaluate" in its kinds, the backlog of evaluations is no run's to work.
        backlog = None if "evaluate" in cfg.kinds else (lambda: ())
        self.loop = EvaluationLoop(self.evaluator, self.requests, runs=backlog)
        self.thread = threading.Thread(
            target=self.loop.serve,
            args=(worker.stop_event,),
            name=f"ckptd-slot-{index}",
            daemon=True,
        )

    def job(self) -> dict[str, Any] | None:
        """What this slot works on now, as the status JSON shows it."""
        evaluating, request = self.evaluator.current, self.requests.current
        if evaluating is not None:
            job, since = evaluating
            return {
                "kind": "evaluate",
                "run": job.checkpoint.run,
                "checkpoint": job.checkpoint.prefix,
                "since": iso(since),
            }
        if request is not None:
            claimed, since = request
            return {
                "kind": "export" if claimed.kind == requests.FREEZE else "evaluate",
                "run": claimed.run.name,
                "checkpoint": claimed.checkpoint.prefix if claimed.checkpoint else None,
                "since": iso(since),
            }
        return None


class WorkerProcess:
    def __init__(self, config: Config) -> None:
        self.config = config
        served = config.worker.watches
        self.served = dataclasses.replace(
            config,
            watches=tuple(w for w in config.watches if served is None or w.path in served),
        )
        self.store = Store.open(config.daemon.database, recreate=False)
        self.stop_event = threading.Event()
        self.worker_id: int | None = None
        self.slots: list[Slot] = []

    def run_ids(self) -> Collection[int]:
        """The runs of the served watches (asked only when a request waits)."""
        return requests.runs_of(self.store, [str(w.path) for w in self.served.watches])

    def status(self) -> dict[str, Any]:
        cfg = self.config.worker
        return {
            "state": "running",
            "heartbeat_interval": self.config.daemon.heartbeat_interval.total_seconds(),
            "serves": {
                "watches": [str(w.path) for w in self.served.watches],
                "kinds": list(cfg.kinds),
            },
            "concurrency": cfg.concurrency,
            "jobs": [job for slot in self.slots if (job := slot.job()) is not None],
        }

    def prepare(self) -> None:
        """Upgrade the schema as a daemon would (serialised with theirs), register, and put
        jobs left by this host's exited processes back in the queue."""
        try:
            migrate.ensure_store_schema(self.store)
        except Exception as exc:
            raise SystemExit(
                f"ckptd: cannot migrate the database {self.config.daemon.database}: {exc}. "
                "Run `ckptd db upgrade` to see the details."
            ) from exc
        try:
            self.worker_id = daemons.claim(
                self.store,
                name=self.config.worker.name,
                version=__version__,
                config=self.config.source,
                status=self.status(),
                role=daemons.WORKER,
            )
        except daemons.AlreadyRunning as exc:
            raise SystemExit(
                f"ckptd: refusing to start: {exc}".replace("[daemon] name", "[worker] name")
            ) from None
        except StoreError as exc:
            raise SystemExit(f"ckptd: cannot register this worker: {exc}") from None
        self.slots = [Slot(self, i) for i in range(self.config.worker.concurrency)]
        if self.slots[0].evaluator.recover():
            log.info("re-queued evaluations of processes that have exited")
        self.slots[0].freezer.recover(self.served.watches)

    def run(self) -> int:
        """Work until SIGTERM/SIGINT; the exit status."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._hup)
        self.prepare()
        cfg = self.config.worker
        log.info(
            "worker %r serving %s (%s) with %d TensorFlow worker(s)",
            cfg.name,
            ", ".join(str(w.path) for w in self.served.watches) or "no watch",
            ", ".join(cfg.kinds),
            cfg.concurrency,
        )
        for slot in self.slots:
            slot.thread.start()
        notify("READY=1", f"STATUS=serving {len(self.served.watches)} watch(es)")
        interval = self.config.daemon.heartbeat_interval.total_seconds()
        wd = watchdog_interval()
        while not self.stop_event.wait(min(interval, wd or interval)):
            self._heartbeat()
        notify("STOPPING=1")
        return self.shutdown()

    def _stop(self, signum: int, _frame: Any) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        self.stop_event.set()

    def _hup(self, _signum: int, _frame: Any) -> None:
        log.warning("SIGHUP: a worker reads its config at start only; restart it to apply changes")

    def _heartbeat(self) -> None:
        status = self.status()
        jobs = status["jobs"]
        line = ", ".join(f"{j['kind']} of {j['checkpoint'] or j['run']}" for j in jobs) or "idle"
        try:
            daemons.heartbeat(self.store, self.worker_id, status)
        except StoreError as exc:
            # The database is away: claims lapse and others redo the jobs. The watchdog is still
            # pinged: a restart would not bring the database back, and would use up the unit's
            # start limit during a long outage.
            log.warning("heartbeat failed (retrying): %s", exc)
            line = f"database unreachable: {exc}"
        notify(f"STATUS={line}", "WATCHDOG=1")

    def shutdown(self) -> int:
        """Stop the TF workers (a job in hand goes back to the queue), mark this worker stopped."""
        self.stop_event.set()
        for slot in self.slots:
            slot.loop.wake()
            slot.client.terminate()
        stuck = False
        for slot in self.slots:
            if slot.thread.is_alive():
                slot.thread.join(STOP_GRACE)
                stuck = stuck or slot.thread.is_alive()
        if self.worker_id is not None:
            try:
                daemons.mark_stopped(self.store, self.worker_id)
            except StoreError as exc:
                log.error("could not mark this worker stopped: %s", exc)
        for slot in self.slots:
            slot.requests.close()
        self.store.close()
        log.info("stopped")
        return 1 if stuck else 0
