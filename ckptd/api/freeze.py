"""Export the best checkpoint of each run, verified, in the layout TensorFlow Serving loads.

``export_dir/<version>/`` (``export_dir/<run>/<version>/`` when the watch has many runs), version =
step. The worker writes into a hidden ``.ckptd-tmp-*`` directory and fsyncs it; the export is then
verified there (loaded and run against the checkpoint's own outputs) and only then renamed to its
numeric name, so TF Serving never sees a partial or unverified model (serving#1086). An
``exporting`` row is the intent: after a crash the temp dir is removed and the export redone.
An export of a run holds the run's ``FREEZE`` claim, so the daemon and ``ckptd freeze`` never
export one run at the same time (the second one skips it and says why).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.api.renewal import Renewal
from ckptd.api.targets import NotConfigured, Target
from ckptd.config import WatchConfig
from ckptd.core import retention
from ckptd.core.model import Checkpoint, Run, utcnow
from ckptd.core.ranking import select_best
from ckptd.io import fsops
from ckptd.store import claims, exports
from ckptd.store import runs as store_runs
from ckptd.store.claims import FREEZE
from ckptd.store.handle import Store
from ckptd.worker.client import WorkerClient, WorkerError

log = logging.getLogger(__name__)

TMP_PREFIX = ".ckptd-tmp-"
INTERRUPTED = "interrupted (daemon stopped during the export); will be redone"


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


def export_root(watch: WatchConfig, run: Run) -> Path:
    assert watch.freeze is not None
    return watch.freeze.export_dir / run.name if watch.runs else watch.freeze.export_dir


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _busy_message(store: Store, run: Run) -> str:
    held = claims.holder_of(store, run.id, FREEZE)
    who = f"{held[0]} (claim until {held[1]:%Y-%m-%d %H:%M:%S} UTC)" if held else "another process"
    return f"an export of this run is in progress in {who}; try again when it has finished"


class Freezer:
    def __init__(self, store: Store, client: WorkerClient | None = None) -> None:
        self.store = store
        self.client = client or WorkerClient()

    # ------------------------------------------------------------ recovery

    def recover(self, watches: tuple[WatchConfig, ...]) -> int:
        """After a crash: settle interrupted exports (redone later) and drop half-written temp
        dirs, for every run no live process is exporting right now."""
        claims.release_gone(self.store, FREEZE)
        vanished = [
            e.id for e in exports.listed(self.store, "published") if not Path(e.path).exists()
        ]
        interrupted: dict[int | None, list[exports.Export]] = {}
        for e in exports.listed(self.store, "exporting"):
            interrupted.setdefault(e.run_id, []).append(e)
        temps: dict[int | None, list[tuple[Path, str]]] = {}
        for root, run_id in self._export_roots(watches).items():
            for p in root.iterdir() if root.is_dir() else ():
                if p.name.startswith(TMP_PREFIX):
                    temps.setdefault(run_id, []).append((root, p.name))
        failed: list[int] = []
        published: list[int] = []
        for run_id in set(interrupted) | set(temps):
            if run_id is not None and not claims.claim(self.store, run_id, FREEZE):
                continue  # a live process is exporting it: its rows and temp dir are in use
            try:
                # The rename to the numeric name happens only after verification: an interrupted
                # export whose directory exists was published and verified; only its commit
                # was lost.
                for e in interrupted.get(run_id, []):
                    (published if Path(e.path).is_dir() else failed).append(e.id)
                for root, name in temps.get(run_id, []):
                    try:
                        fsops.remove_tree(root, name)
                        log.info("removed interrupted export %s", root / name)
                    except (OSError, fsops.UnsafePath) as exc:
                        log.warning("could not remove %s: %s", root / name, exc)
            finally:
                if run_id is not None:
                    claims.release(self.store, run_id, FREEZE)
        exports.recovered(
            self.store, published=published, failed=failed, removed=vanished, error=INTERRUPTED
        )
        return len(failed)

    def _export_roots(self, watches: tuple[WatchConfig, ...]) -> dict[Path, int | None]:
        """Every export root of ``watches``, with the id of the run it belongs to (None for a
        directory of no recorded run)."""
        roots: dict[Path, int | None] = {}
        for w in watches:
            if w.freeze is None or not w.freeze.export_dir.is_dir():
                continue
            for run in store_runs.present_runs(self.store, str(w.path)):
                roots[export_root(w, run)] = run.id
            if w.runs:
                for p in w.freeze.export_dir.iterdir():
                    if p.is_dir() and not p.is_symlink() and not p.name.startswith(TMP_PREFIX):
                        roots.setdefault(p, None)
            else:
                roots.setdefault(w.freeze.export_dir, None)
        return roots

    # ------------------------------------------------------------ export

    def freeze_run(
        self,
        run: Run,
        watch: WatchConfig,
        checkpoint: Checkpoint | None = None,
        *,
        force: bool = False,
    ) -> ExportOutcome:
        """Export ``checkpoint``, or the run's current best if it is not exported yet; skipped
        while another process exports the run."""
        if not claims.claim(self.store, run.id, FREEZE) and not (
            claims.release_gone(self.store, FREEZE) and claims.claim(self.store, run.id, FREEZE)
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
                return self._freeze(run, watch, checkpoint, force, renewal)
        finally:
            claims.release(self.store, run.id, FREEZE)

    def _freeze(
        self,
        run: Run,
        watch: WatchConfig,
        checkpoint: Checkpoint | None,
        force: bool,
        renewal: Renewal,
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
        export_id = exports.begin(
            self.store, target, formats="+".join(fr.format), version=version, path=str(final)
        )
        t0 = time.perf_counter()
        try:
            verify = self._write_and_verify(target, watch, tmp)
            if renewal.lost:  # another process may be exporting this run now: do not publish
                raise ClaimLost("this export's claim on the run expired and was taken over")
            if final.exists():
                # Same version already published by an earlier run (e.g. forced re-export).
                fsops.remove_tree(root, final.name)
            os.rename(tmp, final)  # atomic publish: the numeric name appears complete
            _fsync_dir(root)
        except (WorkerError, ClaimLost, OSError, fsops.UnsafePath) as exc:
            try:
                fsops.remove_tree(root, tmp.name)
            except (OSError, fsops.UnsafePath):
                log.warning("could not remove %s", tmp)
            return self._failed(export_id, target, run, str(exc), time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        exports.published(
            self.store,
            export_id,
            target,
            verified=bool(verify.get("verified")),
            reason=f"best by {watch.best.metric}" if checkpoint is None else "requested",
            detail={
                "step": target.step,
                "formats": list(fr.format),
                "verified": verify.get("verified"),
                "max_abs_diff": verify.get("max_abs_diff"),
                "seconds": round(seconds, 3),
            },
        )
        log.info(
            "exported %s to %s (verified, max diff %s) in %.2f s",
            target.label,
            final,
            verify.get("max_abs_diff"),
            seconds,
        )
        self._retire(run, watch, history)
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
                    "model": watch.keras_model,
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
                "model": watch.keras_model,
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
        exports.failed(self.store, export_id, c, error)
        log.error("exporting %s failed: %s", c.label, error)
        return ExportOutcome(run.name, c.label, "failed", None, False, error, seconds)

    def _retire(self, run: Run, watch: WatchConfig, history: list[Checkpoint]) -> None:
        """Keep the ``keep`` newest published exports of the run, and always the best's."""
        fr = watch.freeze
        assert fr is not None
        best = (
            select_best(history, watch.best.metric, watch.best.mode) if watch.best.metric else None
        )
        rows = exports.published_under(self.store, str(export_root(watch, run)))
        by_id = {e.id: e for e in rows}
        published = [retention.Published(e.id, e.checkpoint_id, e.path) for e in reversed(rows)]
        retired = retention.exports_to_retire(
            published, fr.keep, best.id if best else None, utcnow()
        )
        for e in (by_id[r.id] for r in reversed(retired)):  # newest first
            p = Path(e.path)
            try:
                fsops.remove_tree(p.parent, p.name)
            except (OSError, fsops.UnsafePath) as exc:
                log.warning("could not remove old export %s: %s", p, exc)
                continue
            exports.removed(self.store, e, reason=f"beyond keep = {fr.keep}")

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
