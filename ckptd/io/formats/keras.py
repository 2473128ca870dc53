"""Keras checkpoints: one ``.keras`` zip archive or ``.weights.h5`` HDF5 file each."""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import zipfile
from pathlib import Path

from ckptd.io import safeio
from ckptd.io.formats.found import COMPLETE, CORRUPT, INCOMPLETE, Found, Seen, stat_entry
from ckptd.io.kerasname import KerasTemplate

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def keras(
    dir_fd: int,
    run_dir: Path,
    entry: os.DirEntry[str],
    template: KerasTemplate | None,
    known: dict[str, tuple[int, ...]] | None,
    now: float,
    stale_after: float,
    rel: str = "",
) -> Found | None:
    """The Keras checkpoint ``entry`` of ``dir_fd``, the run's subdirectory ``rel`` ("": the run
    directory itself); None when it vanished since the listing."""
    st = stat_entry(entry)
    if st is None:
        return None
    name = entry.name
    is_h5 = name.endswith(".weights.h5")
    fmt, step, metrics = keras_name(name, template)
    signature = (st.st_size, st.st_mtime_ns)
    path = f"{rel}/{name}" if rel else name  # its one file, relative to the run directory
    prefix = str(run_dir / path)
    seen = Seen(prefix, step, (path,), st.st_size, False, st.st_mtime, metrics)
    if entry.is_symlink():
        return seen.found(fmt, CORRUPT, "symlink; not followed", signature)
    state, problem = COMPLETE, None
    if known is None or known.get(prefix) != signature:
        try:
            if not stat.S_ISREG(st.st_mode):
                raise safeio.NotRegularFile(errno.EINVAL, "not a regular file")
            problem = _incomplete(dir_fd, name, is_h5, st.st_size)
        except safeio.NotRegularFile:  # (or swapped for a FIFO or a symlink since the listing)
            state, problem = CORRUPT, "not a regular file"
        else:
            state = COMPLETE if problem is None else INCOMPLETE
    if state == INCOMPLETE and now - st.st_mtime > stale_after:
        # Not growing any more: a truncated or corrupt file, not one being written.
        state, problem = CORRUPT, f"{problem}; unchanged for {now - st.st_mtime:.0f} s"
    return seen.found(fmt, state, problem, signature)


def keras_name(
    name: str, template: KerasTemplate | None
) -> tuple[str, int | None, dict[str, float]]:
    """(format, step, metrics) a Keras checkpoint's file name says (the template's fields, else
    its first number)."""
    is_h5 = name.endswith(".weights.h5")
    fmt = "keras_weights" if is_h5 else "keras"
    parsed = template.parse(name) if template else None
    if parsed is None:
        digits = re.findall(r"\d+", name.rsplit(".weights.h5" if is_h5 else ".keras", 1)[0])
        parsed = (int(digits[0]) if digits else None, {})
    return fmt, parsed[0], parsed[1]


def _incomplete(dir_fd: int, name: str, is_h5: bool, size: int) -> str | None:
    """None when the file is whole, else why not (zip end record / HDF5 end-of-file address).

    Raises :class:`safeio.NotRegularFile` for a FIFO, device or symlink (never opened for real).
    """
    fd, _st = safeio.open_regular(name, dir_fd)
    try:
        with os.fdopen(fd, "rb") as fh:
            if is_h5:
                return hdf5_incomplete(fh.read(48), size)
            # (reads only the end of the archive: its end record, a bounded search)
            if not zipfile.is_zipfile(fh):
                return "not a complete zip archive (still being written, or truncated)"
            return None
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def hdf5_incomplete(head: bytes, size: int) -> str | None:
    """Why an HDF5 file whose first 48 bytes are ``head`` is not whole, or None."""
    if len(head) < 16 or not head.startswith(HDF5_SIGNATURE):
        return "no HDF5 signature (still being written, or not an HDF5 file)"
    version = head[8]
    if version in (0, 1):
        eof_at = 40 if version == 0 else 44
        (eof,) = struct.unpack_from("<Q", head, eof_at) if len(head) >= eof_at + 8 else (0,)
    else:
        (eof,) = struct.unpack_from("<Q", head, 28) if len(head) >= 36 else (0,)
        if head[11] & 1:
            return "HDF5 file is still open for writing"
    if eof == 0 or eof > size:
        return f"HDF5 file is shorter than its end-of-file address ({size} < {eof})"
    return None
