"""Export the best checkpoint of each run, verified, in the layout TensorFlow Serving loads.

``export_dir/<version>/`` (``export_dir/<run>/<version>/`` when the watch has many runs). Serving
serves the highest numeric version, so every publish takes the next version number: when the
best moves back to an older step, it is exported again above the newer, worse one. What each
version is (step, checkpoint, metric) is in its ``assets.extra/ckptd.json`` and in the database.
The worker writes into a hidden ``.ckptd-tmp-*`` directory and fsyncs it; the export is then
verified there (loaded and run against the checkpoint's own outputs) and only then renamed to its
numeric name, so TF Serving never sees a partial or unverified model (serving#1086). An
``exporting`` row is the intent: after a crash the temp dir is removed and the export redone.
An export of a run holds the run's ``FREEZE`` claim, so the daemon and ``ckptd freeze`` never
export one run at the same time (the second one skips it and says why). A failed export is
tried again by the daemon with the backoff of evaluations (``core/backoff``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import ckptd
from ckptd.api import export_recovery, export_retire, objstores
from ckptd.api.exportdest import destination
from ckptd.api.exportdir import TMP_PREFIX, write_manifest
from ckptd.api.localcopy import CopyFailed, local_checkpoint
from ckptd.api.record import Leases
from ckptd.api.renewal import Renewal
from ckptd.api.targets import NotConfigured, Target
from ckptd.config import WatchConfig
from ckptd.core import backoff
from ckptd.core.model import Checkpoint, Run, iso, utcnow
from ckptd.core.ranking import select_best
from ckptd.io import fsops
from ckptd.io.objstore import StoreError
from ckptd.store import claims, exports
from ckptd.store.claims import FREEZE
from ckptd.store.handle import Store
from ckptd.store.leases import Fenced, Hold
from ckptd.worker.client import WorkerClient, WorkerError
from ckptd.worker.protocol import NOT_FOUND, STOPPING

log = logging.getLogger(__name__)

__all__ = ["TMP_PREFIX", "ExportOutcome", "Freezer", "freeze"]  # TMP_PREFIX: api.exportdir


NOT_HELD = "another daemon holds the run's lease now; it exports the run"


class ClaimLost(Exception):
    """This process's claim on the run expired during the export and another one took it."""


@dataclass
class ExportOutcome:
    run: str
    checkpoint: str | None
    status: str  # published | unchanged | skipped | failed
    path: str | None = None
    verified: bool = False
    message: str = ""
    seconds: float = 0.0
    version: int | None = None  # the serving version published (or already serving)


def _busy_message(store: Store, run: Run) -> str:
    held = claims.holder_of(store, run.id, FREEZE)
    who = f"{held[0]} (claim until {held[1]:%Y-%m-%d %H:%M:%S} UTC)" if held else "another process"
    return f"an export of this run is in progress in {who}; try again when it has finished"


def _waiting(store: Store, c: Checkpoint) -> str:
    """Why the daemon does not export ``c`` now: its last export failed and waits for its retry
    (or was the last attempt); "" when it may."""
    last = exports.last_attempt(store, c.id)
    if last is None or last.status != exports.FAILED:
        return ""
    if last.gave_up:
        return (
            f"its export failed {last.attempt} time(s), the last: {last.error}; "
            f"`ckptd freeze {c.label}` tries again"
        )
    if last.next_attempt_at is not None and last.next_attempt_at > utcnow():
        return (
            f"its export failed (attempt {last.attempt}): {last.error}; "
            f"next attempt at {iso(last.next_attempt_at)}"
        )
    return ""


class Freezer:
    def __init__(
        self, store: Store, client: WorkerClient | None = None, leases: Leases | None = None
    ) -> None:
        self.store = store
        self.client = client or WorkerClient()
        self.leases = leases  # None: the only writer (the CLI), no lease to hold

    def recover(
        self, watches: tuple[WatchConfig, ...], run_ids: Collection[int] | None = None
    ) -> int:
        """After a crash: see :func:`ckptd.api.export_recovery.recover`."""
        holds = self.leases.current if self.leases is not None else None
        return export_recovery.recover(self.store, watches, run_ids, holds)

    # ------------------------------------------------------------ export

    def freeze_run(
        self,
        run: Run,
        watch: WatchConfig,
        checkpoint: Checkpoint | None = None,
        *,
        force: bool = False,
        honour_backoff: bool = False,
    ) -> ExportOutcome:
        """Export ``checkpoint``, or the run's current best unless it is the version Serving
        serves already; skipped while another process exports the run, and (``honour_backoff``,
        the daemon) while a failed export of it waits for its retry, and while another daemon
        holds the run's lease."""
        objstores.configure([watch])
        hold = self.leases.current(run.id) if self.leases is not None else None
        if self.leases is not None and hold is None:
            return ExportOutcome(run.name, None, "skipped", message=NOT_HELD)
        # A daemon takes over the claim of another daemon that lost the run's lease.
        owner = hold.owner if hold is not None else None
        if not claims.claim(self.store, run.id, FREEZE, lease_owner=owner) and not (
            claims.release_gone(self.store, FREEZE)
            and claims.claim(self.store, run.id, FREEZE, lease_owner=owner)
        ):
            message = _busy_message(self.store, run)
            log.info("not exporting %s now: %s", run.name, message)
            return ExportOutcome(run.name, None, "skipped", message=message)
        try:
            renewal = Renewal(
                lambda: claims.renew(self.store, run.id, FREEZE),
                claims.DEFAULT_TTL,
                "ckptd-renew-export",
            )
            with renewal:
                return self._freeze(run, watch, checkpoint, force, honour_backoff, renewal, hold)
        except Fenced:
            assert self.leases is not None and hold is not None
            self.leases.lost(hold, "export")
            return ExportOutcome(run.name, None, "skipped", message=NOT_HELD)
        finally:
            claims.release(self.store, run.id, FREEZE)

    def _freeze(
        self,
        run: Run,
        watch: WatchConfig,
        checkpoint: Checkpoint | None,
        force: bool,
        honour_backoff: bool,
        renewal: Renewal,
        hold: Hold | None,
    ) -> ExportOutcome:
        fr = watch.freeze
        assert fr is not None
        history, published = exports.history(self.store, run.id)
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
        dest = destination(watch, run)
        on_disk = dest.highest_version()
        # Serving serves the highest numeric directory: our highest version, unless one was
        # removed or added there by hand since.
        serving = published[0] if published and published[0].version == on_disk else None
        if serving is not None and serving.checkpoint_id == target.id and not force:
            return ExportOutcome(
                run.name,
                target.label,
                "unchanged",
                serving.path,
                True,
                "the best is already exported",
                version=serving.version,
            )
        if honour_backoff and (waiting := _waiting(self.store, target)):
            return ExportOutcome(run.name, target.label, "skipped", message=waiting)
        if target.format == "tf1" and not target.has_meta:
            return ExportOutcome(
                run.name, target.label, "skipped", message="waiting for its .meta file"
            )
        metric = watch.best.metric
        value = target.metrics.get(metric) if metric else None
        value = None if value is None or value != value else value  # NaN: no value
        export_id, version, attempt = exports.begin(
            self.store,
            target,
            root=dest.root,
            on_disk=on_disk,
            formats="+".join(fr.format),
            metric=metric,
            metric_value=value,
            hold=hold,
        )
        final = dest.final(version)
        tmp = dest.staging(version)
        reason = f"best by {metric}" if checkpoint is None else "requested"
        t0 = time.perf_counter()
        try:
            with local_checkpoint(self.store, target, run.path) as local:  # (objects: a copy)
                verify = self._write_and_verify(replace(target, prefix=local.prefix), watch, tmp)
            info = {
                "version": version,
                "run": run.name,
                "step": target.step,
                "checkpoint": target.prefix,
                "metric": metric,
                "value": value,
                "mode": watch.best.mode if metric else None,
                "reason": reason,
                "formats": list(fr.format),
                "max_abs_diff": verify.get("max_abs_diff"),
                "exported_at": iso(utcnow()),
                "ckptd_version": ckptd.__version__,
            }
            write_manifest(tmp, info)
            if renewal.lost:  # another process may be exporting this run now: do not publish
                raise ClaimLost("this export's claim on the run expired and was taken over")
            dest.upload(tmp, version)  # (on an object store: all but the marker)
            seconds = time.perf_counter() - t0

            def publish() -> None:  # the numeric version appears complete, at once
                dest.publish(tmp, version)

            exports.published(
                self.store,
                export_id,
                target,
                verified=bool(verify.get("verified")),
                reason=reason,
                detail={
                    "step": target.step,
                    "version": version,
                    "metric": metric,
                    "value": value,
                    "formats": list(fr.format),
                    "verified": verify.get("verified"),
                    "max_abs_diff": verify.get("max_abs_diff"),
                    "seconds": round(seconds, 3),
                },
                hold=hold,
                publish=publish,
            )
        except (
            WorkerError,
            ClaimLost,
            OSError,
            fsops.UnsafePath,
            StoreError,
            CopyFailed,
            Fenced,
        ) as exc:
            dest.discard(tmp, version)
            if isinstance(exc, Fenced):
                # Not published, and not this daemon's to record: the row stays 'exporting'
                # for the run's new holder, whose recovery settles it and exports again.
                raise
            kind = exc.kind if isinstance(exc, WorkerError) else None
            kind = NOT_FOUND if isinstance(exc, CopyFailed) and exc.gone else kind
            return self._failed(
                export_id,
                target,
                run,
                watch,
                attempt,
                str(exc),
                kind,
                time.perf_counter() - t0,
                hold,
            )
        log.info(
            "exported %s to %s (version %d, verified, max diff %s) in %.2f s",
            target.label,
            final,
            version,
            verify.get("max_abs_diff"),
            seconds,
        )
        export_retire.retire(self.store, run, watch, history, hold, self.leases)
        return ExportOutcome(run.name, target.label, "published", final, True, "", seconds, version)

    def _write_and_verify(self, c: Checkpoint, watch: WatchConfig, tmp: Path) -> dict[str, Any]:
        fr = watch.freeze
        assert fr is not None
        timeout = fr.timeout.total_seconds()
        ev = watch.evaluate
        # What both requests rebuild the model from: one dict, so verify can never be sent
        # less than export was (a tf2 verify without its builder never succeeded).
        source = {
            "checkpoint": c.prefix,
            "kind": "keras" if c.format.startswith("keras") else c.format,
            "inputs": dict(fr.inputs),
            "outputs": dict(fr.outputs),
            "builder": fr.builder,
            "model": watch.keras_model,
            "use_ema": bool(ev and ev.use_ema),
        }
        for fmt in fr.format:
            self.client.call(
                {"op": "export", "format": fmt, "out_dir": str(tmp), **source}, timeout=timeout
            )
        result = self.client.call(
            {
                "op": "verify",
                "export_dir": str(tmp),
                "formats": list(fr.format),
                "data": str(ev.data) if ev and ev.data else None,
                "feed": dict(ev.feed) if ev and ev.feed else None,
                "tolerance": fr.tolerance,
                **source,
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
        self,
        export_id: int,
        c: Checkpoint,
        run: Run,
        watch: WatchConfig,
        attempt: int,
        error: str,
        kind: str | None,
        seconds: float,
        hold: Hold | None,
    ) -> ExportOutcome:
        fr = watch.freeze
        assert fr is not None
        now = utcnow()
        if kind == STOPPING:  # this process is stopping: not the export's fault, redo at start
            retry_at: datetime | None = now
        else:
            retry_at = backoff.retry_at(
                attempt, fr.max_attempts, fr.retry_backoff, now, hopeless=kind == NOT_FOUND
            )
        exports.failed(
            self.store, export_id, c, error, attempt=attempt, retry_at=retry_at, hold=hold
        )
        log.error(
            "exporting %s failed (attempt %d, %s): %s",
            c.label,
            attempt,
            f"retry at {iso(retry_at)}" if retry_at else "giving up; `ckptd freeze` tries again",
            error,
        )
        return ExportOutcome(run.name, c.label, "failed", None, False, error, seconds)

    def close(self) -> None:
        self.client.close()


def freeze(store: Store, target: Target, *, force: bool = False) -> ExportOutcome:
    """``ckptd freeze``: export the target checkpoint, or the run's best if it changed."""
    if target.watch.freeze is None:
        raise NotConfigured(
            f"run {target.run.name} has no [watch.freeze] section: "
            "add one with export_dir and format to the config"
        )
    freezer = Freezer(store)
    try:
        return freezer.freeze_run(target.run, target.watch, target.checkpoint, force=force)
    finally:
        freezer.close()
