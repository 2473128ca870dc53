"""Evaluate every complete checkpoint exactly once, in a warm TensorFlow worker.

Unlike ``tf.train.checkpoints_iterator``, nothing is skipped: each complete checkpoint of a watch
with ``[watch.evaluate]`` gets an ``evaluations`` row (``pending``), and one thread works the
queue oldest- or newest-first. A failure is retried with exponential backoff up to
``max_attempts``, then stays ``failed`` with its error, visible in ``ls`` and ``events``. A
``meta_graph`` evaluation waits for the ``.meta`` that TF1's Saver writes after the state file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, insert, or_, select, update

from ckptd.config import Config, EvaluateConfig, WatchConfig
from ckptd.core.model import COMPLETE, Checkpoint, utcnow
from ckptd.daemon import metrics as prom
from ckptd.store import queries
from ckptd.store.db import rowcount, session_scope
from ckptd.store.tables import ActionRow, CheckpointRow, EvaluationRow, MetricRow, RunRow
from ckptd.store.upsert import upsert
from ckptd.worker.client import WorkerClient, WorkerError, terminate_group, worker_env

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
NEEDS_WORKER = ("meta_graph", "keras", "python")


@dataclass
class EvalOutcome:
    checkpoint: str
    status: str
    metrics: dict[str, float]
    error: str | None
    seconds: float


def build_request(ev: EvaluateConfig, c: Checkpoint, run_path: str) -> dict[str, Any]:
    """The worker request for one checkpoint (also used by benchmarks and the CLI)."""
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
    return request


def run_command(ev: EvaluateConfig, c: Checkpoint, run_name: str) -> dict[str, float]:
    """The ``command`` evaluator: an argv template, JSON object of numbers on stdout."""
    values = {
        "checkpoint": c.prefix,
        "step": "" if c.step is None else str(c.step),
        "run": run_name,
    }
    argv = [arg.format(**values) for arg in ev.command]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=worker_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=ev.timeout.total_seconds())
    except subprocess.TimeoutExpired:
        terminate_group(proc)  # type: ignore[arg-type]
        raise WorkerError(
            "timeout", f"{argv[0]} did not finish within {ev.timeout}; killed it"
        ) from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise WorkerError("tf_error", f"{argv[0]} exited with status {proc.returncode}: {tail[0]}")
    try:
        data = json.loads(out)
        return {str(k): float(v) for k, v in data.items()}
    except (ValueError, TypeError, AttributeError):
        raise WorkerError(
            "bad_request", f"{argv[0]} must print one JSON object of numbers, got {out[:200]!r}"
        ) from None


class Evaluator:
    """Owns the evaluation queue and the warm worker; one evaluation at a time."""

    def __init__(self, engine: Engine, config: Config, client: WorkerClient | None = None) -> None:
        self.engine = engine
        self.config = config
        self.client = client or WorkerClient()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.on_done: Callable[[int], None] | None = None

    # ------------------------------------------------------------ queue

    def _watch_of(self, watch_path: str) -> WatchConfig | None:
        for w in self.config.watches:
            if (
                str(w.path) == watch_path
                and w.evaluate is not None
                and w.evaluate.evaluator != "tfevents"
            ):
                return w
        return None

    def enqueue(self, checkpoint_ids: list[int] | None = None, *, new: bool = False) -> int:
        """Give complete checkpoints without an evaluation a ``pending`` one (all when None).

        ``new``: called as checkpoints are recorded; only watches with ``on_new`` take them.
        """
        watched = [
            str(w.path)
            for w in self.config.watches
            if self._watch_of(str(w.path)) and (not new or (w.evaluate and w.evaluate.on_new))
        ]
        if not watched:
            return 0
        with session_scope(self.engine) as s:
            stmt = (
                select(CheckpointRow.id)
                .join(RunRow, RunRow.id == CheckpointRow.run_id)
                .outerjoin(EvaluationRow, EvaluationRow.checkpoint_id == CheckpointRow.id)
                .where(
                    CheckpointRow.state == COMPLETE,
                    RunRow.watch_path.in_(watched),
                    EvaluationRow.id.is_(None),
                )
            )
            if checkpoint_ids is not None:
                stmt = stmt.where(CheckpointRow.id.in_(checkpoint_ids))
            ids = list(s.scalars(stmt))
            if ids:
                s.execute(
                    insert(EvaluationRow),
                    [dict(checkpoint_id=i, status=PENDING, attempts=0) for i in ids],
                )
        if ids:
            self._wake.set()
        return len(ids)

    def recover(self) -> int:
        """Evaluations a crash left ``running`` go back to ``pending``."""
        with session_scope(self.engine) as s:
            return int(
                rowcount(
                    s,
                    update(EvaluationRow)
                    .where(EvaluationRow.status == RUNNING)
                    .values(status=PENDING),
                )
            )

    def _next(self) -> tuple[int, Checkpoint, str, WatchConfig] | None:
        now = utcnow()
        with session_scope(self.engine) as s:
            rows = s.execute(
                select(
                    EvaluationRow.id,
                    CheckpointRow.id,
                    RunRow.path,
                    RunRow.watch_path,
                    CheckpointRow.has_meta,
                    CheckpointRow.step,
                )
                .join(CheckpointRow, CheckpointRow.id == EvaluationRow.checkpoint_id)
                .join(RunRow, RunRow.id == CheckpointRow.run_id)
                .where(
                    EvaluationRow.status == PENDING,
                    CheckpointRow.state == COMPLETE,
                    or_(
                        EvaluationRow.next_attempt_at.is_(None),
                        EvaluationRow.next_attempt_at <= now,
                    ),
                )
                .order_by(CheckpointRow.step, CheckpointRow.id)
            ).all()
            candidates = []
            for eid, cid, run_path, watch_path, has_meta, _step in rows:
                watch = self._watch_of(watch_path)
                if watch is None or watch.evaluate is None:
                    continue
                if watch.evaluate.evaluator == "meta_graph" and not has_meta:
                    continue  # TF1 writes .meta after the state file: wait for it
                candidates.append((eid, cid, run_path, watch))
            if not candidates:
                return None
            newest_first = any(
                w.evaluate and w.evaluate.order == "newest" for _, _, _, w in candidates
            )
            eid, cid, run_path, watch = candidates[-1] if newest_first else candidates[0]
            (ckpt,) = queries.checkpoints(s, ids=[cid])
            return eid, ckpt, run_path, watch

    # ------------------------------------------------------------ work

    def run_pending(
        self, stop: threading.Event | None = None, limit: int | None = None
    ) -> list[EvalOutcome]:
        """Evaluate queued checkpoints until the queue is empty (or ``stop``/``limit``)."""
        done: list[EvalOutcome] = []
        with self._lock:
            while (stop is None or not stop.is_set()) and (limit is None or len(done) < limit):
                item = self._next()
                if item is None:
                    break
                done.append(self._evaluate(*item))
        return done

    def serve(self, stop: threading.Event) -> None:
        """The daemon's evaluation thread: sleeps until woken by new checkpoints."""
        while not stop.is_set():
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            try:
                self.run_pending(stop)
            except Exception:
                log.exception("evaluation loop error; retrying shortly")
                stop.wait(5)

    def wake(self) -> None:
        self._wake.set()

    def _evaluate(self, eid: int, c: Checkpoint, run_path: str, watch: WatchConfig) -> EvalOutcome:
        ev = watch.evaluate
        assert ev is not None
        started = utcnow()
        with session_scope(self.engine) as s:
            attempts = s.scalar(select(EvaluationRow.attempts).where(EvaluationRow.id == eid)) or 0
            s.execute(
                update(EvaluationRow)
                .where(EvaluationRow.id == eid)
                .values(status=RUNNING, attempts=attempts + 1, started_at=started, error=None)
            )
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        error: str | None = None
        kind = ""
        try:
            if not Path(c.prefix + ".index").exists() and not Path(c.prefix).exists():
                raise WorkerError("not_found", f"{c.prefix} no longer exists (pruned or deleted)")
            if ev.evaluator == "command":
                metrics = run_command(ev, c, c.run)
            else:
                result = self.client.call(
                    build_request(ev, c, run_path), timeout=ev.timeout.total_seconds()
                )
                metrics = {str(k): float(v) for k, v in dict(result.get("metrics", {})).items()}
        except WorkerError as exc:
            error, kind = str(exc), exc.kind
        seconds = time.perf_counter() - t0
        if kind == "stopping":  # daemon shutdown: stays 'running', re-queued at the next start
            return EvalOutcome(c.label, RUNNING, {}, error, seconds)
        now = utcnow()
        with session_scope(self.engine) as s:
            if error is None:
                upsert(
                    s,
                    MetricRow,
                    [
                        dict(
                            checkpoint_id=c.id,
                            name=k,
                            value=None if v != v else v,
                            step=c.step,
                            source="evaluator",
                            recorded_at=now,
                        )
                        for k, v in metrics.items()
                    ],
                    keys=("checkpoint_id", "name", "source"),
                    update=("value", "step", "recorded_at"),
                )
                status = DONE
                s.execute(
                    update(EvaluationRow)
                    .where(EvaluationRow.id == eid)
                    .values(status=DONE, duration_s=seconds, finished_at=now, next_attempt_at=None)
                )
                s.execute(
                    insert(ActionRow).values(
                        at=now,
                        kind="evaluated",
                        run_id=c.run_id,
                        checkpoint_id=c.id,
                        subject=c.prefix,
                        reason=None,
                        detail={
                            "step": c.step,
                            "metrics": {k: (None if v != v else v) for k, v in metrics.items()},
                            "seconds": round(seconds, 4),
                        },
                    )
                )
            else:
                final = kind == "not_found" or attempts + 1 >= ev.max_attempts
                status = FAILED if final else PENDING
                retry_at = None if final else now + ev.retry_backoff * (2**attempts)
                s.execute(
                    update(EvaluationRow)
                    .where(EvaluationRow.id == eid)
                    .values(
                        status=status,
                        error=error,
                        duration_s=seconds,
                        finished_at=now,
                        next_attempt_at=retry_at,
                    )
                )
                s.execute(
                    insert(ActionRow).values(
                        at=now,
                        kind="evaluation_failed",
                        run_id=c.run_id,
                        checkpoint_id=c.id,
                        subject=c.prefix,
                        reason=error,
                        detail={"attempt": attempts + 1, "final": final, "kind": kind},
                    )
                )
                log.warning(
                    "evaluating %s failed (attempt %d%s): %s",
                    c.label,
                    attempts + 1,
                    ", giving up" if final else f", retry at {retry_at}",
                    error,
                )
        prom.evaluation(status, seconds)
        if error is None and self.on_done:
            self.on_done(c.id)
        return EvalOutcome(c.label, status, metrics, error, seconds)

    def pending_count(self) -> int:
        with session_scope(self.engine) as s:
            return len(
                s.scalars(
                    select(EvaluationRow.id).where(and_(EvaluationRow.status == PENDING))
                ).all()
            )

    def close(self) -> None:
        self.client.close()
