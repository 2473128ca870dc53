"""Reconcile: the daemon's side of recording (``api/record.py``) — run specs in, logs out.

Filesystem events only say "look at run R again"; recording is the truth. It is idempotent, so a
dropped event costs latency (until the periodic full rescan), never a checkpoint, and a restart
is just a full reconcile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

from ckptd.api.record import Leases, Outcome, Recorder
from ckptd.core.recording import Observation, RunDir
from ckptd.daemon import metrics
from ckptd.daemon.runs import RunSpec
from ckptd.io.observe import STALE_AFTER, ObservePool, Request, observe
from ckptd.store.handle import Store

log = logging.getLogger(__name__)

__all__ = ["Outcome", "Reconciler", "run_dir"]


def run_dir(spec: RunSpec) -> RunDir:
    w = spec.watch
    if spec.url is not None:  # an object store run: recorded by its URL and its watch's
        return RunDir(
            spec.name,
            spec.path,
            spec.path,
            w.keras_template,
            w.step_variable,
            spec.url,
            str(w.path),
        )
    return RunDir(spec.name, spec.path, w.local_path, w.keras_template, w.step_variable)


class Reconciler:
    """Records runs through one :class:`Recorder` and logs what each reconcile changed."""

    def __init__(
        self, store: Store, *, stale_after: float = STALE_AFTER, leases: Leases | None = None
    ) -> None:
        self.recorder = Recorder(store, stale_after=stale_after, leases=leases)

    def register(self, specs: list[RunSpec]) -> int:
        """Load (or create) every run's state at once before a scan of them; how many were new."""
        return self.recorder.prepare([run_dir(s) for s in specs])

    def unchanged(self, spec: RunSpec) -> bool:
        """Whether a quick rescan may skip ``spec``."""
        return self.changed([spec]) == []

    def changed(self, specs: list[RunSpec]) -> list[RunSpec]:
        """The runs a quick rescan must look at (the others are unchanged since last seen)."""
        same = self.recorder.unchanged([run_dir(s) for s in specs])
        return [s for s, skip in zip(specs, same, strict=True) if not skip]

    def observe_all(
        self, specs: list[RunSpec], workers: int = 1, *, prefetched: ObservePool | None = None
    ) -> Iterator[Observation | None]:
        return self.recorder.observe_all(
            [run_dir(s) for s in specs], workers, prefetched=prefetched
        )

    def reconcile(
        self,
        spec: RunSpec,
        observation: Observation | None = None,
        observer: Callable[[Request], Observation] = observe,
    ) -> Outcome:
        """Bring the database in line with ``spec``'s directory; ``observation``: what a worker
        saw (``observe_all``), used only if nothing was written for this run since;
        ``observer``: how the run is looked at (an object store run: its listing)."""
        outcome = self.recorder.record(run_dir(spec), observation, observer=observer)
        if outcome.written_at:
            committed = time.time()
            metrics.detection_latency([committed - t for t in outcome.written_at])
        if len(outcome.recorded) > 20:  # a backfill: one line per run, not per checkpoint
            log.info("recorded %d checkpoints of %s", len(outcome.recorded), spec.name)
        else:
            for name in outcome.recorded:
                log.info("recorded %s", name)
        for name in outcome.corrupt:
            log.warning("corrupt checkpoint %s", name)
        return outcome

    def reconcile_many(self, specs: Iterable[RunSpec], workers: int = 1) -> list[Outcome]:
        """Reconcile ``specs``; with ``workers`` > 1, observed in that many processes."""
        specs = list(specs)
        self.register(specs)
        if workers <= 1:
            return [self.reconcile(s) for s in specs]
        return [
            self.reconcile(s, o)
            for s, o in zip(specs, self.observe_all(specs, workers), strict=True)
        ]
