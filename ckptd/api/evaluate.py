"""Evaluate every complete checkpoint exactly once, in a warm TensorFlow worker.

Unlike ``tf.train.checkpoints_iterator``, nothing is skipped: each complete checkpoint of a watch
with ``[watch.evaluate]`` gets an ``evaluations`` row (``pending``), and jobs are worked oldest-
or newest-first. Each job is claimed first (``store/evaluations``), by the daemon and by
``ckptd evaluate`` alike, so no checkpoint is evaluated twice however many processes work the
queue. A failure is retried with exponential backoff up to ``max_attempts``, then stays
``failed`` with its error, visible in ``ls`` and ``events``. A ``meta_graph`` evaluation waits
for the ``.meta`` that TF1's Saver writes after the state file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ckptd.api import objstores
from ckptd.api.evaluate_command import run_command
from ckptd.api.localcopy import CopyFailed, local_checkpoint
from ckptd.api.renewal import Renewal
from ckptd.api.targets import NotConfigured, Target
from ckptd.config import Config, EvaluateConfig, WatchConfig
from ckptd.core import backoff
from ckptd.core.model import COMPLETE, Checkpoint, iso, utcnow
from ckptd.io.objstore import is_object_url
from ckptd.store import evaluation_reads, evaluations
from ckptd.store.evaluation_reads import Waiting
from ckptd.store.evaluations import DONE, FAILED, PENDING, Candidate, Job
from ckptd.store.handle import Store
from ckptd.worker.client import WorkerClient, WorkerError

log = logging.getLogger(__name__)

# A claim outlives its holder by at most this long; it is renewed every third of it.
CLAIM_TTL = timedelta(seconds=60)
LOST = "lost"  # the claim expired mid-evaluation and another process took the job over


class NotEvaluable(Exception):
    """The named checkpoint cannot be evaluated (it is gone, pruned, corrupt …); says why."""


@dataclass
class EvalOutcome:
    checkpoint: str
    status: str  # done | failed | pending (failed, retried at retry_at) | lost
    metrics: dict[str, float]
    error: str | None
    seconds: float
    retry_at: datetime | None = None

    @property
    def failed(self) -> bool:
        """This attempt failed (whether or not it is retried later)."""
        return self.error is not None and self.status in (FAILED, PENDING)

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "status": self.status,
            "metrics": self.metrics,
            "error": self.error,
            "seconds": self.seconds,
            "retry_at": iso(self.retry_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalOutcome:
        retry_at = data.get("retry_at")
        return cls(
            str(data["checkpoint"]),
            str(data["status"]),
            {str(k): float(v) for k, v in dict(data.get("metrics") or {}).items()},
            data.get("error"),
            float(data.get("seconds") or 0.0),
            datetime.fromisoformat(retry_at) if retry_at else None,
        )


def waiting_json(w: Waiting) -> dict[str, Any]:
    return {
        "checkpoint": w.checkpoint,
        "retry_at": iso(w.retry_at),
        "attempts": w.attempts,
        "error": w.error,
    }


def waiting_from_json(data: dict[str, Any]) -> Waiting:
    return Waiting(
        str(data["checkpoint"]),
        datetime.fromisoformat(str(data["retry_at"])),
        int(data.get("attempts") or 0),
        data.get("error"),
    )


@dataclass
class Evaluation:
    """What ``ckptd evaluate`` does: how many are queued, their outcomes as they come, and the
    jobs of a run that wait out their retry backoff (not evaluated now)."""

    total: int
    outcomes: Iterator[EvalOutcome]
    waiting: list[Waiting] = field(default_factory=list)


def build_request(
    ev: EvaluateConfig, c: Checkpoint, run_path: str, keras_model: str | None = None
) -> dict[str, Any]:
    """The worker request for one checkpoint (also used by benchmarks). ``keras_model``: the
    watch's architecture for weights-only Keras checkpoints."""
    request: dict[str, Any] = {
        "op": "evaluate",
        "evaluator": ev.evaluator,
        "checkpoint": c.prefix,
        "run": run_path,
        "step": c.step,
    }
    if ev.evaluator in ("meta_graph", "keras"):
        request.update(data=str(ev.data), feed=dict(ev.feed) or None, batch_size=ev.batch_size)
    if ev.evaluator == "meta_graph":
        request.update(fetch=dict(ev.fetch), use_ema=ev.use_ema)
    if ev.evaluator == "python":
        request["function"] = ev.function
    if ev.evaluator == "keras" and keras_model:
        request["model"] = keras_model
    return request


class Evaluator:
    """Works the evaluation queue of the watches ``config`` evaluates, in one warm worker.

    ``run_ids``/``checkpoint_ids`` narrow every step (enqueue, claim, count) to some runs or
    checkpoints: ``ckptd evaluate RUN`` touches only RUN's.
    """

    def __init__(
        self,
        store: Store,
        config: Config,
        client: WorkerClient | None = None,
        *,
        claim_ttl: timedelta = CLAIM_TTL,
    ) -> None:
        self.store = store
        self.config = config
        objstores.configure(config.watches)
        self.client = client or WorkerClient()
        self.claim_ttl = claim_ttl  # a `ckptd worker`'s is its [worker] claim_ttl
        self.current: tuple[Job, datetime] | None = None  # the job being evaluated, since when
        self._lock = threading.Lock()  # one evaluation at a time per worker

    def _evaluated(self, *, new: bool = False) -> dict[str, WatchConfig]:
        """The watches with an evaluator, by path (``new``: those that take new checkpoints)."""
        return {
            str(w.path): w
            for w in self.config.watches
            if w.evaluate is not None
            and w.evaluate.evaluator != "tfevents"
            and (not new or w.evaluate.on_new)
        }

    def enqueue(
        self,
        checkpoint_ids: Collection[int] | None = None,
        *,
        new: bool = False,
        run_ids: Collection[int] | None = None,
    ) -> int:
        """Give complete checkpoints without an evaluation a ``pending`` one (all when None).

        ``new``: called as checkpoints are recorded; only watches with ``on_new`` take them.
        """
        return evaluations.enqueue(
            self.store,
            list(self._evaluated(new=new)),
            run_ids=run_ids,
            checkpoint_ids=checkpoint_ids,
        )

    def requeue(
        self,
        checkpoint_ids: Collection[int] | None = None,
        *,
        run_ids: Collection[int] | None = None,
    ) -> int:
        """Evaluate these again (``--again``); one being evaluated right now is left to it."""
        return evaluations.requeue(self.store, run_ids=run_ids, checkpoint_ids=checkpoint_ids)

    def recover(self) -> int:
        """Jobs left ``running`` by a process that has exited go back to the queue."""
        return evaluations.release_gone(self.store)

    def pending_count(
        self,
        checkpoint_ids: Collection[int] | None = None,
        *,
        run_ids: Collection[int] | None = None,
    ) -> int:
        return evaluation_reads.pending_count(
            self.store, run_ids=run_ids, checkpoint_ids=checkpoint_ids
        )

    def _next(
        self, run_ids: Collection[int] | None, checkpoint_ids: Collection[int] | None
    ) -> tuple[Job, WatchConfig] | None:
        """Claim the next job; a job another process claims first is skipped for the next."""
        while True:
            watches = self._evaluated()
            ready: list[Candidate] = []
            for cand in evaluations.candidates(
                self.store, list(watches), run_ids=run_ids, checkpoint_ids=checkpoint_ids
            ):
                ev = watches[cand.watch_path].evaluate
                assert ev is not None
                if ev.evaluator == "meta_graph" and not cand.has_meta:
                    continue  # TF1 writes .meta after the state file: wait for it
                ready.append(cand)
            if not ready:
                return None
            newest = {p for p, w in watches.items() if w.evaluate and w.evaluate.order == "newest"}
            newest_first = any(c.watch_path in newest for c in ready)
            for cand in reversed(ready) if newest_first else ready:
                job = evaluations.claim(self.store, cand.evaluation_id, ttl=self.claim_ttl)
                if job is not None:
                    return job, watches[cand.watch_path]
            # Every one was claimed by another process meanwhile: look again.

    def run_pending(
        self,
        stop: threading.Event | None = None,
        limit: int | None = None,
        *,
        run_ids: Collection[int] | None = None,
        checkpoint_ids: Collection[int] | None = None,
    ) -> list[EvalOutcome]:
        """Evaluate queued checkpoints until none is left to claim (or ``stop``/``limit``)."""
        done: list[EvalOutcome] = []
        with self._lock:
            while (stop is None or not stop.is_set()) and (limit is None or len(done) < limit):
                item = self._next(run_ids, checkpoint_ids)
                if item is None:
                    break
                done.append(self._evaluate(*item))
        return done

    def _evaluate(self, job: Job, watch: WatchConfig) -> EvalOutcome:
        ev, c = watch.evaluate, job.checkpoint
        assert ev is not None
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        error: str | None = None
        kind = ""
        renewal = Renewal(
            lambda: evaluations.renew(self.store, job, ttl=self.claim_ttl),
            self.claim_ttl,
            "ckptd-renew-evaluation",
        )
        self.current = (job, utcnow())
        with renewal:
            try:
                if not is_object_url(c.prefix) and not _exists(c.prefix):
                    raise WorkerError(
                        "not_found", f"{c.prefix} no longer exists (pruned or deleted)"
                    )
                with local_checkpoint(self.store, c, job.run_path) as local:  # (a copy: objects)
                    here = replace(c, prefix=local.prefix)
                    if ev.evaluator == "command":
                        metrics = run_command(ev, here, c.run)
                    else:
                        result = self.client.call(
                            build_request(ev, here, local.run_dir, watch.keras_model),
                            timeout=ev.timeout.total_seconds(),
                        )
                        got = dict(result.get("metrics", {}))
                        metrics = {str(k): float(v) for k, v in got.items()}
            except WorkerError as exc:
                error, kind = str(exc), exc.kind
            except CopyFailed as exc:
                error, kind = str(exc), "not_found" if exc.gone else ""
            finally:
                self.current = None
        seconds = time.perf_counter() - t0
        if kind == "stopping":  # this process is stopping: the job goes back to the queue
            evaluations.release(self.store, job)
            return EvalOutcome(c.label, PENDING, {}, error, seconds)
        retry_at = None
        if error is None:
            status = DONE
            recorded = evaluations.finish_done(self.store, job, metrics, seconds)
        else:
            retry_at = backoff.retry_at(
                job.attempt,
                ev.max_attempts,
                ev.retry_backoff,
                utcnow(),
                hopeless=kind == "not_found",
            )
            final = retry_at is None
            status = FAILED if final else PENDING
            recorded = evaluations.finish_failed(
                self.store, job, error=error, kind=kind, seconds=seconds, retry_at=retry_at
            )
            if recorded:
                log.warning(
                    "evaluating %s failed (attempt %d%s): %s",
                    c.label,
                    job.attempt,
                    ", giving up" if final else f", retry at {retry_at}",
                    error,
                )
        if not recorded:
            log.warning(
                "evaluation of %s was taken over by another process (this one's claim "
                "expired); its result here is dropped",
                c.label,
            )
            return EvalOutcome(c.label, LOST, {}, "taken over by another process", seconds)
        return EvalOutcome(c.label, status, metrics, error, seconds, retry_at)

    def close(self) -> None:
        self.client.close()


def _exists(prefix: str) -> bool:
    return Path(prefix + ".index").exists() or Path(prefix).exists()


def check(target: Target) -> EvaluateConfig:
    """The evaluator of ``target``'s watch; raises what stands in the way."""
    ev = target.watch.evaluate
    if ev is None or ev.evaluator == "tfevents":
        raise NotConfigured(
            f"run {target.run.name} has no evaluator: add [watch.evaluate] with evaluator = "
            '"meta_graph", "keras", "python" or "command" to the config'
        )
    c = target.checkpoint
    if c is not None and c.state != COMPLETE:
        why = f": {c.reason}" if c.reason else ""
        raise NotEvaluable(
            f"{c.label} is {c.state}{why}; only complete checkpoints can be evaluated "
            f"(list them with `ckptd ls {target.run.name}`)"
        )
    return ev


def start(
    evaluator: Evaluator,
    target: Target,
    *,
    again: bool = False,
    stop: threading.Event | None = None,
) -> Evaluation:
    """``ckptd evaluate``, in this process or in the daemon: the target checkpoint now (even
    while it waits out a retry backoff), or the run's not-yet-evaluated ones (all of them with
    ``again``), and nothing of any other run."""
    check(target)
    scope: dict[str, Any] = (
        {"checkpoint_ids": [target.checkpoint.id]}
        if target.checkpoint
        else {"run_ids": [target.run.id]}
    )
    if again or target.checkpoint:
        evaluator.requeue(**scope)
    evaluator.enqueue(**scope)
    waiting = evaluation_reads.waiting(evaluator.store, **scope)

    def outcomes() -> Iterator[EvalOutcome]:
        while batch := evaluator.run_pending(stop, limit=1, **scope):
            yield from batch

    return Evaluation(evaluator.pending_count(**scope) - len(waiting), outcomes(), waiting)


def evaluate(store: Store, config: Config, target: Target, *, again: bool = False) -> Evaluation:
    """:func:`start` in a worker of this process's own (closed when the outcomes end)."""
    check(target)
    evaluator = Evaluator(store, config)
    evaluation = start(evaluator, target, again=again)

    def outcomes(started: Iterator[EvalOutcome]) -> Iterator[EvalOutcome]:
        try:
            yield from started
        finally:
            evaluator.close()

    evaluation.outcomes = outcomes(evaluation.outcomes)
    return evaluation
