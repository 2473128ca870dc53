"""The evaluation thread of a daemon (and of each slot of a ``ckptd worker``): does what `ckptd
evaluate`/`freeze` hand it (``requests.py``) first, then works the queue (``api.evaluate``) as
checkpoints are queued, and every few seconds for retries that have come due (and, in a
worker, for what daemons on other hosts queued). A daemon with ``evaluate_on = "workers"``
only queues: its loop evaluates nothing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from ckptd.api.evaluate import EvalOutcome, Evaluator
from ckptd.daemon import metrics
from ckptd.daemon.requests import REQUEST_POLL, RequestServer
from ckptd.store.db import DatabaseUnreachable

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0


class EvaluationLoop:
    def __init__(
        self,
        evaluator: Evaluator,
        requests: RequestServer | None = None,
        runs: Callable[[], Collection[int]] | None = None,
        *,
        local: bool = True,
    ) -> None:
        self.evaluator = evaluator
        self.requests = requests
        self.runs = runs  # the runs this daemon may evaluate now (its leases); None: all
        self.local = local  # False: evaluations are queued here, done by `ckptd worker`s
        self._wake = threading.Event()

    def enqueue(self, checkpoint_ids: Collection[int] | None = None, *, new: bool = False) -> None:
        run_ids = self.runs() if self.runs is not None else None  # the others' are theirs
        if self.evaluator.enqueue(checkpoint_ids, new=new, run_ids=run_ids):
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _requests(self, stop: threading.Event) -> None:
        if self.requests is not None:
            self.requests.serve_pending(stop)

    def serve(self, stop: threading.Event) -> None:
        """Look for requests every REQUEST_POLL; when woken (or every POLL_SECONDS), evaluate
        whatever can be claimed, one job at a time, looking for requests between two."""
        if not self.local:
            return
        poll = REQUEST_POLL if self.requests is not None else POLL_SECONDS
        next_pass = 0.0
        while not stop.is_set():
            woken = self._wake.wait(timeout=poll)
            try:
                self._requests(stop)
                if not woken and time.monotonic() < next_pass:
                    continue
                self._wake.clear()
                next_pass = time.monotonic() + POLL_SECONDS
                while not stop.is_set() and (done := self._evaluate_one(stop)):
                    for outcome in done:
                        metrics.evaluation(outcome.status, outcome.seconds)
                    self._requests(stop)
            except DatabaseUnreachable:  # the heartbeat reports it; evaluation waits for it
                stop.wait(POLL_SECONDS)
            except Exception:
                log.exception("evaluation loop error; retrying shortly")
                stop.wait(POLL_SECONDS)

    def _evaluate_one(self, stop: threading.Event) -> list[EvalOutcome]:
        if self.runs is None:
            return self.evaluator.run_pending(stop, limit=1)
        held = self.runs()
        return self.evaluator.run_pending(stop, limit=1, run_ids=held) if held else []
