"""Listing a run directory: its checkpoints (every format) and its TensorBoard event files."""

from __future__ import annotations

import os
import re
import time
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


def is_utf8(name: str) -> bool:
    """Whether a file name (surrogate-escaped by Python) is text the database can store."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _looks_like_checkpoint(name: str) -> bool:
    return name.endswith((".index", ".meta", ".keras", ".weights.h5")) or ".data-" in name


def scan_run(
    run_dir: Path,
    keras_template: str | None = None,
    known: dict[str, tuple[int, ...]] | None = None,
    *,
    root: Path | None = None,
    dir_fd: int | None = None,
    now: float | None = None,
    stale_after: float = 120.0,
    unsupported: list[str] | None = None,
    step_variable: str | None = None,
) -> list[Found]:
    """Every checkpoint in ``run_dir`` (not recursive), each with its completeness.

    The directory is ``dir_fd`` when given, else reached from the watch ``root`` (default: the
    run directory itself) without following a symlink below it. Raises OSError when it cannot
    be listed (absent, unreadable, a symlink: :class:`safeio.UnsafePath`): the caller decides
    what that means, as an empty result would say every checkpoint is gone.
    ``known`` maps prefixes already validated to their signature; unchanged ones are not re-read.
    A partial write that has not changed for ``stale_after`` seconds is reported corrupt.
    ``step_variable``: the tensor a TF checkpoint's step is read from (``step.py``).
    """
    if dir_fd is None:
        with safeio.open_dir_under(root if root is not None else run_dir, run_dir) as fd:
            return scan_run(
                run_dir,
                keras_template,
                known,
                dir_fd=fd,
                now=now,
                stale_after=stale_after,
                unsupported=unsupported,
                step_variable=step_variable,
            )
    now = time.time() if now is None else now
    groups: dict[str, Group] = {}
    keras_entries = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            name = entry.name
            # (substring tests first: this loop sees every file of every run at backfill)
            if ("tmp" in name or "temp" in name) and is_temp_name(name):
                continue
            if not name.isascii() and not is_utf8(name):
                # The database (and users' terminals) need text; such a file is reported, never
                # recorded, never deleted.
                if unsupported is not None and _looks_like_checkpoint(name):
                    unsupported.append(
                        name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    )
                continue
            if name.endswith(".index"):
                groups.setdefault(name[:-6], Group()).index = entry
            elif name.endswith(".meta"):
                groups.setdefault(name[:-5], Group()).meta = entry
            elif ".data-" in name and (m := _DATA.match(name)):
                g = groups.setdefault(m.group("prefix"), Group())
                g.data[int(m.group("shard"))] = entry
                g.totals.add(int(m.group("total")))
            elif name.endswith((".keras", ".weights.h5")) and not entry.is_dir(
                follow_symlinks=False
            ):
                keras_entries.append(entry)
    found = []
    keys = step_keys(step_variable)
    for name, g in groups.items():
        if g.index is None and not g.data:
            continue  # a lone .meta (e.g. a graph export) is not a checkpoint
        f = bundle(dir_fd, run_dir, name, g, known, now, stale_after, keys)
        if f is not None:
            found.append(f)
    template = KerasTemplate(keras_template) if keras_template else None
    for entry in keras_entries:
        f = keras(dir_fd, run_dir, entry, template, known, now, stale_after)
        if f is not None:
            found.append(f)
    return found


def event_files(
    run_dir: Path,
    max_depth: int = 2,
    *,
    dir_mtimes: dict[str, int] | None = None,
    root: Path | None = None,
    dir_fd: int | None = None,
) -> list[Path]:
    """TensorBoard event files in the run and its subdirectories (``eval/``, ``validation/``).

    The run directory is ``dir_fd``, or is reached from ``root`` (default: itself) as in
    :func:`scan_run`; subdirectories are entered through directory fds, never through a symlink.
    An unreadable run directory raises OSError; an unreadable subdirectory is skipped.
    ``dir_mtimes`` collects each subdirectory's mtime, taken before it is listed (so a file
    created during the listing changes it): what a later quick rescan compares.
    """
    if dir_fd is None:
        with safeio.open_dir_under(root if root is not None else run_dir, run_dir) as fd:
            return event_files(run_dir, max_depth, dir_mtimes=dir_mtimes, dir_fd=fd)
    out: list[Path] = []

    def walk(fd: int, d: Path, depth: int) -> None:
        with os.scandir(fd) as it:
            for entry in it:
                name = entry.name
                if not is_utf8(name):
                    continue
                # Any entry but a directory: a FIFO or symlink is listed so that its read
                # reports it (corrupt, "not a regular file") instead of it passing unseen.
                if name.startswith(EVENT_FILE) and not entry.is_dir(follow_symlinks=False):
                    out.append(d / name)
                elif (
                    depth < max_depth
                    and entry.is_dir(follow_symlinks=False)
                    and not is_temp_name(name)
                ):
                    try:
                        sub = safeio.open_subdir(name, fd)
                    except OSError:
                        continue  # gone, unreadable, or swapped for a symlink: skipped
                    try:
                        if dir_mtimes is not None:
                            dir_mtimes[str(d / name)] = os.fstat(sub).st_mtime_ns
                        walk(sub, d / name, depth + 1)
                    except OSError:
                        continue
                    finally:
                        os.close(sub)

    walk(dir_fd, Path(run_dir), 0)
    return sorted(out)
