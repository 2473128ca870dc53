"""Which directories are runs, what they are called, and which run a changed path belongs to."""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ckptd.config import WatchConfig
from ckptd.formats import is_utf8 as _utf8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """A run directory under a watch: named by its path relative to the watch ``path``."""

    watch_index: int
    name: str
    path: Path
    watch: WatchConfig


UNSUPPORTED: set[str] = set()  # run directories reported as having non-UTF-8 names


def _report_unsupported(path: Path) -> None:
    shown = os.fsencode(path).decode("utf-8", "backslashreplace")
    if shown not in UNSUPPORTED:
        UNSUPPORTED.add(shown)
        log.warning("%s: directory name is not valid UTF-8; it is not watched as a run", shown)


def _depth(pattern: str) -> int:
    return len(Path(pattern).parts)


def discover(watch_index: int, watch: WatchConfig) -> list[RunSpec]:
    """The runs of one watch that exist now. Symlinked run directories are never followed."""
    root = watch.path
    if not watch.runs:
        return [RunSpec(watch_index, root.name, root, watch)] if root.is_dir() else []
    parts = Path(watch.runs).parts
    found: list[RunSpec] = []

    def walk(d: Path, level: int) -> None:
        try:
            it = os.scandir(d)
        except OSError:
            return
        with it:
            for entry in it:
                if not _utf8(entry.name):
                    _report_unsupported(Path(d) / entry.name)
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if not fnmatch.fnmatchcase(entry.name, parts[level]):
                    continue
                if level + 1 == len(parts):
                    path = Path(entry.path)
                    found.append(
                        RunSpec(watch_index, path.relative_to(root).as_posix(), path, watch)
                    )
                else:
                    walk(Path(entry.path), level + 1)

    walk(root, 0)
    return sorted(found, key=lambda r: r.name)


def run_of(watch_index: int, watch: WatchConfig, path: str) -> RunSpec | None:
    """The run a filesystem event at ``path`` concerns, or None when it concerns no run."""
    root = str(watch.path)
    if path != root and not path.startswith(root + os.sep):
        return None
    if not watch.runs:
        return RunSpec(watch_index, watch.path.name, watch.path, watch)
    rel = path[len(root) + 1 :].split(os.sep) if path != root else []
    depth = _depth(watch.runs)
    if len(rel) < depth:
        return None
    parts = Path(watch.runs).parts
    if not all(fnmatch.fnmatchcase(rel[i], parts[i]) for i in range(depth)):
        return None
    if not all(_utf8(part) for part in rel[:depth]):
        return None
    name = "/".join(rel[:depth])
    return RunSpec(watch_index, name, watch.path / name, watch)
