"""Retire old exports: keep the ``keep`` newest published exports of a run, and the best's.

Each directory is removed inside the transaction that records its removal, after the run's
lease is checked there (``store.exports.removed``): a daemon that lost the run removes nothing,
and the run's new holder retires them.
"""

from __future__ import annotations

import functools
import logging

from ckptd.api.exportdest import destination
from ckptd.api.record import Leases
from ckptd.config import WatchConfig
from ckptd.core import retention
from ckptd.core.model import Checkpoint, Run, utcnow
from ckptd.core.ranking import select_best
from ckptd.io import fsops
from ckptd.io.objstore import StoreError
from ckptd.store import exports
from ckptd.store.handle import Store
from ckptd.store.leases import Fenced, Hold

log = logging.getLogger("ckptd.api.freeze")  # the name the journal has always shown


def retire(
    store: Store,
    run: Run,
    watch: WatchConfig,
    history: list[Checkpoint],
    hold: Hold | None = None,
    leases: Leases | None = None,
) -> None:
    """Remove the run's published exports beyond ``[watch.freeze] keep`` (never the best's),
    newest first, under ``hold`` (told to ``leases`` when it is found lost)."""
    fr = watch.freeze
    assert fr is not None
    best = select_best(history, watch.best.metric, watch.best.mode) if watch.best.metric else None
    dest = destination(watch, run)  # a local directory, or a prefix on an object store
    rows = exports.published_under(store, dest.root)
    by_id = {e.id: e for e in rows}
    published = [retention.Published(e.id, e.checkpoint_id, e.path) for e in reversed(rows)]
    retired = retention.exports_to_retire(published, fr.keep, best.id if best else None, utcnow())
    for e in (by_id[r.id] for r in reversed(retired)):  # newest first
        try:
            exports.removed(
                store,
                e,
                reason=f"beyond keep = {fr.keep}",
                hold=hold,
                remove=functools.partial(dest.remove, e.path),
            )
        except (OSError, fsops.UnsafePath, StoreError) as exc:
            log.warning("could not remove old export %s: %s", e.path, exc)
        except Fenced:  # the run's new holder retires them
            if leases is not None and hold is not None:
                leases.lost(hold, "removal of old exports")
            return
