"""Listing a run directory: its checkpoints (every format) and its TensorBoard event files."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.io import safeio
from ckptd.io.formats.found import Found
from ckptd.io.formats.keras import keras
from ckptd.io.formats.step import step_keys
from ckptd.io.formats.tf import Group, bundle
from ckptd.io.kerasname import KerasTemplate

_DATA = re.compile(r"^(?P<prefix>.+)\.data-(?P<shard>\d{5})-of-(?P<total>\d{5})$")
_TEMP = re.compile(r"(\.tempstate|\.tmp|_temp$|_temp/)")
EVENT_FILE = "events.out.tfevents."


def is_temp_name(name: str) -> bool:
    """Names TensorFlow and Keras use while writing: never checkpoints, never deleted by us."""
    return bool(_TEMP.search(name))


def _skipped_temp(name: str) -> bool:
    return is_temp_name(name) and not name.startswith(EVENT_FILE)


def is_utf8(name: str) -> bool:
    """Whether a file name (surrogate-escaped by Python) is text the database can store."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _looks_like_checkpoint(name: str) -> bool:
    return name.endswith((".index", ".meta", ".keras", ".weights.h5")) or ".data-" in name


# Files that look like checkpoints but are none ckptd reads, with what to do about them.
# (A run holding only these would otherwise look empty, as if the daemon had missed it.)
_UNREAD = (
    (
        (".h5", ".hdf5"),
        "HDF5 file; ckptd reads Keras 3 .keras and .weights.h5 files (save under such a name)",
    ),
    (
        (".ckpt",),
        "no .index for it; ckptd reads TensorFlow's index + data checkpoints (PREFIX.index)",
    ),
    ((".pb",), "a graph, not a checkpoint; ckptd records the checkpoints themselves"),
)
_SAVED_MODEL = "saved_model.pb"  # a directory holding one is an export, not checkpoints
SUBDIR_INDEX = (
    "a TensorFlow checkpoint below the run directory; ckptd records index + data checkpoints "
    "only at a run's top: make that directory a run (watch path or runs glob)"
)


def unread_reason(name: str) -> str | None:
    """Why a checkpoint-like file ``name`` is not recorded, or None when it is no such file."""
    if name.endswith(".weights.h5") or name in (_SAVED_MODEL, "fingerprint.pb"):
        return None
    for suffixes, why in _UNREAD:
        if name.endswith(suffixes):
            return why
    return None


@dataclass
class Listing:
    """What one walk of a run directory found."""

    checkpoints: list[Found] = field(default_factory=list)
    event_files: list[Path] = field(default_factory=list)
    # Subdirectory (relative path) -> its mtime, taken before it was listed: what a quick
    # rescan compares (a file created during the listing changes it).
    dir_mtimes: dict[str, int] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)  # non-UTF-8 checkpoint-like names
    unread: dict[str, str] = field(default_factory=dict)  # relative path -> why not recorded


def list_run(
    run_dir: Path,
    keras_template: str | None = None,
    known: dict[str, tuple[int, ...]] | None = None,
    *,
    root: Path | None = None,
    dir_fd: int | None = None,
    now: float | None = None,
    stale_after: float = 120.0,
    max_depth: int = 2,
    step_variable: str | None = None,
) -> Listing:
    """Checkpoints and TensorBoard event files of a run, in one walk of it.

    TF1/TF2 checkpoints (index + data) are those at the run's top, where TensorFlow keeps their
    ``checkpoint`` state file; Keras files and event files are found in subdirectories too, down
    to ``max_depth`` levels (``ckpt/model.01.keras``, ``logs/validation/events.out…``).
    Subdirectories are entered through directory fds, never through a symlink; an unreadable
    one is skipped, and so is a SavedModel export (a directory holding ``saved_model.pb``).

    The run directory is ``dir_fd`` when given, else reached from the watch ``root`` (default:
    the run directory itself) without following a symlink below it. Raises OSError when it
    cannot be listed (absent, unreadable, a symlink: :class:`safeio.UnsafePath`): the caller
    decides what that means, as an empty result would say every checkpoint is gone.
    ``known`` maps prefixes already validated to their signature; unchanged ones are not re-read.
    A partial write that has not changed for ``stale_after`` seconds is reported corrupt.
    A TF checkpoint's step is read from ``step_variable`` (default: see ``step.py``).
    """
    if dir_fd is None:
        with safeio.open_dir_under(root if root is not None else run_dir, run_dir) as fd:
            return list_run(
                run_dir,
                keras_template,
                known,
                dir_fd=fd,
                now=now,
                stale_after=stale_after,
                max_depth=max_depth,
                step_variable=step_variable,
            )
    out = Listing()
    walk = _Walk(
        Path(run_dir),
        KerasTemplate(keras_template) if keras_template else None,
        known,
        time.time() if now is None else now,
        stale_after,
        max_depth,
        step_keys(step_variable),
        out,
    )
    walk.top(dir_fd)
    return out


@dataclass
class _Walk:
    run_dir: Path
    template: KerasTemplate | None
    known: dict[str, tuple[int, ...]] | None
    now: float
    stale_after: float
    max_depth: int
    step_keys: tuple[bytes, ...]
    out: Listing

    def top(self, dir_fd: int) -> None:
        groups: dict[str, Group] = {}
        keras_entries: list[os.DirEntry[str]] = []
        subdirs: list[str] = []
        events = self.out.event_files
        with os.scandir(dir_fd) as it:
            for entry in self._usable(it, ""):
                name = entry.name
                if name.endswith(".index"):
                    groups.setdefault(name[:-6], Group()).index = entry
                elif name.endswith(".meta"):
                    groups.setdefault(name[:-5], Group()).meta = entry
                elif ".data-" in name and (m := _DATA.match(name)):
                    g = groups.setdefault(m.group("prefix"), Group())
                    g.data[int(m.group("shard"))] = entry
                    g.totals.add(int(m.group("total")))
                else:
                    self._other(entry, "", keras_entries, subdirs, events)
        found = self.out.checkpoints
        for name, g in groups.items():
            if g.index is None and not g.data:
                continue  # a lone .meta (e.g. a graph export) is not a checkpoint
            f = bundle(
                dir_fd,
                self.run_dir,
                name,
                g,
                self.known,
                self.now,
                self.stale_after,
                self.step_keys,
            )
            if f is not None:
                found.append(f)
        self._keras(dir_fd, "", keras_entries)
        self._descend(dir_fd, "", subdirs, 0)
        events.sort()

    def _other(
        self,
        entry: os.DirEntry[str],
        rel: str,
        keras_entries: list[os.DirEntry[str]],
        subdirs: list[str],
        events: list[Path],
    ) -> None:
        """An entry that is no part of an index + data checkpoint at the run's top."""
        name = entry.name
        if name.endswith((".keras", ".weights.h5")) and not entry.is_dir(follow_symlinks=False):
            keras_entries.append(entry)
        elif name.startswith(EVENT_FILE):
            # Any entry but a directory: a FIFO or symlink is listed so that its read
            # reports it (corrupt, "not a regular file") instead of it passing unseen.
            if not entry.is_dir(follow_symlinks=False):
                events.append(self.run_dir / rel / name if rel else self.run_dir / name)
        elif entry.is_dir(follow_symlinks=False):
            if not is_temp_name(name):
                subdirs.append(name)
        elif (why := unread_reason(name)) is not None:
            self.out.unread[f"{rel}/{name}" if rel else name] = why

    def _sub(self, dir_fd: int, rel: str, depth: int) -> None:
        """List the subdirectory ``rel`` (open as ``dir_fd``) at ``depth`` (1 = in the run)."""
        keras_entries: list[os.DirEntry[str]] = []
        subdirs: list[str] = []
        events: list[Path] = []
        index_names: list[str] = []
        saved_model = False
        with os.scandir(dir_fd) as it:
            for entry in self._usable(it, rel):
                name = entry.name
                if name.endswith(".index"):
                    index_names.append(name)
                elif name == _SAVED_MODEL:
                    saved_model = True
                elif ".data-" not in name and not name.endswith(".meta"):
                    self._other(entry, rel, keras_entries, subdirs, events)
        self.out.event_files += events
        if saved_model:
            return  # an export (its variables/ hold an index): nothing of the run's below
        for name in index_names:
            self.out.unread[f"{rel}/{name}"] = SUBDIR_INDEX
        self._keras(dir_fd, rel, keras_entries)
        self._descend(dir_fd, rel, subdirs, depth)

    def _descend(self, dir_fd: int, rel: str, subdirs: list[str], depth: int) -> None:
        if depth >= self.max_depth:
            return
        for name in subdirs:
            sub_rel = f"{rel}/{name}" if rel else name
            try:
                sub = safeio.open_subdir(name, dir_fd)
            except OSError:
                continue  # gone, unreadable, or swapped for a symlink: skipped
            try:
                self.out.dir_mtimes[sub_rel] = os.fstat(sub).st_mtime_ns
                self._sub(sub, sub_rel, depth + 1)
            except OSError:
                continue
            finally:
                os.close(sub)

    def _keras(self, dir_fd: int, rel: str, entries: list[os.DirEntry[str]]) -> None:
        for entry in entries:
            f = keras(
                dir_fd,
                self.run_dir,
                entry,
                self.template,
                self.known,
                self.now,
                self.stale_after,
                rel,
            )
            if f is not None:
                self.out.checkpoints.append(f)

    def _usable(self, entries: Iterator[os.DirEntry[str]], rel: str) -> Iterator[os.DirEntry[str]]:
        """The entries of a listing that may be the run's files: not a temporary name of a save
        in progress, and text (a non-UTF-8 checkpoint-like name is reported instead)."""
        for entry in entries:
            name = entry.name
            # (substring tests first: this sees every file of every run at backfill; an event
            # file's host name may hold "tmp")
            if ("tmp" in name or "temp" in name) and _skipped_temp(name):
                continue
            if not name.isascii() and not is_utf8(name):
                self._unsupported(rel, name)
                continue
            yield entry

    def _unsupported(self, rel: str, name: str) -> None:
        # The database (and users' terminals) need text; such a file is reported, never
        # recorded, never deleted.
        if _looks_like_checkpoint(name) or unread_reason(name) is not None:
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            self.out.unsupported.append(f"{rel}/{shown}" if rel else shown)


def scan_run(
    run_dir: Path,
    keras_template: str | None = None,
    known: dict[str, tuple[int, ...]] | None = None,
    *,
    root: Path | None = None,
    now: float | None = None,
    stale_after: float = 120.0,
    step_variable: str | None = None,
) -> list[Found]:
    """The checkpoints of :func:`list_run`."""
    return list_run(
        run_dir,
        keras_template,
        known,
        root=root,
        now=now,
        stale_after=stale_after,
        step_variable=step_variable,
    ).checkpoints


def event_files(run_dir: Path, *, root: Path | None = None) -> list[Path]:
    """The TensorBoard event files of :func:`list_run` (``eval/``, ``validation/`` …)."""
    return list_run(run_dir, root=root).event_files
