"""What a ``RUN`` or ``CHECKPOINT`` argument names (``mnist``, ``mnist@1200``, a prefix path)."""

from __future__ import annotations

from ckptd.core.errors import NotFound
from ckptd.core.model import Checkpoint, Run
from ckptd.store import reads
from ckptd.store import runs as store_runs
from ckptd.store.handle import Store


def resolve(store: Store, text: str) -> tuple[Run, Checkpoint | None]:
    """(the run, None) for a run; (its run, the checkpoint) for a checkpoint; else NotFound."""
    with store.session() as s:
        try:
            return store_runs.resolve_run(s, text), None
        except NotFound:
            checkpoint = reads.resolve_checkpoint(s, text)
            return store_runs.run_by_id(s, checkpoint.run_id), checkpoint
