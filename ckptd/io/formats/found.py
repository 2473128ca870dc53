"""What a scan reports about one checkpoint, and what every format's reader shares."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ckptd.core.recording import Found  # what a scan reports: the recording diff's input

COMPLETE, INCOMPLETE, CORRUPT = "complete", "incomplete", "corrupt"

_STEP = re.compile(r"-(\d+)$")


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
