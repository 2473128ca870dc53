"""Acting on object-store checkpoints against the real servers (SeaweedFS for S3,
fake-gcs-server for GCS): the io-level tests of ``test_objact.py`` once more, then through the
daemon (``ckptd run --once``) and the api (export recovery)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ckptd.io import statefile
from ckptd.io.objstore import Store, open_store, transfer
from ckptd.io.objstore import prune as objprune
from tests.conftest import Corpus, ckptd, query
from tests.objfixtures import Bucket
from tests.objupload import upload_checkpoint, upload_run
from tests.test_objact import export_dir, recorded

# ------------------------------------------------------------------ the same on real servers


def server_store(bucket: Bucket) -> Store:
    return open_store(bucket.url, endpoint_url=bucket.server.endpoint)


class PutLog:
    """Records the keys the store's filesystem uploads files to, in the order of the requests
    (uploads are made one after the other)."""

    def __init__(self, fs: Any) -> None:
        self.keys: list[str] = []
        original = fs.put_file

        def spy(lpath: str, rpath: str, *args: Any, **kw: Any) -> Any:
            self.keys.append(str(rpath))
            return original(lpath, rpath, *args, **kw)

        fs.put_file = spy


def test_server_prune_deletes_only_recorded_objects(
    bucket: Bucket, golden: Corpus, objstore_env: dict[str, str]
) -> None:
    run = golden.run_dir("sharded")
    key = bucket.key("runs/r")
    upload_run(bucket.fs, run, key, scheme=bucket.scheme, prefixes=["ckpt-10"])
    # Not recorded: an upload stopped after its data, and another tool's file.
    upload_checkpoint(bucket.fs, run, key, "ckpt-20", stop="data")
    bucket.put("runs/r/notes.txt", b"not ckptd's")
    store = server_store(bucket)
    group = recorded(store, key, "ckpt-10")
    before = bucket.names("runs/r")
    [removal], left = objprune.remove_groups(store, key, [group])
    assert removal.ok and sorted(removal.removed) == sorted(group.files)
    after = bucket.names("runs/r")
    assert after == sorted(set(before) - {f"runs/r/{f}" for f in group.files})
    assert "runs/r/notes.txt" in after
    assert [n for n in after if "ckpt-20.data" in n] == [n for n in before if "ckpt-20.data" in n]
    assert store.counts()["DELETE"] in (2, 5)  # S3: data then index; GCS: one per object
    # The state file: one GET, one PUT, naming what is left (nothing: the newest recorded).
    puts = store.counts()["PUT"]
    assert objprune.drop_entries(store, key, ["ckpt-10"], set(left), lambda: "ckpt-20")
    assert store.counts()["PUT"] == puts + 1
    state = statefile.parse(bucket.get("runs/r/checkpoint").decode())
    assert state.model_checkpoint_path == "ckpt-20"


def test_server_rewritten_checkpoint_is_left(
    bucket: Bucket, golden: Corpus, objstore_env: dict[str, str]
) -> None:
    run = golden.run_dir("tf2")
    key = bucket.key("runs/r")
    upload_run(bucket.fs, run, key, scheme=bucket.scheme, prefixes=["ckpt-10"])
    store = server_store(bucket)
    group = recorded(store, key, "ckpt-10")
    # Saved again under the same name (another trainer start): other bytes, a new version.
    data = next(p for p in run.iterdir() if p.name.startswith("ckpt-10.data-"))
    bucket.fs.pipe_file(f"{key}/{data.name}", data.read_bytes() + b"\0")
    before = bucket.names("runs/r")
    [removal], _ = objprune.remove_groups(store, key, [group])
    assert not removal.ok and "rewritten" in removal.errors[0]
    assert bucket.names("runs/r") == before
    assert store.counts()["DELETE"] == 0


def test_server_download_and_export_upload_order(
    bucket: Bucket, golden: Corpus, objstore_env: dict[str, str], tmp_path: Path
) -> None:
    run = golden.run_dir("sharded")
    key = bucket.key("runs/r")
    upload_run(bucket.fs, run, key, scheme=bucket.scheme)
    store = server_store(bucket)
    group = recorded(store, key, "ckpt-20")
    transfer.download(store, key, group.files, tmp_path / "copy", expect=group)
    for name in group.files:
        assert (tmp_path / "copy" / name).read_bytes() == (run / name).read_bytes()

    from ckptd.api.exportdest import ObjectDest

    log = PutLog(store.fs)
    dest = ObjectDest(bucket.url_of("exports"), store)
    local = export_dir(tmp_path)
    tmp = dest.staging(1)
    shutil.copytree(local, tmp, dirs_exist_ok=True)
    dest.upload(tmp, 1)
    assert not dest.exists(dest.final(1), "saved_model")  # everything but the marker: hidden
    dest.publish(tmp, 1)
    assert dest.exists(dest.final(1), "saved_model")
    assert len(log.keys) == 4 and log.keys[-1].endswith("/1/saved_model.pb")
    # The server's own clock agrees: no object of the version is newer than the marker.
    objects = store.list_tree(bucket.key("exports/1"))
    marker = next(o for o in objects if o.name == "saved_model.pb")
    assert all(o.mtime_ns <= marker.mtime_ns for o in objects)
    # Stopped before its marker: never published, removed by recovery's remove_tree.
    tmp2 = dest.staging(2)
    shutil.copytree(local, tmp2, dirs_exist_ok=True)
    dest.upload(tmp2, 2)
    assert dest.highest_version() == 2 and not dest.exists(dest.final(2), "saved_model")
    assert transfer.remove_tree(store, bucket.key("exports/2")) == 3
    assert store.list_tree(bucket.key("exports/2")) == []  # (SeaweedFS keeps the folder)
    assert dest.exists(dest.final(1), "saved_model")


# ------------------------------------------------------------------ through the daemon and api


def _watch_config(tmp_path: Path, bucket: Bucket, retain: str = "") -> tuple[Path, Path]:
    db = tmp_path / "ckptd.db"
    config = tmp_path / "ckptd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "sqlite:///{db}"\n\n[[watch]]\npath = "{bucket.url_of("runs")}"\n'
        f'runs = "*"\nendpoint_url = "{bucket.server.endpoint}"\n\n{retain}'
    )
    return config, db


def test_run_once_prunes_only_recorded_objects(
    tmp_path: Path, golden: Corpus, bucket: Bucket, objstore_env: dict[str, str]
) -> None:
    """``ckptd run --once`` on an object store watch records, then retention deletes the
    recorded objects of what it prunes, rewrites the state file, and touches nothing else."""
    run = golden.run_dir("tf2")
    key = bucket.key("runs/r")
    upload_run(bucket.fs, run, key, scheme=bucket.scheme)
    bucket.put("runs/r/notes.txt", b"another tool's")
    late = tmp_path / "late"
    late.mkdir()
    for f in run.glob("ckpt-30.*"):
        (late / f.name.replace("ckpt-30", "ckpt-40")).write_bytes(f.read_bytes())
    upload_checkpoint(bucket.fs, late, key, "ckpt-40", stop="data")  # still uploading
    config, db = _watch_config(tmp_path, bucket, '[watch.retain]\nkeep_last = 1\nmin_age = "0s"\n')
    out = ckptd("run", "--once", config=config)
    assert out.returncode == 0, out.stderr[-3000:]
    states = dict(query(db, "SELECT step, state FROM checkpoints"))
    assert states == {10: "pruned", 20: "pruned", 30: "complete"}
    left = bucket.names("runs/r")
    assert not [n for n in left if n.startswith(("runs/r/ckpt-10.", "runs/r/ckpt-20."))]
    assert {f"runs/r/ckpt-30.{x}" for x in ("index", "data-00000-of-00001")} <= set(left)
    assert "runs/r/notes.txt" in left and "runs/r/ckpt-40.data-00000-of-00001" in left
    state = statefile.parse(bucket.get("runs/r/checkpoint").decode())
    assert state.all_model_checkpoint_paths == ["ckpt-30"]
    assert state.model_checkpoint_path == "ckpt-30"
    (detail,) = [
        json.loads(d) for (d,) in query(db, "SELECT detail FROM actions WHERE kind = 'pruned'")
    ]
    assert sorted(c["step"] for c in detail["checkpoints"]) == [10, 20]


def test_recovery_removes_a_half_uploaded_export(
    tmp_path: Path, golden: Corpus, bucket: Bucket, objstore_env: dict[str, str]
) -> None:
    """An export stopped before its marker was never published: recovery removes its objects
    and marks it failed (redone later); one whose marker is there was published."""
    from ckptd.api import export_recovery
    from ckptd.api.exportdest import ObjectDest
    from ckptd.config import load_config
    from ckptd.store import exports, reads
    from ckptd.store.handle import Store as Database

    upload_run(bucket.fs, golden.run_dir("tf2"), bucket.key("runs/r"), scheme=bucket.scheme)
    # (A metric no checkpoint has: the daemon exports nothing by itself here.)
    freeze = '[watch.best]\nmetric = "none/yet"\n\n'
    freeze += f'[watch.freeze]\nexport_dir = "{bucket.url_of("exports")}"\n'
    config, db = _watch_config(tmp_path, bucket, freeze)
    out = ckptd("run", "--once", config=config)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = load_config(str(config))
    database = Database.open(cfg.daemon.database)
    with database.session() as s:
        c10, c20 = [c for c in reads.checkpoints(s) if c.step in (10, 20)]
    root = bucket.url_of("exports/r")
    dest = ObjectDest(root)
    ids = []
    for c, publish in ((c10, True), (c20, False)):
        export_id, version, _ = exports.begin(
            database,
            c,
            root=root,
            on_disk=0,
            formats="saved_model",
            metric=None,
            metric_value=None,
        )
        ids.append(export_id)
        tmp = dest.staging(version)
        shutil.copytree(export_dir(tmp_path / f"e{version}"), tmp, dirs_exist_ok=True)
        dest.upload(tmp, version)
        if publish:
            dest.publish(tmp, version)  # its commit was lost: published all the same
    assert bucket.names("exports/r/2")  # the half upload is there ...
    assert export_recovery.recover(database, cfg.watches) == 1
    assert server_store(bucket).list_tree(bucket.key("exports/r/2")) == []  # ... and gone
    assert "exports/r/1/saved_model.pb" in bucket.names("exports/r/1")
    status = dict(query(db, "SELECT id, status FROM exports"))
    assert status == {ids[0]: "published", ids[1]: "failed"}
    database.close()
