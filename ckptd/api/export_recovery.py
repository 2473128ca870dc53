"""After a crash: interrupted exports settled (redone later), half-written temp dirs removed.

The rename to the numeric version name happens only after verification, so an interrupted
export whose directory exists was published and verified (only its commit was lost); one
without it failed, and is redone at once (the interruption was not the export's fault).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path

from ckptd.api import objstores
from ckptd.api.exportdest import of_path
from ckptd.api.exportdir import TMP_PREFIX, export_root
from ckptd.config import WatchConfig
from ckptd.io import fsops
from ckptd.io.objstore import StoreError, is_object_url
from ckptd.store import claims, exports
from ckptd.store import runs as store_runs
from ckptd.store.claims import FREEZE
from ckptd.store.handle import Store
from ckptd.store.leases import Hold

log = logging.getLogger("ckptd.api.freeze")  # the name the journal has always shown

INTERRUPTED = "interrupted (daemon stopped during the export); will be redone"


def recover(
    store: Store,
    watches: tuple[WatchConfig, ...],
    run_ids: Collection[int] | None = None,
    holds: Callable[[int], Hold | None] | None = None,
) -> int:
    """After a crash: settle interrupted exports (redone later) and drop half-written temp
    dirs, for every run no live process is exporting right now (of ``run_ids`` only, when
    given: the runs a daemon holds the leases of; temp dirs of no recorded run are anyone's).
    ``holds``: the daemon's leases; it takes over the export claim of a run it holds from
    another daemon (which lost the lease: its export's writes are fenced, its row and temp dir
    are this one's to settle)."""

    def mine(run_id: int | None) -> bool:
        if run_id is not None and holds is not None and holds(run_id) is None:
            return False
        return run_ids is None or run_id is None or run_id in run_ids

    def owner(run_id: int) -> str | None:
        hold = holds(run_id) if holds is not None else None
        return hold.owner if hold is not None else None

    objstores.configure(watches)
    claims.release_gone(store, FREEZE)
    vanished = [
        e.id for e in exports.listed(store, "published") if mine(e.run_id) and _exists(e) is False
    ]
    interrupted: dict[int | None, list[exports.Export]] = {}
    for e in exports.listed(store, "exporting"):
        if mine(e.run_id):
            interrupted.setdefault(e.run_id, []).append(e)
    temps: dict[int | None, list[tuple[Path, str]]] = {}
    for root, run_id in _export_roots(store, watches).items():
        if not mine(run_id):
            continue
        for p in root.iterdir() if root.is_dir() else ():
            if p.name.startswith(TMP_PREFIX):
                temps.setdefault(run_id, []).append((root, p.name))
    failed: list[int] = []
    published: list[int] = []
    for run_id in set(interrupted) | set(temps):
        if run_id is not None and not claims.claim(
            store, run_id, FREEZE, lease_owner=owner(run_id)
        ):
            continue  # a live process is exporting it: its rows and temp dir are in use
        try:
            # The rename to the numeric name happens only after verification: an interrupted
            # export whose directory exists was published and verified; only its commit
            # was lost.
            for e in interrupted.get(run_id, []):
                there = _exists(e)
                if there is None:
                    continue  # left as it is: looked at again at the next start
                (published if there else failed).append(e.id)
                if not there and is_object_url(e.path):
                    _remove_half_upload(e)
            for root, name in temps.get(run_id, []):
                try:
                    fsops.remove_tree(root, name)
                    log.info("removed interrupted export %s", root / name)
                except (OSError, fsops.UnsafePath) as exc:
                    log.warning("could not remove %s: %s", root / name, exc)
        finally:
            if run_id is not None:
                claims.release(store, run_id, FREEZE)
    exports.recovered(
        store, published=published, failed=failed, removed=vanished, error=INTERRUPTED
    )
    return len(failed)


def _exists(e: exports.Export) -> bool | None:
    """Whether the export's version is there (on an object store: its marker was uploaded);
    None when that cannot be told now (the store is unreachable)."""
    if not is_object_url(e.path):
        return Path(e.path).exists()
    try:
        return of_path(e.path).exists(e.path, e.format)
    except StoreError as exc:
        log.warning("%s: not checked: %s", e.path, exc)
        return None


def _remove_half_upload(e: exports.Export) -> None:
    """An interrupted upload's objects: its version was never published (no marker)."""
    try:
        of_path(e.path).remove(e.path)
        log.info("removed interrupted export %s", e.path)
    except StoreError as exc:
        log.warning("could not remove %s: %s", e.path, exc)


def _export_roots(store: Store, watches: tuple[WatchConfig, ...]) -> dict[Path, int | None]:
    """Every export root of ``watches``, with the id of the run it belongs to (None for a
    directory of no recorded run)."""
    roots: dict[Path, int | None] = {}
    for w in watches:
        root = w.freeze.export_dir if w.freeze is not None else None
        if not isinstance(root, Path) or not root.is_dir():
            continue  # none, or on an object store: no local directory to recover
        for run in store_runs.present_runs(store, str(w.path)):
            roots[export_root(w, run)] = run.id
        if w.runs:
            for p in root.iterdir():
                if p.is_dir() and not p.is_symlink() and not p.name.startswith(TMP_PREFIX):
                    roots.setdefault(p, None)
        else:
            roots.setdefault(root, None)
    return roots
