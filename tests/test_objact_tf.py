"""Real TensorFlow checkpoints on a real S3 server (SeaweedFS on loopback), acted on end to end:
``ckptd run --once`` on an ``s3://`` watch records them, the real worker evaluates each from a
local copy, the best is exported to an ``s3://`` export_dir that TensorFlow loads after a
download, and retention deletes only the recorded objects of what it prunes."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ENV, PY, Corpus, ckptd, query
from tests.objfixtures import Bucket
from tests.objupload import upload_checkpoint, upload_run

pytestmark = [pytest.mark.tf, pytest.mark.parametrize("objstore_server", ["s3"], indirect=True)]

LOAD_EXPORT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    fn = model.signatures["serving_default"]
    (name,) = fn.structured_input_signature[1]
    spec = fn.structured_input_signature[1][name]
    x = np.zeros([1] + [d or 1 for d in spec.shape.as_list()[1:]], spec.dtype.as_numpy_dtype)
    out = fn(**{name: tf.constant(x)})
    print(json.dumps({k: list(v.shape) for k, v in out.items()}))
    """
)


def _config(tmp_path: Path, bucket: Bucket, corpus: Corpus) -> tuple[Path, Path]:
    db = tmp_path / "ckptd.db"
    config = tmp_path / "ckptd.toml"
    data = corpus.run_dir("tf1") / "heldout.npz"
    config.write_text(
        textwrap.dedent(
            f"""\
            [daemon]
            database = "sqlite:///{db}"

            [[watch]]
            path = "{bucket.url_of("runs")}"
            runs = "*"
            endpoint_url = "{bucket.server.endpoint}"
            poll_interval = "1s"

            [watch.best]
            metric = "eval/accuracy"
            mode = "max"

            [watch.evaluate]
            evaluator = "meta_graph"
            data = "{data}"
            feed = {{ "x:0" = "x", "y_:0" = "y" }}
            fetch = {{ "eval/accuracy" = "accuracy:0" }}

            [watch.freeze]
            format = ["saved_model"]
            export_dir = "{bucket.url_of("exports")}"
            inputs = {{ "x" = "x:0" }}
            outputs = {{ "y" = "y:0" }}

            [watch.retain]
            keep_last = 1
            keep_best = 1
            min_age = "0s"
            """
        )
    )
    return config, db


def _states(db: Path) -> dict[int, str]:
    return {step: state for step, state in query(db, "SELECT step, state FROM checkpoints")}


def test_run_once_records_evaluates_exports_and_prunes_on_s3(
    tmp_path: Path, corpus: Corpus, bucket: Bucket, objstore_env: dict[str, str]
) -> None:
    run = corpus.run_dir("tf1")
    key = bucket.key("runs/mnist")
    upload_run(bucket.fs, run, key, scheme=bucket.scheme)
    # Not ckptd's: another tool's object, and a save still uploading (data, no index).
    bucket.put("runs/mnist/notes.txt", b"someone else's")
    (tmp_path / "late").mkdir()
    for f in run.glob("model.ckpt-30.*"):
        (tmp_path / "late" / f.name.replace("ckpt-30", "ckpt-40")).write_bytes(f.read_bytes())
    upload_checkpoint(bucket.fs, tmp_path / "late", key, "model.ckpt-40", stop="data")
    config, db = _config(tmp_path, bucket, corpus)

    out = ckptd("run", "--once", config=config)
    assert out.returncode == 0, out.stderr[-3000:]

    # Recorded: the three whole saves, never the half-way one.
    steps = {s for s, _ in query(db, "SELECT step, state FROM checkpoints")}
    assert steps == {10, 20, 30}
    # Evaluated by the real worker from local copies, with TF's own numbers.
    evaluations = query(
        db,
        "SELECT c.step, e.status, e.error FROM evaluations e "
        "JOIN checkpoints c ON c.id = e.checkpoint_id",
    )
    assert {s: (st, err) for s, st, err in evaluations} == {s: ("done", None) for s in (10, 20, 30)}
    got = dict(
        query(
            db,
            "SELECT c.step, m.value FROM metrics m JOIN checkpoints c "
            "ON c.id = m.checkpoint_id WHERE m.source = 'evaluator'",
        )
    )
    expected = {s["step"]: s["metrics"]["eval/accuracy"] for s in corpus.saves["tf1"]}
    assert got == pytest.approx(expected, abs=1e-6)
    best = max(expected, key=lambda s: (expected[s], s))
    # Exported to the bucket, the SavedModel last: published and loadable by TensorFlow.
    ((path, status, step),) = query(db, "SELECT path, status, step FROM exports")
    assert (status, step) == ("published", best)
    assert path == bucket.url_of("exports/mnist/1")
    names = bucket.names("exports/mnist/1")
    assert (
        "exports/mnist/1/saved_model.pb" in names
        and "exports/mnist/1/assets.extra/ckptd.json" in names
    )
    manifest: dict[str, Any] = json.loads(bucket.get("exports/mnist/1/assets.extra/ckptd.json"))
    assert manifest["step"] == best and manifest["checkpoint"].startswith("s3://")
    local = tmp_path / "downloaded"
    bucket.fs.get(bucket.key("exports/mnist/1") + "/", str(local), recursive=True)
    loaded = subprocess.run(
        [PY, "-c", LOAD_EXPORT, str(local)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1])
    # Pruned: keep_last 1 and keep_best 1 keep the newest and the best; the rest's objects
    # (and only theirs) are gone, and the state file names only what is left.
    states = _states(db)
    kept = {30, best}
    assert {s for s, st in states.items() if st == "complete"} == kept
    assert {s for s, st in states.items() if st == "pruned"} == {10, 20} - kept
    left = bucket.names("runs/mnist")
    for step in (10, 20, 30):
        files = [n for n in left if n.startswith(f"runs/mnist/model.ckpt-{step}.")]
        assert bool(files) == (step in kept), (step, files)
    assert "runs/mnist/notes.txt" in left
    assert "runs/mnist/model.ckpt-40.data-00000-of-00001" in left  # still uploading: untouched
    state = bucket.get("runs/mnist/checkpoint").decode()
    for step in (10, 20, 30):
        assert (f'model.ckpt-{step}"' in state) == (step in kept)
    # Audited like a local prune.
    pruned = query(db, "SELECT detail FROM actions WHERE kind = 'pruned'")
    if {10, 20} - kept:
        listed = [c["step"] for (d,) in pruned for c in json.loads(d)["checkpoints"]]
        assert sorted(listed) == sorted({10, 20} - kept)


def test_the_read_commands_show_object_store_runs(
    tmp_path: Path, corpus: Corpus, bucket: Bucket, objstore_env: dict[str, str]
) -> None:
    """status, ls, best and show answer from the database for a run on a bucket, naming its
    checkpoints by URL (no local path is assumed)."""
    run = corpus.run_dir("tf1")
    upload_run(bucket.fs, run, bucket.key("runs/mnist"), scheme=bucket.scheme)
    config, _db = _config(tmp_path, bucket, corpus)
    assert ckptd("run", "--once", config=config).returncode == 0
    status = ckptd("status", "--json", config=config)
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)["runs"]
    assert row["run"] == "mnist" and row["path"] == bucket.url_of("runs/mnist"), row
    listed = ckptd("ls", "mnist", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    (newest,) = json.loads(listed.stdout)  # keep_last 1: the others are pruned
    assert newest["path"] == bucket.url_of("runs/mnist/model.ckpt-30"), newest
    best = ckptd("best", "mnist", "--json", config=config)
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["best"][0]["path"] == newest["path"]
    # show reads the .index object (one GET) and lists what TensorFlow saved in it.
    shown = ckptd("show", "mnist@30", "--json", config=config)
    assert shown.returncode == 0, shown.stderr
    variables = json.loads(shown.stdout)
    assert variables["checkpoint"] == newest["path"]
    saved = {v["name"]: v["shape"] for v in variables["variables"]}
    assert saved["hidden/weights"] == [64, 32] and saved["global_step"] == []
    # A pruned checkpoint's index object is gone: the same words as for a file on disk.
    gone = ckptd("show", "mnist@10", config=config)
    assert gone.returncode != 0
    assert f"{bucket.url_of('runs/mnist/model.ckpt-10')}.index does not exist" in gone.stderr
