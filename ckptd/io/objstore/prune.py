"""Deleting recorded checkpoints from an object store, and rewriting the run's state file.

Only objects ckptd recorded are deleted, and the checkpoint's main object (the ``.index``, or a
Keras checkpoint's one file) only in the version ckptd recorded: one rewritten since (another
ETag or generation) belongs to a new checkpoint and is left, with an error naming it. Without its
main object a checkpoint's other objects are left too: TensorFlow uploads the data shards first,
so they may be a new upload of that name. Nothing ckptd did not record is ever deleted (an
unfinished upload, another tool's files).

A run's deletions take one LIST, then one bulk DELETE of the data objects and one of the main
objects, in that order: a prune stopped between them leaves the main object, whose version still
matches, so the next prune finishes the checkpoint. There is no conditional delete on every store,
so an object rewritten between the LIST and the DELETE is not protected; the window is one
request long.

The ``checkpoint`` state file is read with one GET and, when it changes, rewritten with one PUT
(an object is replaced whole: readers see the old or the new one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from ckptd.core.retention import NO_STATE, TrainerState
from ckptd.io import statefile
from ckptd.io.fsops import Removal
from ckptd.io.objstore.failures import FAILED, NOT_FOUND, StoreError
from ckptd.io.objstore.observe import identity
from ckptd.io.objstore.store import ObjectInfo, Store
from ckptd.io.statefile import STATE_FILE, CheckpointState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    """One recorded checkpoint of a run: its files (relative to the run) and what identified
    its version when it was recorded: the size of its main object and the identity of its
    objects (:func:`observe.identity` of the index and data shards, or of a Keras file: both
    change whenever one of them is rewritten). A raw ETag/generation of the main object is
    taken too."""

    name: str  # the prefix's name in the run: model.ckpt-5
    files: tuple[str, ...]
    size: int | None = None  # of the main object
    ident: int | None = None
    version: str = ""  # the main object's ETag or generation

    @property
    def main(self) -> str:
        """The object whose version identifies the checkpoint: its index, or its one file."""
        index = self.name + ".index"
        return index if index in self.files or len(self.files) != 1 else self.files[0]

    @property
    def data(self) -> list[str]:
        """Its data shards in shard order (their names sort so), as the identity takes them."""
        return sorted(f for f in self.files if ".data-" in f and f.startswith(self.name + "."))

    def describe(self) -> str:
        return self.version or f"{self.size} bytes, identity {self.ident}"

    def matches(self, present: Mapping[str, ObjectInfo]) -> bool:
        """Whether the objects ``present`` (by name in the run) are the recorded version
        (never, with nothing to tell it by)."""
        main = present.get(self.main)
        if main is None or (not self.version and self.size is None and self.ident is None):
            return False
        if self.version and main.version != self.version:
            return False
        if self.size is not None and main.size != self.size:
            return False
        if self.ident is None:
            return True
        parts = [main]
        if self.main == self.name + ".index":
            shards = [present.get(f) for f in self.data]
            if any(o is None for o in shards):
                return False
            parts += [o for o in shards if o is not None]
        return identity(*parts) == self.ident


def _plain(name: str) -> bool:
    return bool(name) and all(part and part not in (".", "..") for part in name.split("/"))


def listing(store: Store, run_key: str) -> dict[str, ObjectInfo]:
    """The run's objects by name relative to the run (nested names for Keras sub-folders are
    listed one level at a time, only where a recorded name needs them)."""
    objects, _ = store.list_dir(run_key)
    return {o.name: o for o in objects}


def objects_of(store: Store, run_key: str, names: Collection[str]) -> dict[str, ObjectInfo]:
    """The run's objects by name relative to the run: one delimiter listing of the run, and
    one of each sub-folder ``names`` reach into (a Keras checkpoint's)."""
    present = listing(store, run_key)
    for sub in sorted({f.rsplit("/", 1)[0] for f in names if "/" in f and _plain(f)}):
        objects, _ = store.list_dir(f"{run_key}/{sub}")
        present.update({f"{sub}/{o.name}": o for o in objects})
    return present


def remove_groups(
    store: Store, run_key: str, groups: Sequence[Recorded]
) -> tuple[list[Removal], dict[str, ObjectInfo]]:
    """Delete the recorded checkpoints ``groups`` of the run at ``run_key``; one
    :class:`Removal` each, and the run's objects left afterwards (for the state file).

    A checkpoint whose main object was rewritten is left whole (an error says so); one whose
    main object is gone counts as removed, its remaining objects left (``missing`` names the
    main object)."""
    results = [Removal() for _ in groups]
    try:
        present = objects_of(store, run_key, [f for g in groups for f in g.files])
    except StoreError as exc:
        for r in results:
            r.errors.append(f"listing {run_key}: {exc}")
        return results, {}
    data: list[tuple[Removal, str]] = []
    mains: list[tuple[Removal, str]] = []
    for g, r in zip(groups, results, strict=True):
        bad = [f for f in g.files if not _plain(f)]
        if bad:
            r.errors.append(f"{bad[0]!r}: not a plain relative object name; refused")
            continue
        main = present.get(g.main)
        if main is None:
            # The recorded version is gone; what remains of the name may be a new upload.
            r.missing.append(g.main)
            continue
        if not g.matches(present):
            r.errors.append(
                f"{g.name}: rewritten since it was recorded (it was {g.describe()}; "
                f"{g.main} is now {main.version or main.size}); left with its objects"
            )
            continue
        for f in g.files:
            if f == g.main:
                continue
            if f in present:
                data.append((r, f))
            else:
                r.missing.append(f)
        mains.append((r, g.main))
    for batch in (data, mains):  # data first: an interrupted prune keeps the index to finish by
        batch = [(r, f) for r, f in batch if not r.errors]
        if not batch:
            continue
        failure = _delete(store, [f"{run_key}/{f}" for _, f in batch])
        if failure is not None:
            for r, _ in batch:
                r.errors.append(f"deleting from {run_key}: {failure}")
            continue
        for r, f in batch:
            if not r.errors:
                r.removed.append(f)
                r.bytes_freed += present[f].size
    gone = {f for r in results for f in r.removed}
    left = {n: o for n, o in present.items() if n not in gone}
    return results, left


def _delete(store: Store, keys: list[str]) -> str | None:
    """Why deleting ``keys`` failed, or None."""
    try:
        store.delete(keys)
    except StoreError as exc:
        if exc.kind != NOT_FOUND:  # (one deleted by someone else meanwhile is gone all the same)
            return str(exc)
    return None


def _name_in_run(entry: str, run_url: str) -> str:
    """A state file entry as a name in the run (TF2 writes names, TF1 the full URL)."""
    if entry.startswith(run_url + "/"):
        return entry[len(run_url) + 1 :]
    return entry


def read_state(store: Store, run_key: str) -> CheckpointState | None:
    """The run's state file (one GET); None when there is none. Raises :class:`StoreError` when
    it cannot be read (a request failed, or it is over STATE_FILE_MAX_BYTES)."""
    key = f"{run_key}/{STATE_FILE}"
    try:
        raw = store.read(key, 0, statefile.STATE_FILE_MAX_BYTES + 1)
    except StoreError as exc:
        if exc.kind == NOT_FOUND:
            return None
        raise
    if len(raw) > statefile.STATE_FILE_MAX_BYTES:
        raise StoreError(FAILED, f"{key}: over {statefile.STATE_FILE_MAX_BYTES} bytes")
    return statefile.parse(raw.decode("utf-8", errors="replace"))


def trainer_state(store: Store, run_key: str, run_url: str) -> TrainerState:
    """What retention needs of the run's state file (as :func:`statefile.trainer_state`): the
    checkpoint TensorFlow resumes from, spelt as ckptd records it (``run_url/name``). Raises
    :class:`StoreError` when the file cannot be read (the caller must not prune blind)."""
    state = read_state(store, run_key)
    if state is None:
        return NO_STATE
    current = state.model_checkpoint_path
    prefix = f"{run_url}/{_name_in_run(current, run_url)}" if current else None
    return TrainerState(prefix, statefile.utc(state.last_preserved_timestamp))


def drop_entries(
    store: Store,
    run_key: str,
    removed: Collection[str],
    present: Collection[str],
    newest: Callable[[], str | None],
) -> bool:
    """Rewrite the run's state file without the ``removed`` checkpoint names and without every
    entry whose checkpoint is not in ``present`` (object names of the run); one GET, and one
    PUT when it changed. When no entry is left it points at ``newest()`` (a name), or stays as
    it is when that is None. True when it was rewritten."""
    key = f"{run_key}/{STATE_FILE}"
    run_url = store.url_of(run_key.lstrip("/"))
    try:
        state = read_state(store, run_key)
    except StoreError as exc:
        log.warning("not rewritten: %s", exc)
        return False
    if state is None:
        return False
    drop = set(removed)

    def gone(entry: str) -> bool:
        name = _name_in_run(entry, run_url)
        return name in drop or (name + ".index" not in present and name not in present)

    paths: list[str] = []
    stamps: list[float] = []
    old = state.all_model_checkpoint_timestamps
    has_stamps = len(old) == len(state.all_model_checkpoint_paths)
    for i, entry in enumerate(state.all_model_checkpoint_paths):
        if not gone(entry):
            paths.append(entry)
            if has_stamps:
                stamps.append(old[i])
    current = state.model_checkpoint_path
    if current and gone(current):
        current = paths[-1] if paths else ""
    new = CheckpointState(current, paths, stamps, state.last_preserved_timestamp)
    if not paths:
        name = newest()
        if name is None:
            return False
        new = CheckpointState(name, [name], [], state.last_preserved_timestamp)
    if new == state:
        return False
    try:
        store.put(key, statefile.render(new).encode("utf-8"))
    except StoreError as exc:
        log.error("could not rewrite %s: %s", key, exc)
        return False
    return True
