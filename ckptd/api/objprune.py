"""A prune's deletions in a run on an object store (the object-store side of ``api/deletions``).

The checkpoints' recorded objects are deleted through :mod:`ckptd.io.objstore.prune`, each main
object only in the version its signature recorded; then the run's ``checkpoint`` state file is
rewritten as one object. Results come back as the local path's :class:`fsops.Removal`, so the
audit rows and the ``pruned``/``prune_failed`` states are the same for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ckptd.api.objstores import key_of, store_for
from ckptd.core.model import Checkpoint
from ckptd.core.retention import TrainerState
from ckptd.io.fsops import Removal
from ckptd.io.objstore import StoreError
from ckptd.io.objstore import prune as objprune
from ckptd.store import pruning, signatures
from ckptd.store.handle import Store

if TYPE_CHECKING:
    from ckptd.api.deletions import Batch

log = logging.getLogger("ckptd.api.prune")


def trainer_state(run_url: str) -> TrainerState:
    """The run's state file as retention reads it; raises :class:`StoreError` (also for a store
    that cannot be opened) when it cannot be read."""
    store = store_for(run_url)
    return objprune.trainer_state(store, key_of(run_url), run_url)


def recorded(c: Checkpoint, run_url: str, signature: Sequence[int]) -> objprune.Recorded:
    """What identifies ``c``'s recorded version: its files, and the size of its main object
    and the identity of its objects (an object store signature's first two numbers)."""
    name = c.prefix[len(run_url) + 1 :] if c.prefix.startswith(run_url + "/") else c.prefix
    size = signature[0] if len(signature) >= 2 else None
    ident = signature[1] if len(signature) >= 2 else None
    return objprune.Recorded(name, tuple(c.files), size=size, ident=ident)


def clean(
    db: Store, run_url: str, group: Sequence[Batch]
) -> list[tuple[Batch, list[tuple[Checkpoint, Removal]]]]:
    """Delete every checkpoint of ``group`` (batches of the run at ``run_url``), then rewrite
    the run's state file (also with an empty ``group``: a repair)."""
    ckpts = [c for b in group for c in b.ckpts]
    sigs = signatures.signatures(db, [c.id for c in ckpts]) if ckpts else {}
    groups = [recorded(c, run_url, sigs.get(c.id, ())) for c in ckpts]
    key = key_of(run_url)
    try:
        store = store_for(run_url)
        if group:
            removals, left = objprune.remove_groups(store, key, groups)
        else:  # a repair of the state file alone
            removals, left = [], objprune.listing(store, key)
    except StoreError as exc:
        log.warning("%s: not pruned: %s", run_url, exc)
        removals = [Removal(errors=[f"{run_url}: {exc}"]) for _ in groups]
        left = {}
        store = None
    outcomes = []
    it = iter(removals)
    for b in group:
        outcomes.append((b, [(c, next(it)) for c in b.ckpts]))
    removed = [g.name for g, r in zip(groups, removals, strict=True) if r.ok]
    if store is not None and (removed or not group):
        objprune.drop_entries(store, key, removed, set(left), _newest(db, run_url))
    return outcomes


def _newest(db: Store, run_url: str) -> Callable[[], str | None]:
    def newest() -> str | None:
        prefix = pruning.newest_complete(db, run_url)
        return prefix.rsplit("/", 1)[-1] if prefix else None

    return newest
