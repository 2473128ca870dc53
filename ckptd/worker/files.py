"""Files the worker reads and writes: checkpoint presence, digests, durable writes (no TF)."""

from __future__ import annotations

import hashlib
import os
import re

from ckptd.worker.protocol import NOT_FOUND, WorkerFailure


def require_checkpoint(prefix: str) -> None:
    """A TF checkpoint (prefix.index + every data shard) or a single-file checkpoint exists."""
    if os.path.isfile(prefix + ".index"):
        shards = [
            p
            for p in os.listdir(os.path.dirname(prefix) or ".")
            if p.startswith(os.path.basename(prefix) + ".data-")
        ]
        counts = {int(m.group(1)) for s in shards if (m := re.search(r"-of-(\d+)$", s))}
        if not counts:
            raise WorkerFailure(NOT_FOUND, f"checkpoint {prefix} has an index but no data files")
        total = max(counts)
        missing = [
            f"{prefix}.data-{i:05d}-of-{total:05d}"
            for i in range(total)
            if not os.path.isfile(f"{prefix}.data-{i:05d}-of-{total:05d}")
        ]
        if missing:
            raise WorkerFailure(NOT_FOUND, f"checkpoint {prefix} is missing {missing[0]}")
        return
    if os.path.isfile(prefix):
        return
    raise WorkerFailure(NOT_FOUND, f"checkpoint {prefix} not found (no {prefix}.index)")


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str, files: list[str]) -> None:
    """fsync the files written and every directory under (and including) root, then its parent."""
    for rel in files:
        _fsync_path(os.path.join(root, rel))
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        _fsync_path(dirpath)
    _fsync_path(os.path.dirname(root))


def write_file(path: str, data: bytes) -> None:
    """Write via path.tmp + fsync + rename: readers see no file or the whole one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
