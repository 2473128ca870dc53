"""Which directories are runs, what they are called, and which run a changed path belongs to."""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ckptd.config import Config, WatchConfig
from ckptd.io import safeio
from ckptd.io.formats import is_utf8 as _utf8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """A run directory under a watch: named by its path relative to the watch ``path``."""

    watch_index: int
    name: str
    path: Path
    watch: WatchConfig
    url: str | None = None  # on an object store: the run's URL (``path`` is then not local)


def local_only(config: Config, *, quiet: bool = False) -> Config:
    """The watches on local disks: what inotify and the local scans work on. An object store
    watch is left out: its runs are recorded by its poller (daemon/objwatch.py); evaluation,
    export and prune act on every watch (``Daemon.acting``). ``quiet``: kept for callers."""
    del quiet
    return replace(config, watches=tuple(w for w in config.watches if not w.is_object_store))


UNSUPPORTED: set[str] = set()  # run directories reported as having non-UTF-8 names


def _report_unsupported(path: Path) -> None:
    shown = os.fsencode(path).decode("utf-8", "backslashreplace")
    if shown not in UNSUPPORTED:
        UNSUPPORTED.add(shown)
        log.warning("%s: directory name is not valid UTF-8; it is not watched as a run", shown)


def _depth(pattern: str) -> int:
    return len(Path(pattern).parts)


def discover(watch_index: int, watch: WatchConfig) -> list[RunSpec]:
    """The runs of one watch that exist now.

    The watch ``path`` is followed even if it is a symlink (the user chose it); below it,
    directories are listed through directory fds and a symlinked directory is never a run nor
    entered.
    """
    root = watch.local_path
    if not watch.runs:
        return [RunSpec(watch_index, root.name, root, watch)] if root.is_dir() else []
    parts = Path(watch.runs).parts
    found: list[RunSpec] = []

    def walk(fd: int, d: Path, level: int) -> None:
        with os.scandir(fd) as it:
            for entry in it:
                name = entry.name
                if not _utf8(name):
                    _report_unsupported(d / name)
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if not fnmatch.fnmatchcase(name, parts[level]):
                    continue
                path = d / name
                if level + 1 == len(parts):
                    found.append(
                        RunSpec(watch_index, path.relative_to(root).as_posix(), path, watch)
                    )
                    continue
                try:
                    sub = safeio.open_subdir(name, fd)
                except OSError:
                    continue  # gone, unreadable, or swapped for a symlink since the listing
                try:
                    walk(sub, path, level + 1)
                except OSError:
                    continue
                finally:
                    os.close(sub)

    try:
        with safeio.open_dir_under(root, root) as fd:
            walk(fd, root, 0)
    except OSError:
        return []
    return sorted(found, key=lambda r: r.name)


def is_present(spec: RunSpec) -> bool:
    """Whether ``spec``'s directory exists as a real directory under its watch root."""
    try:
        with safeio.open_dir_under(spec.watch.local_path, spec.path):
            return True
    except (FileNotFoundError, NotADirectoryError, safeio.UnsafePath):
        return False
    except OSError:
        return True  # there, but unreadable right now: the reconciler says so and retries


def run_of(watch_index: int, watch: WatchConfig, path: str) -> RunSpec | None:
    """The run a filesystem event at ``path`` concerns, or None when it concerns no run."""
    root = str(watch.path)
    if path != root and not path.startswith(root + os.sep):
        return None
    if not watch.runs:
        return RunSpec(watch_index, watch.local_path.name, watch.local_path, watch)
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
    return RunSpec(watch_index, name, watch.local_path / name, watch)
