"""A local copy of an object-store checkpoint, for the worker.

The worker reads local files only (TensorFlow 2.6+ has no ``s3://`` of its own, and the worker
never imports fsspec), so a checkpoint on an object store is downloaded first: into one local
directory per run (the worker keeps a run's graph and model warm by that directory), checked
against the version ckptd recorded, and removed once the worker is done with it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ckptd.api.objprune import recorded
from ckptd.api.objstores import key_of, store_for
from ckptd.core.model import Checkpoint
from ckptd.io.objstore import StoreError, is_object_url, transfer
from ckptd.io.objstore.failures import NOT_FOUND
from ckptd.io.objstore.prune import Recorded
from ckptd.store import signatures
from ckptd.store.handle import Store

CACHE = "ckptd-objects"


class CopyFailed(Exception):
    """The checkpoint could not be copied here; says why (``gone``: it no longer exists)."""

    def __init__(self, message: str, *, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass(frozen=True)
class Local:
    prefix: str  # the checkpoint's local prefix (or file)
    run_dir: str  # its local run directory


def run_dir_for(run_url: str) -> Path:
    """The local directory this process copies a run's checkpoints into (the same for every
    copy; another process has its own, so neither removes what the other is reading)."""
    digest = hashlib.sha256(run_url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"{CACHE}-{os.getuid()}" / f"{digest}-{os.getpid()}"


# Copies in use in this process (an export may read the checkpoint an evaluation is reading):
# (directory, prefix) -> users; the last one out removes the files.
_lock = threading.Lock()
_users: dict[tuple[Path, str], int] = {}


@contextmanager
def local_checkpoint(db: Store, c: Checkpoint, run_url: str) -> Iterator[Local]:
    """``c`` as local files: itself when it is local, else a copy, removed afterwards."""
    if not is_object_url(c.prefix):
        yield Local(c.prefix, run_url)
        return
    rec = recorded(c, run_url, signatures.signatures(db, [c.id]).get(c.id, ()))
    dest = run_dir_for(run_url)
    held = (dest, rec.name)
    with _lock:
        # Held while copying too: a second user waits for the first copy, then shares it.
        if _users.get(held, 0) == 0:
            _copy(c, rec, run_url, dest)
        _users[held] = _users.get(held, 0) + 1
    try:
        yield Local(str(dest / rec.name), str(dest))
    finally:
        with _lock:
            _users[held] -= 1
            if _users[held] == 0:
                del _users[held]
                _remove(dest, c.files)


def _copy(c: Checkpoint, rec: Recorded, run_url: str, dest: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        transfer.download(store_for(run_url), key_of(run_url), c.files, dest, expect=rec)
    except transfer.Rewritten as exc:
        _remove(dest, c.files)
        raise CopyFailed(f"{c.prefix}: {exc}", gone=True) from exc
    except StoreError as exc:
        _remove(dest, c.files)
        if exc.kind == NOT_FOUND:
            raise CopyFailed(f"{exc} (pruned or deleted)", gone=True) from exc
        raise CopyFailed(f"copying {c.prefix} here failed: {exc}") from exc
    except OSError as exc:  # the local disk
        _remove(dest, c.files)
        raise CopyFailed(f"copying {c.prefix} to {dest} failed: {exc}") from exc


def _remove(dest: Path, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            (dest / name).unlink()
        except FileNotFoundError:
            pass
    for sub in {n.rsplit("/", 1)[0] for n in names if "/" in n}:
        try:
            os.rmdir(dest / sub)  # left empty
        except OSError:
            pass
