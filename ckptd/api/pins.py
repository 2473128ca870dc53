"""Pin and unpin: keep a checkpoint whatever the retention policy says (both are audited)."""

from __future__ import annotations

from dataclasses import dataclass

from ckptd.core.model import Checkpoint
from ckptd.store import pins
from ckptd.store.handle import Store


@dataclass(frozen=True)
class PinChange:
    checkpoint: Checkpoint  # as it was before the change
    pinned: bool  # what was asked
    changed: bool  # False: it already was so, nothing was written


def pin(store: Store, checkpoint: str, reason: str | None = None) -> PinChange:
    """Pin ``checkpoint`` (a prefix path or ``RUN@STEP``); ``reason`` shows in ls and events."""
    record, changed = pins.set_pinned(store, checkpoint, True, reason)
    return PinChange(record, True, changed)


def unpin(store: Store, checkpoint: str) -> PinChange:
    """Let the retention policy decide about ``checkpoint`` again."""
    record, changed = pins.set_pinned(store, checkpoint, False)
    return PinChange(record, False, changed)
