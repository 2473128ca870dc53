"""What `ckptd events` shows: the audit log, what ckptd did or noticed, to what, why, when."""

from __future__ import annotations

from collections.abc import Sequence

from ckptd.core.model import Action
from ckptd.store import audit_reads
from ckptd.store.handle import Store


def events(
    store: Store, *, run: str | None = None, kinds: Sequence[str] | None = None, limit: int = 50
) -> list[Action]:
    """The newest ``limit`` events, oldest first: of ``run`` (a name or an absolute path) or of
    every run, of ``kinds`` or of every kind. A batched ``pruned`` row is one event per
    checkpoint it deleted."""
    return audit_reads.load_events(store, run=run, kinds=kinds or None, limit=limit)
