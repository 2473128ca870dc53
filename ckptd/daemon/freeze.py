"""Export the best checkpoint of each run, verified, in the layout TensorFlow Serving loads.

``export_dir/<version>/`` (``export_dir/<run>/<version>/`` when the watch has many runs), version =
step. The worker writes into a hidden ``.ckptd-tmp-*`` directory and fsyncs it; the export is then
verified there (loaded and run against the checkpoint's own outputs) and only then renamed to its
numeric name, so TF Serving never sees a partial or unverified model (serving#1086). An
``exporting`` row is the intent: after a crash the temp dir is removed and the export redone.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update

from ckptd.config import WatchConfig
from ckptd.core import retention
from ckptd.core.model import Checkpoint, Run, utcnow
from ckptd.core.ranking import select_best
from ckptd.daemon import metrics
from ckptd.io import fsops
from ckptd.store import queries
from ckptd.store.db import insert_id, rowcount, session_scope
from ckptd.store.tables import ActionRow, ExportRow
from ckptd.worker.client import WorkerClient, WorkerError

log = logging.getLogger(__name__)

TMP_PREFIX = ".ckptd-tmp-"


@dataclass
class ExportOutcome:
    run: str
    checkpoint: str | None
    status: str  # published | unchanged | skipped | failed
    path: str | None = None
    verified: bool = False
    message: str = ""
    seconds: float = 0.0


def export_root(watch: WatchConfig, run: Run) -> Path:
    assert watch.freeze is not None
    return watch.freeze.export_dir / run.name if watch.runs else watch.freeze.export_dir


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Freezer:
    def __init__(self, engine: Engine, client: WorkerClient | None = None) -> None:
        self.engine = engine
        self.client = client or WorkerClient()

    def recover(self, watches: tuple[WatchConfig, ...]) -> int:
        """After a crash: drop half-written temp dirs, mark interrupted exports failed (redone)."""
        with session_scope(self.engine) as s:
            # The rename to the numeric name happens only after verification: an "exporting" row
            # whose directory exists was published and verified; only its commit was lost.
            for eid, path in s.execute(
                select(ExportRow.id, ExportRow.path).where(ExportRow.status == "exporting")
            ).all():
                if Path(path).is_dir():
                    s.execute(
                        update(ExportRow)
                        .where(ExportRow.id == eid)
                        .values(status="published", verified=True)
                    )
            # And a retired export whose removal was not committed: its directory is gone.
            for eid, path in s.execute(
                select(ExportRow.id, ExportRow.path).where(ExportRow.status == "published")
            ).all():
                if not Path(path).exists():
                    s.execute(
                        update(ExportRow)
                        .where(ExportRow.id == eid)
                        .values(status="removed", removed_at=utcnow())
                    )
            n = rowcount(
                s,
                update(ExportRow)
                .where(ExportRow.status == "exporting")
                .values(
                    status="failed",
                    error="interrupted (daemon stopped during the export); will be redone",
                ),
            )
        for w in watches:
            if w.freeze is None or not w.freeze.export_dir.is_dir():
                continue
            roots = [w.freeze.export_dir]
            if w.runs:
                roots += [
                    p for p in w.freeze.export_dir.iterdir() if p.is_dir() and not p.is_symlink()
                ]
            for root in roots:
                for p in root.iterdir():
                    if p.name.startswith(TMP_PREFIX):
                        try:
                            fsops.remove_tree(root, p.name)
                            log.info("removed interrupted export %s", p)
                        except (OSError, fsops.UnsafePath) as exc:
                            log.warning("could not remove %s: %s", p, exc)
        return int(n)

    def freeze_run(
        self,
        run: Run,
        watch: WatchConfig,
        checkpoint: Checkpoint | None = None,
        *,
        force: bool = False,
    ) -> ExportOutcome:
        """Export ``checkpoint``, or the run's current best if it is not exported yet."""
        fr = watch.freeze
        assert fr is not None
        with session_scope(self.engine) as s:
            history = queries.checkpoints(s, run_id=run.id)
            published = {
                cid: path
                for cid, path in s.execute(
                    select(ExportRow.checkpoint_id, ExportRow.path).where(
                        ExportRow.status == "published"
                    )
                )
            }
        target = checkpoint
        if target is None:
            if not watch.best.metric:
                return ExportOutcome(
                    run.name, None, "skipped", message="no [watch.best] metric configured"
                )
            target = select_best(history, watch.best.metric, watch.best.mode)
            if target is None:
                return ExportOutcome(
                    run.name,
                    None,
                    "skipped",
                    message=f"no checkpoint has a value for {watch.best.metric} yet",
                )
        if target.id in published and not force:
            return ExportOutcome(
                run.name,
                target.label,
                "unchanged",
                published[target.id],
                True,
                "the best is already exported",
            )
        if target.format == "tf1" and not target.has_meta:
            return ExportOutcome(
                run.name, target.label, "skipped", message="waiting for its .meta file"
            )
        root = export_root(watch, run)
        version = target.step if target.step is not None else target.id
        final = root / str(version)
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        formats = "+".join(fr.format)
        with session_scope(self.engine) as s:  # the intent
            export_id = insert_id(
                s,
                insert(ExportRow).values(
                    checkpoint_id=target.id,
                    format=formats,
                    version=version,
                    path=str(final),
                    status="exporting",
                    verified=False,
                    created_at=utcnow(),
                ),
            )
        t0 = time.perf_counter()
        try:
            verify = self._write_and_verify(target, watch, tmp)
            if final.exists():
                # Same version already published by an earlier run (e.g. forced re-export).
                fsops.remove_tree(root, final.name)
            os.rename(tmp, final)  # atomic publish: the numeric name appears complete
            _fsync_dir(root)
        except (WorkerError, OSError, fsops.UnsafePath) as exc:
            try:
                fsops.remove_tree(root, tmp.name)
            except (OSError, fsops.UnsafePath):
                log.warning("could not remove %s", tmp)
            return self._failed(export_id, target, run, str(exc), time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        now = utcnow()
        with session_scope(self.engine) as s:
            s.execute(
                update(ExportRow)
                .where(ExportRow.id == export_id)
                .values(status="published", verified=bool(verify.get("verified")))
            )
            s.execute(
                insert(ActionRow).values(
                    at=now,
                    kind="exported",
                    run_id=target.run_id,
                    checkpoint_id=target.id,
                    subject=str(final),
                    reason=f"best by {watch.best.metric}" if checkpoint is None else "requested",
                    detail={
                        "step": target.step,
                        "formats": list(fr.format),
                        "verified": verify.get("verified"),
                        "max_abs_diff": verify.get("max_abs_diff"),
                        "seconds": round(seconds, 3),
                    },
                )
            )
        log.info(
            "exported %s to %s (verified, max diff %s) in %.2f s",
            target.label,
            final,
            verify.get("max_abs_diff"),
            seconds,
        )
        self._retire(run, watch, history)
        metrics.export("published", seconds)
        return ExportOutcome(run.name, target.label, "published", str(final), True, "", seconds)

    def _write_and_verify(self, c: Checkpoint, watch: WatchConfig, tmp: Path) -> dict[str, Any]:
        fr = watch.freeze
        assert fr is not None
        timeout = fr.timeout.total_seconds()
        kind = "keras" if c.format.startswith("keras") else c.format
        for fmt in fr.format:
            self.client.call(
                {
                    "op": "export",
                    "format": fmt,
                    "checkpoint": c.prefix,
                    "kind": kind,
                    "out_dir": str(tmp),
                    "inputs": dict(fr.inputs),
                    "outputs": dict(fr.outputs),
                    "builder": fr.builder,
                    "use_ema": bool(watch.evaluate and watch.evaluate.use_ema),
                },
                timeout=timeout,
            )
        ev = watch.evaluate
        result = self.client.call(
            {
                "op": "verify",
                "export_dir": str(tmp),
                "formats": list(fr.format),
                "checkpoint": c.prefix,
                "kind": kind,
                "inputs": dict(fr.inputs),
                "outputs": dict(fr.outputs),
                "data": str(ev.data) if ev and ev.data else None,
                "feed": dict(ev.feed) if ev and ev.feed else None,
                "tolerance": fr.tolerance,
                "use_ema": bool(ev and ev.use_ema),
            },
            timeout=timeout,
        )
        if not result.get("verified"):
            raise WorkerError(
                "tf_error",
                f"verification failed: the export's outputs differ from the "
                f"checkpoint's by {result.get('max_abs_diff')} (> {fr.tolerance})",
            )
        return result

    def _failed(
        self, export_id: int, c: Checkpoint, run: Run, error: str, seconds: float
    ) -> ExportOutcome:
        with session_scope(self.engine) as s:
            s.execute(
                update(ExportRow)
                .where(ExportRow.id == export_id)
                .values(status="failed", error=error)
            )
            s.execute(
                insert(ActionRow).values(
                    at=utcnow(),
                    kind="export_failed",
                    run_id=c.run_id,
                    checkpoint_id=c.id,
                    subject=c.prefix,
                    reason=error,
                    detail={"step": c.step},
                )
            )
        log.error("exporting %s failed: %s", c.label, error)
        metrics.export("failed", seconds)
        return ExportOutcome(run.name, c.label, "failed", None, False, error, seconds)

    def _retire(self, run: Run, watch: WatchConfig, history: list[Checkpoint]) -> None:
        """Keep the ``keep`` newest published exports of the run, and always the best's."""
        fr = watch.freeze
        assert fr is not None
        best = (
            select_best(history, watch.best.metric, watch.best.mode) if watch.best.metric else None
        )
        with session_scope(self.engine) as s:
            rows = s.execute(
                select(ExportRow.id, ExportRow.checkpoint_id, ExportRow.path)
                .where(
                    ExportRow.status == "published",
                    ExportRow.path.like(f"{export_root(watch, run)}/%"),
                )
                .order_by(ExportRow.created_at.desc(), ExportRow.id.desc())
            ).all()
        published = [retention.Published(*r) for r in reversed(rows)]  # oldest first
        retired = retention.exports_to_retire(
            published, fr.keep, best.id if best else None, utcnow()
        )
        for export in reversed(retired):  # newest first
            eid, path = export.id, export.path
            p = Path(path)
            try:
                fsops.remove_tree(p.parent, p.name)
            except (OSError, fsops.UnsafePath) as exc:
                log.warning("could not remove old export %s: %s", p, exc)
                continue
            with session_scope(self.engine) as s:
                s.execute(
                    update(ExportRow)
                    .where(ExportRow.id == eid)
                    .values(status="removed", removed_at=utcnow())
                )
                s.execute(
                    insert(ActionRow).values(
                        at=utcnow(),
                        kind="export_removed",
                        run_id=run.id,
                        subject=path,
                        reason=f"beyond keep = {fr.keep}",
                        detail={},
                    )
                )

    def close(self) -> None:
        self.client.close()
