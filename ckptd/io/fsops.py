"""The only code in ckptd that deletes files.

Every deletion goes through a directory file descriptor opened component by component from the
watch root with ``O_NOFOLLOW``, so a symlink anywhere on the way can never lead outside the root;
only names recorded by ckptd are unlinked (base names; a Keras file in a subdirectory of its
run by its relative path, each directory on the way opened the same way), and ``unlink`` never
follows a symlink (a planted link is removed, its target is untouched). Besides those, only
TensorFlow's own stale temporary names are removed (:func:`find_leftovers`), never a whole tree.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.io.safeio import StrPath, UnsafePath, open_dir_under

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

__all__ = [
    "Leftover",
    "Removal",
    "UnsafePath",
    "find_leftovers",
    "open_dir_under",
    "remove_files",
    "remove_groups",
    "remove_leftovers",
]


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
            if not all(part and part not in (".", "..") for part in name.split("/")):
                result.errors.append(f"{name!r}: not a plain relative file name; refused")
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
    """Unlink ``names`` of ``dfd``; a name in a subdirectory (a Keras file in the run's
    ``ckpt/``) is unlinked through its own directory's fd, reached without following a link."""
    lstat, unlink = os.lstat, os.unlink  # the loop runs once per file: local names
    removed, freed = result.removed, 0
    for name in names:
        if "/" in name:
            _unlink_nested(dfd, name, result)
            continue
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


def _unlink_nested(dfd: int, name: str, result: Removal) -> None:
    *dirs, base = name.split("/")
    fd = dfd
    try:
        for part in dirs:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            if fd != dfd:
                os.close(fd)
            fd = nfd
        nested = Removal()
        _unlink_all(fd, [base], nested)
    except FileNotFoundError:
        result.missing.append(name)
        return
    except OSError as exc:  # a symlink on the way (ELOOP, ENOTDIR), permissions …
        result.errors.append(f"{name}: {exc.strerror}")
        return
    finally:
        if fd != dfd:
            os.close(fd)
    result.removed += [name] * len(nested.removed)
    result.missing += [name] * len(nested.missing)
    result.errors += [f"{name}: {e.partition(': ')[2]}" for e in nested.errors]
    result.bytes_freed += nested.bytes_freed


# A save renames each temporary name within seconds: one untouched for a day is from a save that
# died (and one of a checkpoint being saved right now is never touched).
STALE_TEMP_AGE = 86400.0

# TensorFlow's own temporary names (traced on TF 2.21): its bundle writer writes every file of a
# checkpoint as "<file>.tempstate<random>" and renames it; the TF1 ".meta" goes through
# "<file>.tmp<uuid hex>"; a TF2 save writes its shards into "<prefix>_temp/part-<i>-of-<n>.…",
# moves the data out and removes the directory.
_TEMP_FILE = re.compile(
    r"(?P<a>.+)\.(?:index|data-\d{5}-of-\d{5})\.tempstate\d+|(?P<b>.+)\.meta\.tmp[0-9a-f]{32}"
)
_TEMP_DIR = re.compile(r"(?P<a>.+)_temp")
_PART = re.compile(r"part-\d{5}-of-\d{5}\.(?:index|data-\d{5}-of-\d{5})(?:\.tempstate\d+)?")


@dataclass(frozen=True)
class Leftover:
    """A temporary name TensorFlow left in a run directory, and the checkpoint it was for."""

    name: str  # base name in the run directory
    prefix: str  # base name of the checkpoint prefix it belongs to
    parts: tuple[str, ...] | None = None  # a "<prefix>_temp" directory: the part files in it

    @property
    def label(self) -> str:
        if self.parts is None:
            return self.name
        return f"{self.name}/ ({len(self.parts)} part file{'s' * (len(self.parts) != 1)})"


def find_leftovers(
    root: StrPath, directory: StrPath, older_than: float = STALE_TEMP_AGE
) -> list[Leftover]:
    """TensorFlow's stale temporary names in ``directory``, by name, type, content and age.

    Only regular files and directories holding nothing but TF's part files qualify; whether
    their prefix is a recorded checkpoint is the caller's to check.
    """
    cutoff = time.time() - older_than
    try:
        with open_dir_under(root, directory) as dfd:
            with os.scandir(dfd) as it:
                # Every name of a run passes here: a substring test before any regex.
                names = [e.name for e in it if "temp" in e.name or ".tmp" in e.name]
            found = (_leftover(dfd, name, cutoff) for name in names)
            return [f for f in found if f is not None]
    except FileNotFoundError:
        return []
    except OSError as exc:  # UnsafePath included
        log.warning("looking for TensorFlow temp files in %s: %s", directory, exc)
        return []


def remove_leftovers(
    root: StrPath,
    directory: StrPath,
    leftovers: Sequence[Leftover],
    older_than: float = STALE_TEMP_AGE,
) -> Removal:
    """Remove planned ``leftovers`` that still are what they were (checked again, one by one).

    A directory loses only its TF part files and is then removed only if empty: anything else
    that appeared in it stays, and the directory with it.
    """
    result = Removal()
    cutoff = time.time() - older_than
    try:
        with open_dir_under(root, directory) as dfd:
            for planned in leftovers:
                now = _leftover(dfd, planned.name, cutoff)
                if now is None or now.prefix != planned.prefix:
                    result.missing.append(planned.name)  # gone, or no longer TF's: left alone
                elif now.parts is None:
                    _unlink_all(dfd, [now.name], result)
                else:
                    _remove_temp_dir(dfd, now, result)
    except FileNotFoundError:
        result.missing.extend(p.name for p in leftovers)
    except OSError as exc:
        result.errors.append(str(exc))
    return result


def _leftover(dfd: int, name: str, cutoff: float) -> Leftover | None:
    """``name`` as a stale TensorFlow temporary name in ``dfd``, else None."""
    m = _TEMP_FILE.fullmatch(name)
    try:
        if m:
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                return Leftover(name, m["a"] or m["b"])
            return None
        m = _TEMP_DIR.fullmatch(name)
        if m is None:
            return None
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)  # O_NOFOLLOW: a symlink is never TF's
    except OSError:
        return None
    try:
        if os.fstat(fd).st_mtime >= cutoff:
            return None
        parts = []
        with os.scandir(fd) as it:
            for e in it:
                if not _PART.fullmatch(e.name):
                    return None
                st = e.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_mtime >= cutoff:
                    return None
                parts.append(e.name)
        return Leftover(name, m["a"], tuple(sorted(parts)))
    except OSError:
        return None
    finally:
        os.close(fd)


def _remove_temp_dir(dfd: int, leftover: Leftover, result: Removal) -> None:
    try:
        fd = os.open(leftover.name, _DIR_FLAGS, dir_fd=dfd)
    except OSError as exc:
        result.errors.append(f"{leftover.name}: {exc.strerror}")
        return
    inner = Removal()
    try:
        _unlink_all(fd, leftover.parts or (), inner)
    finally:
        os.close(fd)
    result.removed += [f"{leftover.name}/{n}" for n in inner.removed]
    result.errors += [f"{leftover.name}/{e}" for e in inner.errors]
    result.bytes_freed += inner.bytes_freed
    try:
        os.rmdir(leftover.name, dir_fd=dfd)  # fails if anything else appeared in it: kept
        result.removed.append(leftover.name + "/")
    except OSError as exc:
        result.errors.append(f"{leftover.name}/: {exc.strerror}; kept")


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
