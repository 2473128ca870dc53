"""What a scan reports about one checkpoint, and what every format's reader shares."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

COMPLETE, INCOMPLETE, CORRUPT = "complete", "incomplete", "corrupt"

_STEP = re.compile(r"-(\d+)$")


@dataclass(frozen=True)
class Found:
    """One checkpoint as seen on disk at scan time."""

    prefix: str  # absolute prefix path (Keras: the file path)
    format: str  # tf1 | tf2 | keras | keras_weights
    step: int | None
    state: str  # complete | incomplete | corrupt
    reason: str | None
    files: tuple[str, ...]  # base names in the run directory
    size: int
    has_meta: bool
    mtime: float
    signature: tuple[int, ...]  # (size, mtime_ns) of the file whose change means "look again"
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Seen:
    """What the listing saw of one checkpoint's files: the part of a :class:`Found` that does
    not depend on what reading them says."""

    prefix: str
    step: int | None
    files: tuple[str, ...]
    size: int
    has_meta: bool
    mtime: float
    metrics: dict[str, float] = field(default_factory=dict)

    def found(
        self, fmt: str, state: str, reason: str | None, signature: tuple[int, ...] = ()
    ) -> Found:
        """The checkpoint in ``state``; an empty ``signature`` means "look again next scan"."""
        return Found(
            self.prefix,
            fmt,
            self.step,
            state,
            reason,
            self.files,
            self.size,
            self.has_meta,
            self.mtime,
            signature,
            self.metrics,
        )


def step_from_name(prefix_name: str) -> int | None:
    m = _STEP.search(prefix_name)
    return int(m.group(1)) if m else None


def stat_entry(entry: os.DirEntry[str]) -> os.stat_result | None:
    """The entry's own status (a symlink is not followed); None when it has vanished."""
    try:
        return entry.stat(follow_symlinks=False)
    except OSError:
        return None
