"""``[watch.retain]`` and ``[watch.best]`` in one value, as the policy tests spell a rule set
(``min_age`` 0 unless given), planned through the same builder the config uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ckptd.core import retention
from ckptd.core.model import Checkpoint


@dataclass(frozen=True)
class Rules:
    keep_last: int | None = None
    keep_best: int | None = None
    keep_every: timedelta | None = None
    keep_every_steps: int | None = None
    min_age: timedelta = timedelta(0)
    metric: str | None = None
    mode: str = "max"


def plan_prune(checkpoints: Sequence[Checkpoint], rules: Rules, now: datetime) -> retention.Plan:
    return retention.plan(checkpoints, retention.rules_from(rules, rules.metric, rules.mode), now)
