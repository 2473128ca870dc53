"""Checkpoint discovery and completeness checks, for every format, without TensorFlow.

``scan_run(run_dir)`` lists one directory and groups its files into checkpoints: TF1 Saver and TF2
object checkpoints (``PREFIX.index`` + ``PREFIX.data-NNNNN-of-MMMMM`` [+ ``PREFIX.meta``]) and
Keras ``.keras`` / ``.weights.h5`` files. Temporary names TensorFlow uses while writing are never
checkpoints. Each result says whether the checkpoint is complete, and if not, why.

Every file is reached through :mod:`ckptd.io.safeio`: the run directory through a directory fd from
the watch root, files relative to it, never through a symlink, never blocking on a FIFO, with
capped reads. A checkpoint file that is not a regular file is corrupt ("not a regular file").
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.core.recording import Found  # what a scan reports: the recording diff's input
from ckptd.io import safeio
from ckptd.io.formats.tensorbundle import BundleError, read_header
from ckptd.io.kerasname import KerasTemplate  # a light module of its own: the config uses it

COMPLETE, INCOMPLETE, CORRUPT = "complete", "incomplete", "corrupt"

_DATA = re.compile(r"^(?P<prefix>.+)\.data-(?P<shard>\d{5})-of-(?P<total>\d{5})$")
_STEP = re.compile(r"-(\d+)$")
_TEMP = re.compile(r"(\.tempstate|\.tmp|_temp$|_temp/)")
EVENT_FILE = "events.out.tfevents."
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The largest .index ckptd reads. An index holds one short entry per tensor (its name, dtype,
# shape, shard, offset: tens of bytes): 64 MiB is over half a million tensors with 100-byte
# names, far beyond any real model; a bigger file is recorded corrupt, never loaded.
INDEX_MAX_BYTES = 64 << 20


def is_temp_name(name: str) -> bool:
    """Names TensorFlow and Keras use while writing: never checkpoints, never deleted by us."""
    return bool(_TEMP.search(name))


@dataclass
class _Group:
    index: os.DirEntry[str] | None = None
    meta: os.DirEntry[str] | None = None
    data: dict[int, os.DirEntry[str]] = field(default_factory=dict)
    totals: set[int] = field(default_factory=set)


def step_from_name(prefix_name: str) -> int | None:
    m = _STEP.search(prefix_name)
    return int(m.group(1)) if m else None


def _stat(entry: os.DirEntry[str]) -> os.stat_result | None:
    try:
        return entry.stat(follow_symlinks=False)
    except OSError:
        return None


def _bundle(
    dir_fd: int,
    run_dir: Path,
    name: str,
    g: _Group,
    known: dict[str, tuple[int, ...]] | None,
    now: float,
    stale_after: float,
) -> Found | None:
    prefix = os.path.join(run_dir, name)
    files = []
    size = 0
    mtime = 0.0
    shard_sizes: dict[int, int] = {}
    odd = []  # FIFOs, sockets, devices, directories: never opened, the checkpoint is corrupt
    for entry in (g.index, g.meta):
        if entry is not None and (st := _stat(entry)) is not None:
            files.append(entry.name)
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                odd.append(entry.name)
    for shard, entry in g.data.items():
        if (st := _stat(entry)) is not None:
            files.append(entry.name)
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
            shard_sizes[shard] = st.st_size
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                odd.append(entry.name)
    if not files:
        return None  # every file vanished since the listing (the trainer deleted it)
    step = step_from_name(name)
    has_meta = g.meta is not None
    fmt = "tf1" if has_meta else "tf2"
    if g.index is None:
        # Data without an index: a save in progress (both TF1 and TF2 write the index last),
        # or, long after, a save that died.
        if now - mtime > stale_after:
            return Found(
                prefix,
                fmt,
                step,
                CORRUPT,
                f"no .index file; data unchanged for {now - mtime:.0f} s",
                tuple(sorted(files)),
                size,
                has_meta,
                mtime,
                (),
            )
        return Found(
            prefix,
            fmt,
            step,
            INCOMPLETE,
            "index not written yet",
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            (),
        )
    ist = _stat(g.index)
    if ist is None:
        return None
    links = [
        e.name for e in (g.index, g.meta, *g.data.values()) if e is not None and e.is_symlink()
    ]
    if links:
        return Found(
            prefix,
            fmt,
            step,
            CORRUPT,
            f"{', '.join(links)}: symlink, not followed (a checkpoint's files must be real files)",
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            (),
        )
    signature = (
        ist.st_size,
        ist.st_mtime_ns,
        len(g.data),
        int(has_meta),
        sum(shard_sizes.values()),
    )
    if odd:
        return Found(
            prefix,
            fmt,
            step,
            CORRUPT,
            f"{', '.join(sorted(odd))}: not a regular file",
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            signature,
        )
    seen = known.get(prefix) if known is not None else None
    if seen is not None and len(seen) == 6 and seen[:5] == signature:
        # Unchanged since it was validated: skip re-reading the index (keeps rescans cheap).
        # The last element remembers what the index said (object graph = TF2); the .meta alone
        # cannot tell, as a TF1 checkpoint has none until its meta graph arrives (or ever).
        return Found(
            prefix,
            "tf2" if seen[5] else "tf1",
            step,
            COMPLETE,
            None,
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            tuple(seen),
        )
    try:
        fd, fst = safeio.open_regular(g.index.name, dir_fd)
        try:
            data = safeio.read_fd(fd, fst.st_size, INDEX_MAX_BYTES)
        finally:
            os.close(fd)
        header = read_header(data)
    except (safeio.NotRegularFile, safeio.TooLarge) as exc:
        # Swapped for a FIFO or a device since the listing, or absurdly big: never a checkpoint.
        if isinstance(exc, safeio.TooLarge):
            reason = f"index is larger than the {INDEX_MAX_BYTES >> 20} MiB cap; not read"
        else:
            reason = f"{g.index.name}: not a regular file"
        return Found(
            prefix,
            fmt,
            step,
            CORRUPT,
            reason,
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            signature,
        )
    except BundleError as exc:
        # No footer yet = still being written (TF2 writes .index in place); anything else = corrupt.
        # An index without a footer whose data files are long finished is truncated.
        state = INCOMPLETE if "footer" in str(exc) or "too short" in str(exc) else CORRUPT
        reason = f"index: {exc}"
        if state == INCOMPLETE and now - ist.st_mtime > stale_after:
            state, reason = (
                CORRUPT,
                f"index truncated: {exc}; unchanged for {now - ist.st_mtime:.0f} s",
            )
        return Found(
            prefix, fmt, step, state, reason, tuple(sorted(files)), size, has_meta, mtime, signature
        )
    except OSError as exc:
        return Found(
            prefix,
            fmt,
            step,
            INCOMPLETE,
            f"index unreadable: {exc.strerror}",
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            (),
        )
    fmt = "tf2" if header.is_object_graph else "tf1"
    total = header.num_shards or (max(g.totals) if g.totals else 0)
    if len(g.totals) > 1 or (g.totals and total not in g.totals):
        return Found(
            prefix,
            fmt,
            step,
            CORRUPT,
            f"data shards disagree on the shard count ({sorted(g.totals)} vs index {total})",
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            signature,
        )
    missing = [i for i in range(total) if i not in g.data]
    if missing:
        shown = ", ".join(f"{i:05d}" for i in missing[:4]) + (" …" if len(missing) > 4 else "")
        return Found(
            prefix,
            fmt,
            step,
            CORRUPT,
            f"missing data shard(s) {shown} of {total:05d}",
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            signature,
        )
    short = [
        f"{i:05d} has {shard_sizes.get(i, 0):,} bytes, the index needs {need:,}"
        for i, need in sorted(header.shard_bytes.items())
        if i in shard_sizes and shard_sizes[i] < need
    ]
    if short:
        return Found(
            prefix,
            fmt,
            step,
            CORRUPT,
            "data shard " + "; ".join(short[:3]) + " (truncated, or not this checkpoint's data)",
            tuple(sorted(files)),
            size,
            has_meta,
            mtime,
            signature,
        )
    return Found(
        prefix,
        fmt,
        step,
        COMPLETE,
        None,
        tuple(sorted(files)),
        size,
        has_meta,
        mtime,
        (*signature, int(header.is_object_graph)),
    )


def _keras_complete(dir_fd: int, name: str, is_h5: bool, size: int) -> str | None:
    """None when the file is whole, else why not (zip end record / HDF5 end-of-file address).

    Raises :class:`safeio.NotRegularFile` for a FIFO, device or symlink (never opened for real).
    """
    fd, _st = safeio.open_regular(name, dir_fd)
    try:
        with os.fdopen(fd, "rb") as fh:
            if is_h5:
                head = fh.read(48)
                if len(head) < 16 or not head.startswith(HDF5_SIGNATURE):
                    return "no HDF5 signature (still being written, or not an HDF5 file)"
                version = head[8]
                if version in (0, 1):
                    eof_at = 40 if version == 0 else 44
                    (eof,) = (
                        struct.unpack_from("<Q", head, eof_at) if len(head) >= eof_at + 8 else (0,)
                    )
                else:
                    (eof,) = struct.unpack_from("<Q", head, 28) if len(head) >= 36 else (0,)
                    if head[11] & 1:
                        return "HDF5 file is still open for writing"
                if eof == 0 or eof > size:
                    return f"HDF5 file is shorter than its end-of-file address ({size} < {eof})"
                return None
            # (reads only the end of the archive: its end record, a bounded search)
            if not zipfile.is_zipfile(fh):
                return "not a complete zip archive (still being written, or truncated)"
            return None
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _keras(
    dir_fd: int,
    run_dir: Path,
    entry: os.DirEntry[str],
    template: KerasTemplate | None,
    known: dict[str, tuple[int, ...]] | None,
    now: float,
    stale_after: float,
) -> Found | None:
    st = _stat(entry)
    if st is None:
        return None
    name = entry.name
    is_h5 = name.endswith(".weights.h5")
    fmt = "keras_weights" if is_h5 else "keras"
    parsed = template.parse(name) if template else None
    if parsed is None:
        digits = re.findall(r"\d+", name.rsplit(".weights.h5" if is_h5 else ".keras", 1)[0])
        parsed = (int(digits[0]) if digits else None, {})
    step, metrics = parsed
    signature = (st.st_size, st.st_mtime_ns)
    prefix = str(run_dir / name)
    if entry.is_symlink():
        return Found(
            prefix,
            fmt,
            step,
            CORRUPT,
            "symlink; not followed",
            (name,),
            st.st_size,
            False,
            st.st_mtime,
            signature,
            metrics,
        )
    state, problem = COMPLETE, None
    if known is None or known.get(prefix) != signature:
        try:
            if not stat.S_ISREG(st.st_mode):
                raise safeio.NotRegularFile(errno.EINVAL, "not a regular file")
            problem = _keras_complete(dir_fd, name, is_h5, st.st_size)
        except safeio.NotRegularFile:  # (or swapped for a FIFO or a symlink since the listing)
            state, problem = CORRUPT, "not a regular file"
        else:
            state = COMPLETE if problem is None else INCOMPLETE
    if state == INCOMPLETE and now - st.st_mtime > stale_after:
        # Not growing any more: a truncated or corrupt file, not one being written.
        state, problem = CORRUPT, f"{problem}; unchanged for {now - st.st_mtime:.0f} s"
    return Found(
        prefix,
        fmt,
        step,
        state,
        problem,
        (name,),
        st.st_size,
        False,
        st.st_mtime,
        signature,
        metrics,
    )


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
) -> list[Found]:
    """Every checkpoint in ``run_dir`` (not recursive), each with its completeness.

    The directory is ``dir_fd`` when given, else reached from the watch ``root`` (default: the
    run directory itself) without following a symlink below it. Raises OSError when it cannot
    be listed (absent, unreadable, a symlink: :class:`safeio.UnsafePath`): the caller decides
    what that means, as an empty result would say every checkpoint is gone.
    ``known`` maps prefixes already validated to their signature; unchanged ones are not re-read.
    A partial write that has not changed for ``stale_after`` seconds is reported corrupt.
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
            )
    now = time.time() if now is None else now
    groups: dict[str, _Group] = {}
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
                groups.setdefault(name[:-6], _Group()).index = entry
            elif name.endswith(".meta"):
                groups.setdefault(name[:-5], _Group()).meta = entry
            elif ".data-" in name and (m := _DATA.match(name)):
                g = groups.setdefault(m.group("prefix"), _Group())
                g.data[int(m.group("shard"))] = entry
                g.totals.add(int(m.group("total")))
            elif name.endswith((".keras", ".weights.h5")) and not entry.is_dir(
                follow_symlinks=False
            ):
                keras_entries.append(entry)
    found = []
    for name, g in groups.items():
        if g.index is None and not g.data:
            continue  # a lone .meta (e.g. a graph export) is not a checkpoint
        f = _bundle(dir_fd, run_dir, name, g, known, now, stale_after)
        if f is not None:
            found.append(f)
    template = KerasTemplate(keras_template) if keras_template else None
    for entry in keras_entries:
        f = _keras(dir_fd, run_dir, entry, template, known, now, stale_after)
        if f is not None:
            found.append(f)
    return found


def is_utf8(name: str) -> bool:
    """Whether a file name (surrogate-escaped by Python) is text the database can store."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _looks_like_checkpoint(name: str) -> bool:
    return name.endswith((".index", ".meta", ".keras", ".weights.h5")) or ".data-" in name


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
