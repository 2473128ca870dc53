"""Domain records: what the store hands out and the policies consume (never database rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

# Checkpoint states. ``incomplete`` is only ever seen in a scan, never stored as final.
COMPLETE, CORRUPT, GONE, PRUNING, PRUNED = "complete", "corrupt", "gone", "pruning", "pruned"
# A version of a checkpoint whose files were written again under the same name: history only
# (its metrics and evaluation were of the old files), never present, never deleted as ours.
REPLACED = "replaced"

# SQLite's INTEGER (and TensorFlow's int64 step): a larger step or count cannot be stored or
# looked up.
INT64_MAX = 2**63 - 1


def utcnow() -> datetime:
    """Naive UTC (what SQLite stores); convert with :func:`iso` at the edges."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 UTC with microseconds, the CLI's JSON contract."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Run:
    id: int
    name: str
    path: str
    watch_path: str
    present: bool


@dataclass(frozen=True)
class Checkpoint:
    id: int
    run: str
    run_id: int
    prefix: str
    step: int | None
    format: str
    state: str
    reason: str | None
    size: int
    files: tuple[str, ...]
    has_meta: bool
    created_at: datetime | None  # the newest file's mtime: when the trainer wrote it
    recorded_at: datetime | None  # when ckptd committed it as complete
    metrics: dict[str, float] = field(default_factory=dict)
    pinned: bool = False
    evaluation: str | None = None  # pending | running | done | failed
    exported: bool = False  # behind a published export
    exporting: bool = False  # an export of it is being written right now
    export_version: int | None = None  # the highest published version of it
    serving: bool = False  # that version is its run's highest: what TF Serving serves
    incarnation: int = 1  # which start of the trainer wrote it (steps went back: a new one)

    @property
    def label(self) -> str:
        return f"{self.run}@{self.step}" if self.step is not None else self.prefix


@dataclass(frozen=True)
class Action:
    id: int
    at: datetime
    kind: str
    run: str | None
    subject: str | None
    reason: str | None
    detail: dict[str, object]


def heartbeat_grace(interval: timedelta) -> timedelta:
    """How stale a heartbeat may be before the daemon counts as not running."""
    return interval * 3 + timedelta(seconds=5)
