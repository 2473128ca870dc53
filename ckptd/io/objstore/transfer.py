"""Copies between an object store and local directories, for the worker (which reads and writes
only local files: TensorFlow 2.6+ has no ``s3://`` of its own, and the worker never imports
fsspec).

Downloads: a checkpoint's recorded objects into a local directory, checked against the version
recorded for its main object (a checkpoint rewritten meanwhile is not evaluated as the old one).

Uploads of exports: a version directory appears to TF Serving as soon as one of its objects
exists, and Serving loads it as soon as ``saved_model.pb`` is there (serving#1086). So every other
object is uploaded first and the marker (``saved_model.pb``, else the export's manifest) last,
by itself: a version without its marker was never published, and is removed by recovery.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.io.objstore.failures import FAILED, NOT_FOUND, StoreError
from ckptd.io.objstore.prune import Recorded, objects_of
from ckptd.io.objstore.store import Store

# The objects whose presence publishes a version, in order of preference.
MARKERS = ("saved_model.pb", "saved_model.pbtxt")
MANIFEST = "assets.extra/ckptd.json"


class Rewritten(StoreError):
    """The checkpoint's main object is not the version ckptd recorded any more."""

    def __init__(self, message: str) -> None:
        super().__init__(FAILED, message)


def _call(store: Store, method: str, key: str, fn: Callable[[], Any]) -> Any:
    """One request through the store: counted, retried when transient, a StoreError else."""
    return store._call(method, key, fn)  # the Store's own accounting and retries


def download(
    store: Store, run_key: str, names: Iterable[str], dest: Path, *, expect: Recorded | None = None
) -> int:
    """Copy the run's objects ``names`` into ``dest`` (same relative names); the bytes copied.
    With ``expect``: raises :class:`Rewritten` when its main object is not the recorded version
    (checked by one listing before the copy, and once more after it)."""
    names = list(names)
    for name in names:
        if not name or any(p in ("", ".", "..") for p in name.split("/")):
            raise StoreError(FAILED, f"{name!r}: not a plain relative object name; refused")
    if expect is not None:
        _check_version(store, run_key, expect)
    total = 0
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        key = f"{run_key}/{name}"
        _call(store, "GET", key, functools.partial(store.fs.get_file, key, str(target)))
        total += target.stat().st_size
    if expect is not None:
        _check_version(store, run_key, expect)
    return total


def _check_version(store: Store, run_key: str, expect: Recorded) -> None:
    present = objects_of(store, run_key, expect.files)
    if expect.main not in present:
        url = store.url_of(f"{run_key}/{expect.main}")
        raise StoreError(NOT_FOUND, f"{url}: gone", url=url)
    if not expect.matches(present):
        raise Rewritten(
            f"{expect.name}: rewritten since it was recorded (it was {expect.describe()})"
        )


@dataclass(frozen=True)
class Upload:
    """An export directory's files, as uploaded: the body first, the marker last."""

    body: tuple[str, ...]
    marker: str


def plan_upload(local: Path) -> Upload:
    """Every file under ``local`` (relative names, sorted), and which of them goes last."""
    names = sorted(
        os.path.relpath(os.path.join(d, f), local).replace(os.sep, "/")
        for d, _, files in os.walk(local)
        for f in files
    )
    if not names:
        raise StoreError(FAILED, f"{local}: nothing to upload")
    # As marker_of says: the SavedModel when there is one, else the manifest.
    marker = next((m for m in MARKERS if m in names), MANIFEST if MANIFEST in names else names[-1])
    return Upload(tuple(n for n in names if n != marker), marker)


def upload_body(store: Store, local: Path, dest_key: str, plan: Upload) -> None:
    """Upload every file of ``plan`` but its marker (nothing is published yet)."""
    for name in plan.body:
        _put(store, local / name, f"{dest_key}/{name}")


def upload_marker(store: Store, local: Path, dest_key: str, plan: Upload) -> None:
    """Upload the marker: from now on the version is published (one PUT)."""
    _put(store, local / plan.marker, f"{dest_key}/{plan.marker}")


def _put(store: Store, path: Path, key: str) -> None:
    _call(store, "PUT", key, functools.partial(store.fs.put_file, str(path), key))


def upload_export(store: Store, local: Path, dest_key: str) -> Upload:
    """:func:`upload_body` then :func:`upload_marker`."""
    plan = plan_upload(local)
    upload_body(store, local, dest_key, plan)
    upload_marker(store, local, dest_key, plan)
    return plan


def marker_of(formats: Iterable[str]) -> tuple[str, ...]:
    """The names that publish an export of ``formats`` (any one of them)."""
    return MARKERS if "saved_model" in formats else (MANIFEST,)


def highest_version(store: Store, root_key: str) -> int:
    """The highest numeric version prefix under ``root_key`` (0 if none), published or not: a
    new version goes above a half-uploaded one, never into it."""
    _, prefixes = store.list_dir(root_key)  # (nothing there: empty)
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in prefixes)
    return max((int(n) for n in names if n.isdigit()), default=0)


def is_published(store: Store, version_key: str, marker: tuple[str, ...] = MARKERS) -> bool:
    """Whether the version at ``version_key`` has one of the ``marker`` objects (one listing
    per folder of the marker names)."""
    folders: dict[str, set[str]] = {}
    for m in marker:
        folder, _, name = m.rpartition("/")
        folders.setdefault(folder, set()).add(name)
    for folder, names in folders.items():
        objects, _ = store.list_dir(f"{version_key}/{folder}" if folder else version_key)
        if names & {o.name for o in objects}:
            return True
    return False


def remove_tree(store: Store, key: str) -> int:
    """Delete every object under ``key`` (a version ckptd wrote); the number deleted."""
    keys = [o.key for o in store.list_tree(key)]
    store.delete(keys)
    return len(keys)
