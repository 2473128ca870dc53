"""Acting on object-store checkpoints at the io level: prune deletes only what was recorded, in
the recorded version; downloads for evaluation; exports uploaded with their marker last.

Against fsspec's in-process ``memory://`` store (with a generation per write, as GCS gives);
the same on the real servers, and through the daemon, in ``test_objact_servers.py``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from ckptd.io import statefile
from ckptd.io.objstore import Store, transfer
from ckptd.io.objstore import prune as objprune
from ckptd.io.objstore.observe import identity
from tests.conftest import Corpus

_generations = itertools.count(1)


class VersionedMemory(MemoryFileSystem):
    """fsspec's memory store with its own objects and a generation per write (like GCS), and a
    log of the write and delete calls made, in order."""

    protocol = "memory"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store: dict[str, Any] = {}
        self.pseudo_dirs = [""]
        self.generation: dict[str, int] = {}
        self.calls: list[tuple[str, Any]] = []

    def _key(self, path: str) -> str:
        return str(self._strip_protocol(path)).lstrip("/")  # as the Store spells keys

    def _bump(self, path: str) -> None:
        self.generation[self._strip_protocol(path)] = next(_generations)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("put", self._key(path)))
        super().pipe_file(path, value, *args, **kwargs)
        self._bump(path)

    def put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("put", self._key(rpath)))
        super().put_file(lpath, rpath, *args, **kwargs)
        self._bump(rpath)

    def rm(self, path: Any, *args: Any, **kwargs: Any) -> None:
        paths = [path] if isinstance(path, str) else list(path)
        self.calls.append(("delete", sorted(self._key(p) for p in paths)))
        super().rm(paths, *args, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        out = super().ls(path, detail=detail, **kwargs)
        if detail:
            for e in out:
                if e["type"] == "file":
                    e["generation"] = str(self.generation.get(e["name"], 0))
            # An object store has no directories: a prefix exists while an object is under it.
            out = [
                e
                for e in out
                if e["type"] == "file" or any(k.startswith(e["name"] + "/") for k in self.store)
            ]
        return out

    def puts(self) -> list[str]:
        return [p for kind, p in self.calls if kind == "put"]


@pytest.fixture
def mem() -> Iterator[tuple[Store, VersionedMemory]]:
    fs = VersionedMemory(skip_instance_cache=True)
    yield Store("memory://bucket", fs), fs


def upload_mem(store: Store, fs: VersionedMemory, run_dir: Path, key: str) -> None:
    """A run's files uploaded in TensorFlow's order: data shards, then each index, then the
    state file (and anything else)."""
    names = sorted(p.name for p in run_dir.iterdir() if p.is_file())
    order = sorted(names, key=lambda n: 0 if ".data-" in n else 1 if n.endswith(".index") else 2)
    for name in order:
        fs.put_file(str(run_dir / name), f"{key}/{name}")


def versions_of(store: Store, key: str) -> dict[str, str]:
    objects, _ = store.list_dir(key)
    return {o.name: o.version for o in objects}


def recorded(store: Store, key: str, name: str) -> objprune.Recorded:
    """The checkpoint ``name`` as the observer records it: size of its index, identity of its
    index and data objects (io/objstore/observe.py)."""
    present = objprune.listing(store, key)
    files = tuple(sorted(n for n in present if n.startswith(name + ".")))
    index = present[name + ".index"]
    data = [present[f] for f in files if ".data-" in f]
    return objprune.Recorded(name, files, size=index.size, ident=identity(index, *data))


def test_prune_deletes_only_recorded_objects_data_first(
    mem: tuple[Store, VersionedMemory], golden: Corpus
) -> None:
    store, fs = mem
    upload_mem(store, fs, golden.run_dir("sharded"), "bucket/runs/r1")
    # Not recorded: an unfinished upload (shards without index), another tool's file.
    fs.pipe_file("bucket/runs/r1/ckpt-30.data-00000-of-00004", b"half")
    fs.pipe_file("bucket/runs/r1/notes.txt", b"mine")
    before = versions_of(store, "bucket/runs/r1")
    group = recorded(store, "bucket/runs/r1", "ckpt-10")
    assert len(group.files) == 5
    fs.calls.clear()
    [removal], left = objprune.remove_groups(store, "bucket/runs/r1", [group])
    assert removal.ok and sorted(removal.removed) == sorted(group.files)
    assert removal.bytes_freed > 0
    after = versions_of(store, "bucket/runs/r1")
    assert set(after) == set(before) - set(group.files)
    assert after == {n: v for n, v in before.items() if n in after}  # nothing else rewritten
    assert "ckpt-30.data-00000-of-00004" in after and "notes.txt" in after
    assert set(left) == set(after)
    # Data objects in one request, then the index in another.
    deletes = [p for kind, p in fs.calls if kind == "delete"]
    assert [len(d) for d in deletes] == [4, 1]
    assert deletes[1] == ["bucket/runs/r1/ckpt-10.index"]


def test_rewritten_main_object_is_left_and_reported(
    mem: tuple[Store, VersionedMemory], golden: Corpus
) -> None:
    store, fs = mem
    run = golden.run_dir("sharded")
    upload_mem(store, fs, run, "bucket/r")
    old = recorded(store, "bucket/r", "ckpt-10")
    # The trainer saved ckpt-10 again (a restart): the same names, a new version.
    upload_mem(store, fs, run, "bucket/r")
    before = versions_of(store, "bucket/r")
    [removal], _ = objprune.remove_groups(store, "bucket/r", [old])
    assert not removal.ok and "rewritten since it was recorded" in removal.errors[0]
    assert removal.removed == []
    assert versions_of(store, "bucket/r") == before


def test_rewritten_data_shard_leaves_the_checkpoint(
    mem: tuple[Store, VersionedMemory], golden: Corpus
) -> None:
    """The identity covers the data objects too: a shard uploaded again is another save."""
    store, fs = mem
    run = golden.run_dir("sharded")
    upload_mem(store, fs, run, "bucket/r")
    old = recorded(store, "bucket/r", "ckpt-10")
    shard = "ckpt-10.data-00001-of-00004"
    fs.put_file(str(run / shard), f"bucket/r/{shard}")
    before = versions_of(store, "bucket/r")
    [removal], _ = objprune.remove_groups(store, "bucket/r", [old])
    assert not removal.ok and "rewritten" in removal.errors[0]
    assert versions_of(store, "bucket/r") == before
    # The version field alone (an ETag kept by a caller) is also honoured.
    index = objprune.listing(store, "bucket/r")["ckpt-10.index"]
    by_etag = objprune.Recorded("ckpt-10", old.files, version=index.version)
    [removal], _ = objprune.remove_groups(store, "bucket/r", [by_etag])
    assert removal.ok and len(removal.removed) == 5


def test_main_object_gone_leaves_the_rest(
    mem: tuple[Store, VersionedMemory], golden: Corpus
) -> None:
    """Without its index the recorded version is gone; shards of that name may be a new upload."""
    store, fs = mem
    upload_mem(store, fs, golden.run_dir("sharded"), "bucket/r")
    group = recorded(store, "bucket/r", "ckpt-10")
    fs.rm("bucket/r/ckpt-10.index")
    before = versions_of(store, "bucket/r")
    [removal], _ = objprune.remove_groups(store, "bucket/r", [group])
    assert removal.ok and removal.removed == [] and removal.missing == ["ckpt-10.index"]
    assert versions_of(store, "bucket/r") == before


def test_unrecorded_version_and_bad_names_are_refused(mem: tuple[Store, VersionedMemory]) -> None:
    store, fs = mem
    fs.pipe_file("bucket/r/model.keras", b"x")
    fs.pipe_file("bucket/other.keras", b"y")
    no_version = objprune.Recorded("model.keras", ("model.keras",))
    escaping = objprune.Recorded("m", ("../other.keras",), version="1")
    results, _ = objprune.remove_groups(store, "bucket/r", [no_version, escaping])
    assert all(not r.ok for r in results)
    assert "refused" in results[1].errors[0]
    assert versions_of(store, "bucket/r") and versions_of(store, "bucket")["other.keras"]


def test_state_file_rewritten_by_one_put(
    mem: tuple[Store, VersionedMemory], golden: Corpus
) -> None:
    store, fs = mem
    upload_mem(store, fs, golden.run_dir("sharded"), "bucket/r")
    before = statefile.parse(fs.cat_file("bucket/r/checkpoint").decode())
    assert [Path(p).name for p in before.all_model_checkpoint_paths] == ["ckpt-10", "ckpt-20"]
    group = recorded(store, "bucket/r", "ckpt-10")
    [_removal], left = objprune.remove_groups(store, "bucket/r", [group])
    fs.calls.clear()
    changed = objprune.drop_entries(store, "bucket/r", ["ckpt-10"], set(left), lambda: None)
    assert changed
    assert fs.puts() == ["bucket/r/checkpoint"]  # one PUT, the whole file
    after = statefile.parse(fs.cat_file("bucket/r/checkpoint").decode())
    assert [Path(p).name for p in after.all_model_checkpoint_paths] == ["ckpt-20"]
    assert Path(after.model_checkpoint_path).name == "ckpt-20"
    assert len(after.all_model_checkpoint_timestamps) == len(after.all_model_checkpoint_paths)
    # Nothing to change: no PUT.
    fs.calls.clear()
    assert not objprune.drop_entries(store, "bucket/r", [], set(left), lambda: None)
    assert fs.puts() == []


def test_state_file_with_full_urls_and_no_entry_left(mem: tuple[Store, VersionedMemory]) -> None:
    """TF1 writes full paths; with every entry gone the file points at the newest left."""
    store, fs = mem
    text = 'model_checkpoint_path: "memory://bucket/r/m-2"\nall_model_checkpoint_paths: '
    text += '"memory://bucket/r/m-1"\nall_model_checkpoint_paths: "memory://bucket/r/m-2"\n'
    fs.pipe_file("bucket/r/checkpoint", text.encode())
    assert objprune.drop_entries(store, "bucket/r", ["m-1", "m-2"], set(), lambda: "m-0")
    after = statefile.parse(fs.cat_file("bucket/r/checkpoint").decode())
    assert after.model_checkpoint_path == "m-0" and after.all_model_checkpoint_paths == ["m-0"]


def test_download_checks_the_recorded_version(
    mem: tuple[Store, VersionedMemory], golden: Corpus, tmp_path: Path
) -> None:
    store, fs = mem
    run = golden.run_dir("sharded")
    upload_mem(store, fs, run, "bucket/r")
    group = recorded(store, "bucket/r", "ckpt-20")
    size = transfer.download(store, "bucket/r", group.files, tmp_path / "a", expect=group)
    for name in group.files:
        assert (tmp_path / "a" / name).read_bytes() == (run / name).read_bytes()
    assert size == sum((run / n).stat().st_size for n in group.files)
    fs.put_file(str(run / "ckpt-20.index"), "bucket/r/ckpt-20.index")  # rewritten
    with pytest.raises(transfer.Rewritten):
        transfer.download(store, "bucket/r", group.files, tmp_path / "b", expect=group)
    with pytest.raises(transfer.StoreError, match="refused"):
        transfer.download(store, "bucket/r", ["../x"], tmp_path / "c")


def export_dir(tmp_path: Path) -> Path:
    """A SavedModel's layout (contents do not matter here)."""
    d = tmp_path / "export"
    (d / "variables").mkdir(parents=True)
    (d / "assets.extra").mkdir()
    (d / "saved_model.pb").write_bytes(b"graph")
    (d / "variables" / "variables.index").write_bytes(b"index")
    (d / "variables" / "variables.data-00000-of-00001").write_bytes(b"data")
    (d / "assets.extra" / "ckptd.json").write_text(json.dumps({"version": 1}))
    return d


def test_export_upload_puts_saved_model_last(
    mem: tuple[Store, VersionedMemory], tmp_path: Path
) -> None:
    store, fs = mem
    local = export_dir(tmp_path)
    plan = transfer.upload_export(store, local, "bucket/exports/3")
    assert plan.marker == "saved_model.pb"
    puts = fs.puts()
    assert len(puts) == 4 and puts[-1] == "bucket/exports/3/saved_model.pb"
    assert transfer.is_published(store, "bucket/exports/3")
    assert transfer.highest_version(store, "bucket/exports") == 3


def test_half_upload_is_never_published_and_is_removed(
    mem: tuple[Store, VersionedMemory], tmp_path: Path
) -> None:
    store, _fs = mem
    local = export_dir(tmp_path)
    transfer.upload_export(store, local, "bucket/exports/1")
    plan = transfer.plan_upload(local)
    transfer.upload_body(store, local, "bucket/exports/2", plan)  # stopped before the marker
    assert not transfer.is_published(store, "bucket/exports/2")
    assert transfer.highest_version(store, "bucket/exports") == 2  # a new one goes above it
    assert transfer.remove_tree(store, "bucket/exports/2") == 3
    assert transfer.highest_version(store, "bucket/exports") == 1
    assert transfer.is_published(store, "bucket/exports/1")


def test_frozen_only_export_is_published_by_its_manifest(
    mem: tuple[Store, VersionedMemory], tmp_path: Path
) -> None:
    store, fs = mem
    d = tmp_path / "frozen"
    (d / "assets.extra").mkdir(parents=True)
    (d / "frozen.pb").write_bytes(b"g")
    (d / "assets.extra" / "ckptd.json").write_text("{}")
    plan = transfer.upload_export(store, d, "bucket/x/1")
    assert plan.marker == transfer.MANIFEST
    assert fs.puts()[-1] == "bucket/x/1/assets.extra/ckptd.json"
    marker = transfer.marker_of(["frozen"])
    assert transfer.is_published(store, "bucket/x/1", marker)
    assert not transfer.is_published(store, "bucket/x/1")  # no SavedModel there


def test_object_destination_publishes_with_the_marker_last(
    mem: tuple[Store, VersionedMemory], tmp_path: Path
) -> None:
    """api/exportdest: the body is uploaded before the commit, the marker in it (one PUT)."""
    from ckptd.api.exportdest import ObjectDest

    store, fs = mem
    dest = ObjectDest("memory://bucket/exports/run", store)
    assert dest.highest_version() == 0
    tmp = dest.staging(1)
    for name in ("saved_model.pb", "variables/variables.index", "assets.extra/ckptd.json"):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(b"x")
    dest.upload(tmp, 1)
    assert not dest.exists(dest.final(1), "saved_model")  # uploaded, not published
    fs.calls.clear()
    dest.publish(tmp, 1)
    assert fs.puts() == ["bucket/exports/run/1/saved_model.pb"] or fs.puts() == [
        "bucket/exports/run/1/saved_model.pb"
    ]
    assert dest.exists(dest.final(1), "saved_model") and not tmp.exists()
    # A failed export after its body went up: discarded, never published.
    tmp2 = dest.staging(2)
    (tmp2 / "saved_model.pb").write_bytes(b"y")
    (tmp2 / "variables").mkdir()
    (tmp2 / "variables" / "variables.index").write_bytes(b"y")
    dest.upload(tmp2, 2)
    assert dest.highest_version() == 2
    dest.discard(tmp2, 2)
    assert dest.highest_version() == 1 and not tmp2.exists()
    dest.remove(dest.final(1))
    assert dest.highest_version() == 0


def test_local_copy_is_shared_then_removed_and_refused_when_rewritten(
    mem: tuple[Store, VersionedMemory],
    golden: Corpus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """api/localcopy: what the worker reads of an object store checkpoint."""
    from ckptd.api import localcopy
    from ckptd.core.model import Checkpoint
    from ckptd.store import signatures

    store, fs = mem
    run = golden.run_dir("sharded")
    upload_mem(store, fs, run, "bucket/runs/r")
    rec = recorded(store, "bucket/runs/r", "ckpt-10")
    monkeypatch.setattr(localcopy, "store_for", lambda url: store)
    monkeypatch.setattr(signatures, "signatures", lambda db, ids: {1: (rec.size, rec.ident)})
    url = "memory://bucket/runs/r"
    c = Checkpoint(
        1, "r", 1, f"{url}/ckpt-10", 10, "tf2", "complete", None, 0, rec.files, False, None, None
    )
    with localcopy.local_checkpoint(None, c, url) as a:  # type: ignore[arg-type]
        index = Path(a.prefix + ".index")
        assert index.read_bytes() == (run / "ckpt-10.index").read_bytes()
        with localcopy.local_checkpoint(None, c, url) as b:  # type: ignore[arg-type]
            assert b == a  # an export reading what an evaluation reads: one copy
        assert index.exists()  # still in use by the first
    assert not index.exists() and not list(Path(a.run_dir).iterdir())
    fs.put_file(str(run / "ckpt-10.index"), "bucket/runs/r/ckpt-10.index")  # saved again
    copy = localcopy.local_checkpoint(None, c, url)  # type: ignore[arg-type]
    with pytest.raises(localcopy.CopyFailed) as failed, copy:
        pass
    assert failed.value.gone and "rewritten" in str(failed.value)
    assert not list(Path(a.run_dir).iterdir())
