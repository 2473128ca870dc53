"""The daemon's evaluation thread: works the queue (``api.evaluate``) as checkpoints are queued,
and every few seconds for retries that have come due."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection

from ckptd.api.evaluate import Evaluator
from ckptd.daemon import metrics

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0


class EvaluationLoop:
    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self._wake = threading.Event()

    def enqueue(self, checkpoint_ids: Collection[int] | None = None, *, new: bool = False) -> None:
        if self.evaluator.enqueue(checkpoint_ids, new=new):
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def serve(self, stop: threading.Event) -> None:
        """Sleep until woken (or POLL_SECONDS), then evaluate whatever can be claimed."""
        while not stop.is_set():
            self._wake.wait(timeout=POLL_SECONDS)
            self._wake.clear()
            try:
                while not stop.is_set() and (done := self.evaluator.run_pending(stop, limit=1)):
                    for outcome in done:
                        metrics.evaluation(outcome.status, outcome.seconds)
            except Exception:
                log.exception("evaluation loop error; retrying shortly")
                stop.wait(POLL_SECONDS)
