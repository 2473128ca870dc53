"""Which checkpoint is best, and which was saved last: pure orderings. No I/O, no clock."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from ckptd.core.model import COMPLETE, Checkpoint


def metric_value(ckpt: Checkpoint, metric: str) -> float | None:
    """The checkpoint's value for ``metric``; None when missing or NaN (both rank worst)."""
    value = ckpt.metrics.get(metric)
    if value is None or math.isnan(value):
        return None
    return value


def saved_at(ckpt: Checkpoint) -> datetime:
    """When the trainer wrote it (its files' mtime), else when it was recorded."""
    t = ckpt.created_at or ckpt.recorded_at
    return t if t is not None else datetime.min


def save_order(ckpt: Checkpoint) -> tuple[datetime, int, int]:
    """Sort key, larger = saved later. Not the step: a trainer restarted from scratch in the same
    directory writes low steps again, and those are its newest. Checkpoints written in the same
    clock tick (a copied run) go by step, then by record."""
    return (saved_at(ckpt), ckpt.step if ckpt.step is not None else -1, ckpt.id)


def rank_key(ckpt: Checkpoint, metric: str, mode: str) -> tuple[float, tuple[datetime, int, int]]:
    """Sort key, larger = better: metric (sign by mode), then saved later."""
    value = metric_value(ckpt, metric)
    score = -math.inf if value is None else (value if mode == "max" else -value)
    return (score, save_order(ckpt))


def ranked(checkpoints: Sequence[Checkpoint], metric: str, mode: str) -> list[Checkpoint]:
    """Complete checkpoints that have the metric, best first; ties go to the one saved later."""
    eligible = [
        c for c in checkpoints if c.state == COMPLETE and metric_value(c, metric) is not None
    ]
    return sorted(eligible, key=lambda c: rank_key(c, metric, mode), reverse=True)


def select_best(checkpoints: Sequence[Checkpoint], metric: str, mode: str) -> Checkpoint | None:
    """The best complete checkpoint by ``metric``; NaN/missing is never best; corrupt never."""
    best = ranked(checkpoints, metric, mode)
    return best[0] if best else None
