"""Retention as composable rules: each rule names the checkpoints it keeps and why.

A rule is a small function (or a frozen dataclass with ``__call__``) from a run's
:class:`History` to ``{checkpoint id: reason}``. A plan keeps the union of what its rules keep,
as orbax's ``AnyPreservationPolicy`` composes, and deletes the other complete checkpoints. The
same machinery retires old exports (``keep`` in ``[watch.freeze]``). Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from ckptd.core.durations import format_duration
from ckptd.core.model import COMPLETE, Checkpoint
from ckptd.core.ranking import metric_value, ranked, save_order, saved_at

# Reasons a checkpoint is kept, as shown by `ckptd prune --dry-run` and `ckptd ls`.
NEWEST, CURRENT, LAST, BEST, PINNED, EXPORTED, IN_USE, TOO_YOUNG, PENDING = (
    "newest",
    "current",
    "last",
    "best",
    "pinned",
    "exported",
    "in use",
    "too young",
    "awaiting evaluation",
)


class _Identified(Protocol):
    @property
    def id(self) -> int: ...


T = TypeVar("T", bound=_Identified)


@dataclass(frozen=True)
class TrainerState:
    """What the run's ``checkpoint`` state file says, as planning needs it: ``current``, the
    prefix of the checkpoint it names (``model_checkpoint_path``: what
    ``tf.train.latest_checkpoint`` and a restarted ``CheckpointManager`` resume from), and
    ``preserved_at``, its ``last_preserved_timestamp`` (a ``CheckpointManager`` writes its
    creation time there, then the time of each checkpoint it keeps every n hours)."""

    current: str | None = None
    preserved_at: datetime | None = None


NO_STATE = TrainerState()


@dataclass(frozen=True)
class History(Generic[T]):
    """What rules look at: ``items`` in save order (a run's whole history, gone and pruned ones
    too: ``keep_every`` counts from the first save ever), ``live`` the ones a plan may delete
    (in save order), the time of planning, and what the run's state file says."""

    items: Sequence[T]
    live: Sequence[T]
    now: datetime
    trainer: TrainerState = NO_STATE


Rule = Callable[[History[Checkpoint]], Mapping[int, str]]


@dataclass(frozen=True)
class Plan:
    keep: dict[int, tuple[str, ...]]  # checkpoint id -> why it is kept
    delete: tuple[Checkpoint, ...]

    def reasons(self, ckpt: Checkpoint) -> tuple[str, ...]:
        return self.keep.get(ckpt.id, ())


# ------------------------------------------------------------------ the rules


def newest(history: History[Checkpoint]) -> dict[int, str]:
    """The newest live checkpoint (the last saved), always: resuming training needs it
    (orbax#526)."""
    return {history.live[-1].id: NEWEST} if history.live else {}


def current(history: History[Checkpoint]) -> dict[int, str]:
    """The checkpoint the state file names (the last saved of that name), always: TensorFlow
    resumes from it, whatever the save order says (a clock, a copy, a rewritten state file)."""
    prefix = history.trainer.current
    named = [c for c in history.live if c.prefix == prefix] if prefix else []
    return {named[-1].id: CURRENT} if named else {}  # older ones of that name were overwritten


@dataclass(frozen=True)
class KeepLast:
    """The ``n`` newest (``keep_last``; for exports, ``keep``)."""

    n: int

    def __call__(self, history: History[Any]) -> dict[int, str]:
        return {c.id: LAST for c in history.live[-self.n :]} if self.n > 0 else {}


@dataclass(frozen=True)
class KeepBest:
    """The ``n`` best by ``metric`` (the best one even without ``keep_best``); with ``n`` set,
    also those awaiting evaluation, which may yet turn out best."""

    metric: str
    mode: str = "max"
    n: int | None = None

    def __call__(self, history: History[Checkpoint]) -> dict[int, str]:
        best = ranked(history.live, self.metric, self.mode)[: max(self.n or 0, 1)]
        out = {c.id: BEST for c in best}
        if self.n:
            for c in history.live:
                if metric_value(c, self.metric) is None and c.evaluation in ("pending", "running"):
                    out[c.id] = PENDING
        return out


@dataclass(frozen=True)
class KeepEvery:
    """TensorFlow's ``keep_checkpoint_every_n_hours``: walking the saves in order, a checkpoint
    that leaves the ``keep_last`` window (``window``: the run's newest ``keep_last``) is kept
    when it is at least ``interval`` newer than the anchor, and becomes the anchor.

    The anchor starts where the run's ``CheckpointManager`` put it: its creation, which it
    writes to the state file as ``last_preserved_timestamp`` (so its first save may be kept, as
    TF keeps it). Saves from before that time (an earlier trainer in the directory), or every
    save without it (TF1, no state file), are walked from the first save, which is the anchor
    and is not kept.
    """

    interval: timedelta
    window: int | None = None

    def __call__(self, history: History[Checkpoint]) -> dict[int, str]:
        window = {c.id for c in history.live[-self.window :]} if self.window else set()
        live = {c.id for c in history.live}
        why = f"every {format_duration(self.interval)}"
        preserved = history.trainer.preserved_at
        out: dict[int, str] = {}
        anchor: datetime | None = None
        for c in history.items:
            if c.id in window:
                continue
            t = saved_at(c)
            if preserved is not None and t > preserved:
                anchor, preserved = preserved, None  # the manager's own anchor from here on
            if anchor is None:
                anchor = t
            elif t - self.interval >= anchor:
                anchor = t
                if c.id in live:
                    out[c.id] = why
        return out


@dataclass(frozen=True)
class KeepEverySteps:
    n: int

    def __call__(self, history: History[Checkpoint]) -> dict[int, str]:
        why = f"every {self.n} steps"
        return {c.id: why for c in history.live if c.step is not None and c.step % self.n == 0}


def pinned(history: History[Checkpoint]) -> dict[int, str]:
    return {c.id: PINNED for c in history.live if c.pinned}


def exported(history: History[Checkpoint]) -> dict[int, str]:
    return {c.id: EXPORTED for c in history.live if c.exported}


def in_use(history: History[Checkpoint]) -> dict[int, str]:
    """Being evaluated or exported right now (what TF resumes from: see current)."""
    return {c.id: IN_USE for c in history.live if c.evaluation == "running" or c.exporting}


@dataclass(frozen=True)
class TooYoung:
    """Saved less than ``min_age`` ago (a trainer may still be reading or listing it)."""

    min_age: timedelta

    def __call__(self, history: History[Checkpoint]) -> dict[int, str]:
        now = history.now
        return {c.id: TOO_YOUNG for c in history.live if now - saved_at(c) < self.min_age}


# ------------------------------------------------------------------ composing


def keep_reasons(
    history: History[Any], rules: Iterable[Callable[[Any], Mapping[int, str]]]
) -> dict[int, list[str]]:
    """The union of what ``rules`` keep: every reason of each kept id, in the rules' order."""
    reasons: dict[int, list[str]] = {}
    for rule in rules:
        for cid, why in rule(history).items():
            got = reasons.setdefault(cid, [])
            if why not in got:
                got.append(why)
    return reasons


def plan(
    checkpoints: Sequence[Checkpoint],
    rules: Iterable[Rule],
    now: datetime,
    trainer: TrainerState = NO_STATE,
) -> Plan:
    """Decide what to keep (with every reason) and what to delete, for one run.

    ``checkpoints`` is the run's whole history (see :class:`History`), in any order; ``trainer``
    what its state file says. Only complete checkpoints are ever deleted; corrupt ones are
    evidence and stay until a person decides.
    """
    items = sorted(checkpoints, key=save_order)
    live = [c for c in items if c.state == COMPLETE]
    reasons = keep_reasons(History(items, live, now, trainer), rules)
    keep = {c.id: tuple(reasons[c.id]) for c in live if c.id in reasons}
    return Plan(keep, tuple(c for c in live if c.id not in keep))


class RetainSettings(Protocol):
    """``[watch.retain]`` as the rules read it (``ckptd.config.RetainConfig``)."""

    @property
    def keep_last(self) -> int | None: ...
    @property
    def keep_best(self) -> int | None: ...
    @property
    def keep_every(self) -> timedelta | None: ...
    @property
    def keep_every_steps(self) -> int | None: ...
    @property
    def min_age(self) -> timedelta: ...


def rules_from(retain: RetainSettings, metric: str | None, mode: str = "max") -> tuple[Rule, ...]:
    """The rules of a ``[watch.retain]`` section, ranking by the watch's ``[watch.best]``."""
    rules: list[Rule] = [newest]
    if retain.keep_last:
        rules.append(KeepLast(retain.keep_last))
    if metric:
        rules.append(KeepBest(metric, mode, retain.keep_best))
    if retain.keep_every:
        rules.append(KeepEvery(retain.keep_every, retain.keep_last))
    if retain.keep_every_steps:
        rules.append(KeepEverySteps(retain.keep_every_steps))
    return (*rules, current, pinned, exported, in_use, TooYoung(retain.min_age))


def describe(retain: RetainSettings) -> str:
    """Why a checkpoint went, as its ``pruned`` reason says: ``not kept by keep_last=3``."""
    parts = []
    if retain.keep_last:
        parts.append(f"keep_last={retain.keep_last}")
    if retain.keep_best:
        parts.append(f"keep_best={retain.keep_best}")
    if retain.keep_every:
        parts.append(f"keep_every={retain.keep_every}")
    if retain.keep_every_steps:
        parts.append(f"keep_every_steps={retain.keep_every_steps}")
    return "not kept by " + (", ".join(parts) or "any rule")


def needs_whole_history(rules: Iterable[Rule]) -> bool:
    """Whether planning must see gone and pruned checkpoints too (``keep_every`` does)."""
    return any(isinstance(r, KeepEvery) for r in rules)


def metrics_of(rules: Iterable[Rule]) -> set[str]:
    """The metrics the rules rank by (the only ones planning reads)."""
    return {r.metric for r in rules if isinstance(r, KeepBest)}


# ------------------------------------------------------------------ exports


@dataclass(frozen=True)
class Published:
    """A published export of a run: its id, the checkpoint it came from, where it is."""

    id: int
    checkpoint_id: int
    path: str


@dataclass(frozen=True)
class ExportsOf:
    """The exports of one checkpoint (the best's: Serving keeps serving the best)."""

    checkpoint_id: int | None

    def __call__(self, history: History[Published]) -> dict[int, str]:
        return {e.id: BEST for e in history.live if e.checkpoint_id == self.checkpoint_id}


def exports_to_retire(
    published: Sequence[Published], keep: int, best: int | None, now: datetime
) -> list[Published]:
    """Of a run's published exports (oldest first), those beyond the ``keep`` newest that are
    not of the ``best`` checkpoint."""
    history = History(published, published, now)
    kept = keep_reasons(history, (KeepLast(keep), ExportsOf(best)))
    return [e for e in published if e.id not in kept]
