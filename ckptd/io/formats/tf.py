"""TF1 Saver and TF2 object checkpoints: ``PREFIX.index`` + data shards [+ ``PREFIX.meta``]."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.io import safeio
from ckptd.io.formats.found import (
    COMPLETE,
    CORRUPT,
    INCOMPLETE,
    Found,
    Seen,
    stat_entry,
    step_from_name,
)
from ckptd.io.formats.step import DEFAULT_KEYS, read_step
from ckptd.io.formats.tensorbundle import BundleError, BundleHeader, read_header

# The largest .index ckptd reads. An index holds one short entry per tensor (its name, dtype,
# shape, shard, offset: tens of bytes): 64 MiB is over half a million tensors with 100-byte
# names, far beyond any real model; a bigger file is recorded corrupt, never loaded.
INDEX_MAX_BYTES = 64 << 20


@dataclass
class Group:
    """The files of one prefix in a run directory's listing."""

    index: os.DirEntry[str] | None = None
    meta: os.DirEntry[str] | None = None
    data: dict[int, os.DirEntry[str]] = field(default_factory=dict)
    totals: set[int] = field(default_factory=set)  # the MMMMM of each .data-NNNNN-of-MMMMM


def bundle(
    dir_fd: int,
    run_dir: Path,
    name: str,
    g: Group,
    known: dict[str, tuple[int, ...]] | None,
    now: float,
    stale_after: float,
    step_keys: tuple[bytes, ...] = DEFAULT_KEYS,
) -> Found | None:
    """The checkpoint ``name`` of the listing ``g``; None when its files vanished meanwhile.

    Its step is the first of ``step_keys`` the checkpoint holds (see ``step.py``), else the
    number in its name."""
    prefix = os.path.join(run_dir, name)
    files = []
    size = 0
    mtime = 0.0
    shard_sizes: dict[int, int] = {}
    odd = []  # FIFOs, sockets, devices, directories: never opened, the checkpoint is corrupt
    for shard, entry in [(-1, g.index), (-1, g.meta), *g.data.items()]:
        if entry is not None and (st := stat_entry(entry)) is not None:
            files.append(entry.name)
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
            if shard >= 0:
                shard_sizes[shard] = st.st_size
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                odd.append(entry.name)
    if not files:
        return None  # every file vanished since the listing (the trainer deleted it)
    has_meta = g.meta is not None
    fmt = "tf1" if has_meta else "tf2"
    seen = Seen(prefix, step_from_name(name), tuple(sorted(files)), size, has_meta, mtime)
    if g.index is None:
        # Data without an index: a save in progress (both TF1 and TF2 write the index last),
        # or, long after, a save that died.
        if now - mtime > stale_after:
            reason = f"no .index file; data unchanged for {now - mtime:.0f} s"
            return seen.found(fmt, CORRUPT, reason)
        return seen.found(fmt, INCOMPLETE, "index not written yet")
    ist = stat_entry(g.index)
    if ist is None:
        return None
    links = [
        e.name for e in (g.index, g.meta, *g.data.values()) if e is not None and e.is_symlink()
    ]
    if links:
        return seen.found(
            fmt,
            CORRUPT,
            f"{', '.join(links)}: symlink, not followed (a checkpoint's files must be real files)",
        )
    signature = (
        ist.st_size,
        ist.st_mtime_ns,
        len(g.data),
        int(has_meta),
        sum(shard_sizes.values()),
    )
    if odd:
        return seen.found(fmt, CORRUPT, f"{', '.join(sorted(odd))}: not a regular file", signature)
    before = known.get(prefix) if known is not None else None
    if before is not None and len(before) in (6, 7) and before[:5] == signature:
        # Unchanged since it was validated: skip re-reading the index (keeps rescans cheap).
        # The last elements remember what the index said: object graph = TF2 (the .meta alone
        # cannot tell, as a TF1 checkpoint has none until its meta graph arrives, or ever), and
        # the step read from the data (-1: none, the name's). Checkpoints validated before
        # steps were read (6 elements) keep the step they were recorded with, the name's.
        if len(before) == 7 and before[6] >= 0:
            seen.step = before[6]
        return seen.found("tf2" if before[5] else "tf1", COMPLETE, None, tuple(before))
    try:
        fd, fst = safeio.open_regular(g.index.name, dir_fd)
        try:
            data = safeio.read_fd(fd, fst.st_size, INDEX_MAX_BYTES)
        finally:
            os.close(fd)
        if (fst.st_size, fst.st_mtime_ns) != (ist.st_size, ist.st_mtime_ns):
            # Written since the listing (TF2 writes .index in place): the signature would be of
            # another version than the one read, a "rewrite" at the next look. Looked at again.
            return seen.found(fmt, INCOMPLETE, "index changed while being read")
        header = read_header(data, step_keys)
    except safeio.TooLarge:
        reason = f"index is larger than the {INDEX_MAX_BYTES >> 20} MiB cap; not read"
        return seen.found(fmt, CORRUPT, reason, signature)
    except safeio.NotRegularFile:  # swapped for a FIFO or a device since the listing
        return seen.found(fmt, CORRUPT, f"{g.index.name}: not a regular file", signature)
    except BundleError as exc:
        state, reason = index_error(exc, now - ist.st_mtime, stale_after)
        return seen.found(fmt, state, reason, signature)
    except OSError as exc:
        return seen.found(fmt, INCOMPLETE, f"index unreadable: {exc.strerror}")
    fmt = "tf2" if header.is_object_graph else "tf1"
    problem = shards_problem(header, g.totals, g.data.keys(), shard_sizes)
    if problem is not None:
        return seen.found(fmt, CORRUPT, problem, signature)
    at = header.located
    step = read_step(dir_fd, g.data[at.shard].name, at) if at and at.shard in g.data else None
    if step is not None:
        seen.step = step
    return seen.found(
        fmt, COMPLETE, None, (*signature, int(header.is_object_graph), -1 if step is None else step)
    )


def index_error(exc: BundleError, age: float, stale_after: float) -> tuple[str, str]:
    """(state, reason) of a checkpoint whose index did not parse, unchanged for ``age`` s.

    No footer yet = still being written (TF2 writes .index in place; on an object store a
    reader never sees that, but a truncated upload looks the same); anything else = corrupt.
    An index without a footer whose data files are long finished is truncated.
    """
    state = INCOMPLETE if "footer" in str(exc) or "too short" in str(exc) else CORRUPT
    reason = f"index: {exc}"
    if state == INCOMPLETE and age > stale_after:
        state = CORRUPT
        reason = f"index truncated: {exc}; unchanged for {age:.0f} s"
    return state, reason


def shards_problem(
    header: BundleHeader,
    totals: Collection[int],
    present: Collection[int],
    shard_sizes: dict[int, int],
) -> str | None:
    """Why the data shards listed cannot be the ones the index describes, or None.
    ``totals``: the MMMMM of the listed shard names; ``present``: their NNNNN."""
    total = header.num_shards or (max(totals) if totals else 0)
    if len(totals) > 1 or (totals and total not in totals):
        return f"data shards disagree on the shard count ({sorted(totals)} vs index {total})"
    missing = [i for i in range(total) if i not in present]
    if missing:
        shown = ", ".join(f"{i:05d}" for i in missing[:4]) + (" …" if len(missing) > 4 else "")
        return f"missing data shard(s) {shown} of {total:05d}"
    short = [
        f"{i:05d} has {shard_sizes.get(i, 0):,} bytes, the index needs {need:,}"
        for i, need in sorted(header.shard_bytes.items())
        if i in shard_sizes and shard_sizes[i] < need
    ]
    if short:
        return "data shard " + "; ".join(short[:3]) + " (truncated, or not this checkpoint's data)"
    return None
