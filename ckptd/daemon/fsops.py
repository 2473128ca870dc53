"""The only code in ckptd that deletes files.

Every deletion goes through a directory file descriptor opened component by component from the
watch root with ``O_NOFOLLOW``, so a symlink anywhere on the way can never lead outside the root;
only plain base names recorded by ckptd are unlinked, and ``unlink`` never follows a symlink (a
planted link is removed, its target is untouched).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.safeio import StrPath, UnsafePath, open_dir_under

log = logging.getLogger(__name__)

__all__ = ["Removal", "UnsafePath", "open_dir_under", "remove_files", "remove_groups"]


@dataclass
class Removal:
    removed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # already gone (trainer got there first)
    bytes_freed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def remove_files(root: StrPath, directory: StrPath, names: Iterable[str]) -> Removal:
    """Unlink recorded base names in ``directory`` (under ``root``); missing files are fine."""
    return remove_groups(root, directory, [list(names)])[0]


def remove_groups(
    root: StrPath, directory: StrPath, groups: Sequence[Sequence[str]]
) -> list[Removal]:
    """:func:`remove_files` for many checkpoints of one directory, opening it only once."""
    results = [Removal() for _ in groups]
    for names, result in zip(groups, results, strict=True):
        for name in names:
            if not name or "/" in name or name in (".", ".."):
                result.errors.append(f"{name!r}: not a plain file name; refused")
    try:
        with open_dir_under(root, directory) as dfd:
            for names, result in zip(groups, results, strict=True):
                if not result.errors:
                    _unlink_all(dfd, names, result)
    except FileNotFoundError:
        for names, result in zip(groups, results, strict=True):
            if not result.errors:
                result.missing.extend(names)  # the whole run directory is gone
    except (UnsafePath, OSError) as exc:
        for result in results:
            result.errors.append(str(exc))
    return results


def _unlink_all(dfd: int, names: Sequence[str], result: Removal) -> None:
    lstat, unlink = os.lstat, os.unlink  # the loop runs once per file: local names
    removed, freed = result.removed, 0
    for name in names:
        try:
            st = lstat(name, dir_fd=dfd)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                result.errors.append(f"{name}: is a directory; refused")
                continue
            unlink(name, dir_fd=dfd)  # never follows a symlink: a link goes, its target stays
            removed.append(name)
            if stat.S_ISREG(mode) and st.st_nlink == 1:  # another hard link keeps the data
                freed += st.st_size
        except FileNotFoundError:
            result.missing.append(name)
        except OSError as exc:
            result.errors.append(f"{name}: {exc.strerror}")
    result.bytes_freed += freed


def remove_stale_temp_dirs(
    root: StrPath, directory: StrPath, older_than: float = 86400
) -> list[str]:
    """Remove ``*_temp`` directories TensorFlow left behind (safe once older than a day)."""
    removed = []
    now = time.time()
    try:
        with open_dir_under(root, directory) as dfd:
            with os.scandir(dfd) as it:
                entries = [
                    (e.name, e.stat(follow_symlinks=False)) for e in it if e.name.endswith("_temp")
                ]
            for name, st in entries:
                if not stat.S_ISDIR(st.st_mode) or now - st.st_mtime < older_than:
                    continue
                # rmtree with dir_fd is symlink-attack safe on Linux
                # (shutil.rmtree.avoids_symlink_attacks).
                shutil.rmtree(name, dir_fd=dfd)
                removed.append(name)
    except (OSError, UnsafePath) as exc:
        log.warning("cleaning temp directories in %s: %s", directory, exc)
    return removed


def remove_tree(root: Path, name: str) -> bool:
    """Remove the directory ``root/name`` (an export version or a temp dir), symlink-safe."""
    if not name or "/" in name or name in (".", ".."):
        raise UnsafePath(f"{name!r}: not a plain directory name; refused")
    with open_dir_under(root, root) as dfd:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{root / name} is not a directory; refused")
        shutil.rmtree(name, dir_fd=dfd)
    return True
