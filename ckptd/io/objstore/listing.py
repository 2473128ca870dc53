"""Listing an object-store watch: its runs, each run's objects, and a marker of what changed.

No listing is ever cached (a stale one hides new checkpoints, s3fs#703). The runs under the
watch are found with delimiter listings, one level of the ``runs`` glob at a time, so finding
them never enumerates their files. A run is then listed in one request (no delimiter): its
checkpoints and the event files of its subdirectories together, where a delimiter listing
would cost one request per subdirectory. A watch holding fewer objects than a listing page per
run is listed whole instead (``list_watch``): fewer requests for the same objects. The
listing's marker (a hash of every object's key, version and size) tells the poller whether
anything changed since the run was last recorded: an unchanged run costs no read.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import PurePosixPath

from ckptd.io.formats import is_temp_name
from ckptd.io.objstore.store import ObjectInfo, Store

# Files this many directories below the run are its own (``logs/validation/events…``), as
# ``formats.list_run`` walks a local run.
MAX_DEPTH = 2


@dataclass(frozen=True)
class RunListing:
    """The objects of one run as one listing saw them."""

    key: str  # the run's prefix: bucket/runs/r1
    url: str  # s3://bucket/runs/r1
    objects: tuple[ObjectInfo, ...]

    @property
    def present(self) -> bool:
        """An object store has no directories: a run is there while it holds an object."""
        return bool(self.objects)

    def rel(self, o: ObjectInfo) -> str:
        """``o``'s key relative to the run (``eval/events.out…``)."""
        return o.key[len(self.key) + 1 :]

    @property
    def marker(self) -> str:
        """Changes whenever an object is added, removed or rewritten (a new ETag/generation)."""
        h = hashlib.blake2b(digest_size=16)
        for o in self.objects:
            h.update(f"{self.rel(o)}\0{o.version}\0{o.size}\0{o.mtime_ns}\n".encode())
        return h.hexdigest()


def discover_runs(store: Store, runs: str | None) -> list[str]:
    """Names of the runs under the watch (relative to it; "" when the watch is one run), one
    delimiter listing per directory a level of the ``runs`` glob goes through."""
    if not runs:
        return [""]
    level = [store.root]
    for part in PurePosixPath(runs).parts:
        deeper = []
        for key in level:
            try:
                _objects, prefixes = store.list_dir(key)
            except FileNotFoundError:  # no object under it (any more): no run there
                continue
            for prefix in prefixes:
                name = prefix.rsplit("/", 1)[-1]
                if fnmatch.fnmatchcase(name, part) and not is_temp_name(name):
                    deeper.append(prefix)
        level = deeper
    return sorted(k[len(store.root) + 1 :] for k in level)


def list_watch(store: Store, runs: str | None, max_depth: int = MAX_DEPTH) -> list[RunListing]:
    """Every run of the watch with its objects, from one listing of the whole watch (paged by
    the store, a thousand objects a page): while the watch holds fewer objects than a thousand
    per run, this costs fewer requests than one listing per run. Runs as ``discover_runs``
    finds them (a run is a prefix the glob matches holding at least one object)."""
    root = store.root + "/"
    parts = PurePosixPath(runs).parts if runs else ()
    by_run: dict[str, list[ObjectInfo]] = {}
    for o in store.list_tree(root):
        if not o.key.startswith(root):
            continue
        rel = o.key[len(root) :].split("/")
        if len(rel) <= len(parts) or rel[-1] == "":
            continue  # an object beside the runs, not in one
        names = rel[: len(parts)]
        if not all(
            fnmatch.fnmatchcase(n, p) and not is_temp_name(n)
            for n, p in zip(names, parts, strict=True)
        ):
            continue
        if len(rel) - len(parts) - 1 <= max_depth:
            by_run.setdefault("/".join(names), []).append(o)
    return [
        RunListing(run_key(store, name), store.url_of(run_key(store, name)), tuple(objects))
        for name, objects in sorted(by_run.items())
    ]


def run_key(store: Store, name: str) -> str:
    return f"{store.root}/{name}" if name else store.root


def list_run(store: Store, name: str, max_depth: int = MAX_DEPTH) -> RunListing:
    """The objects of the run ``name`` down to ``max_depth`` directories below it."""
    key = run_key(store, name)
    below = key + "/"
    objects = tuple(
        o
        for o in store.list_tree(below)
        if o.key.startswith(below) and o.key.count("/") - key.count("/") - 1 <= max_depth
    )
    return RunListing(key, store.url_of(key), objects)
