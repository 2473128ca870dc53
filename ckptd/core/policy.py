"""Pure decisions over checkpoints: which is best, which to keep. No I/O, no clock of its own."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ckptd.core.durations import format_duration
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


# ------------------------------------------------------------------ retention

# Reasons a checkpoint is kept, as shown by `ckptd prune --dry-run` and `ckptd ls`.
NEWEST, LAST, BEST, PINNED, EXPORTED, IN_USE, TOO_YOUNG, PENDING = (
    "newest",
    "last",
    "best",
    "pinned",
    "exported",
    "in use",
    "too young",
    "awaiting evaluation",
)


@dataclass(frozen=True)
class Rules:
    """``[watch.retain]`` plus the ranking metric. None disables a rule."""

    keep_last: int | None = None
    keep_best: int | None = None
    keep_every: timedelta | None = None
    keep_every_steps: int | None = None
    min_age: timedelta = timedelta(0)
    metric: str | None = None
    mode: str = "max"


@dataclass(frozen=True)
class Plan:
    keep: dict[int, tuple[str, ...]]  # checkpoint id -> why it is kept
    delete: tuple[Checkpoint, ...]

    def reasons(self, ckpt: Checkpoint) -> tuple[str, ...]:
        return self.keep.get(ckpt.id, ())


def _time(c: Checkpoint) -> datetime:
    t = c.created_at or c.recorded_at
    return t if t is not None else datetime.min


def _order(c: Checkpoint) -> tuple[int, datetime, int]:
    return (c.step if c.step is not None else -1, _time(c), c.id)


def plan_prune(checkpoints: Sequence[Checkpoint], rules: Rules, now: datetime) -> Plan:
    """Decide what to keep (with every reason) and what to delete, for one run.

    ``checkpoints`` is the run's whole history (gone and pruned ones too: ``keep_every`` counts
    from the first checkpoint ever saved, which makes planning idempotent). Only complete
    checkpoints are ever deleted; corrupt ones are evidence and stay until a person decides.
    """
    history = sorted(checkpoints, key=_order)
    live = [c for c in history if c.state == COMPLETE]
    keep: dict[int, list[str]] = {c.id: [] for c in live}

    def mark(c: Checkpoint, reason: str) -> None:
        if reason not in keep[c.id]:
            keep[c.id].append(reason)

    if live:
        mark(live[-1], NEWEST)  # resuming training needs it (orbax#526)
    if rules.keep_last:
        for c in live[-rules.keep_last :]:
            mark(c, LAST)
    if rules.metric:
        best = ranked(live, rules.metric, rules.mode)
        for c in best[: max(rules.keep_best or 0, 1)]:
            mark(c, BEST)
        if rules.keep_best:
            for c in live:
                if metric_value(c, rules.metric) is None and c.evaluation in ("pending", "running"):
                    mark(c, PENDING)
    if rules.keep_every:
        # TensorFlow's keep_checkpoint_every_n_hours: walking the saves in order, a checkpoint
        # that leaves the keep_last window is preserved when it is at least keep_every newer than
        # the last preserved one (the first save is the starting point, as a manager created
        # just before it). The window is the newest keep_last of the run.
        window = {c.id for c in live[-rules.keep_last :]} if rules.keep_last else set()
        anchor: datetime | None = None
        for c in history:
            if c.id in window:
                continue
            t = _time(c)
            if anchor is None:
                anchor = t
                continue
            if t - rules.keep_every >= anchor:
                anchor = t
                if c.id in keep:
                    mark(c, f"every {format_duration(rules.keep_every)}")
    if rules.keep_every_steps:
        for c in live:
            if c.step is not None and c.step % rules.keep_every_steps == 0:
                mark(c, f"every {rules.keep_every_steps} steps")
    for c in live:
        if c.pinned:
            mark(c, PINNED)
        if c.exported:
            mark(c, EXPORTED)
        if c.evaluation == "running" or c.exporting:
            mark(c, IN_USE)
        if now - _time(c) < rules.min_age:
            mark(c, TOO_YOUNG)
    kept = {cid: tuple(r) for cid, r in keep.items() if r}
    return Plan(kept, tuple(c for c in live if c.id not in kept))
