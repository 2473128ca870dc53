"""Which checkpoint is best: pure ranking by a metric. No I/O, no clock of its own."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ckptd.core.model import COMPLETE, Checkpoint


def metric_value(ckpt: Checkpoint, metric: str) -> float | None:
    """The checkpoint's value for ``metric``; None when missing or NaN (both rank worst)."""
    value = ckpt.metrics.get(metric)
    if value is None or math.isnan(value):
        return None
    return value


def rank_key(ckpt: Checkpoint, metric: str, mode: str) -> tuple[float, int, int]:
    """Sort key, larger = better: metric (sign by mode), then newer step, then newer record."""
    value = metric_value(ckpt, metric)
    score = -math.inf if value is None else (value if mode == "max" else -value)
    return (score, ckpt.step if ckpt.step is not None else -1, ckpt.id)


def ranked(checkpoints: Sequence[Checkpoint], metric: str, mode: str) -> list[Checkpoint]:
    """Complete checkpoints that have the metric, best first; ties go to the newer step."""
    eligible = [
        c for c in checkpoints if c.state == COMPLETE and metric_value(c, metric) is not None
    ]
    return sorted(eligible, key=lambda c: rank_key(c, metric, mode), reverse=True)


def select_best(checkpoints: Sequence[Checkpoint], metric: str, mode: str) -> Checkpoint | None:
    """The best complete checkpoint by ``metric``; NaN/missing is never best; corrupt never."""
    best = ranked(checkpoints, metric, mode)
    return best[0] if best else None
