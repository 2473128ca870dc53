"""Keras as people use it (issue 12, item 4): ``ModelCheckpoint("ckpt/…")`` beside
``TensorBoard("logs")``, weights-only checkpoints with ``keras_model``, the keras evaluator's
``feed``, and the README's Keras tour run as written.

The Keras jobs run once per session in a subprocess (real Keras 3 output); the README's code and
config are taken from README.md itself, with ``/data`` moved to a temporary directory.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from ckptd.config import ConfigError, parse_config
from ckptd.daemon.runs import discover
from ckptd.io.formats import list_run
from ckptd.io.fsops import remove_groups
from ckptd.store import audit_reads
from ckptd.store.db import session_scope
from tests.conftest import ENV, GOLDEN, PY, REPO, ckptd, query
from tests.test_reconcile import _age_dirs, _setup

README = REPO / "README.md"
TOUR_HEADING = "### Keras: `ModelCheckpoint` + `TensorBoard`"

# A weights-only job: the architecture saved once, then ModelCheckpoint(save_weights_only=True),
# and a Keras 2 style HDF5 model that ckptd does not read.
WEIGHTS_JOB = """
import keras
import numpy as np

run = ROOT + "/wruns/weights-demo"
rng = np.random.default_rng(1)
x = rng.normal(size=(256, 20)).astype("float32")
y = (x[:, 0] > 0).astype("int64")
model = keras.Sequential(
    [keras.Input((20,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
)
model.compile(
    "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
)
model.save(ROOT + "/arch.keras")
model.fit(x, y, epochs=2, validation_split=0.25, verbose=0, callbacks=[
    keras.callbacks.ModelCheckpoint(run + "/ckpt/weights.{epoch:02d}.weights.h5",
                                    save_weights_only=True),
    keras.callbacks.TensorBoard(run + "/logs"),
])
model.save(run + "/ckpt/legacy.h5")
"""


def readme_blocks() -> tuple[str, str]:
    """The python and toml blocks of the README's Keras tour."""
    section = README.read_text().split(TOUR_HEADING, 1)[1]
    python = re.search(r"```python\n(.*?)```", section, re.S)
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    assert python and toml, "the README's Keras tour lost its code blocks"
    return python.group(1), toml.group(1)


@pytest.fixture(scope="session")
def keras_jobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's Keras job and the weights-only job, trained for real under one root."""
    root = tmp_path_factory.mktemp("keras-tour")
    python, _ = readme_blocks()
    (root / "train.py").write_text(python.replace('"/data', f'"{root}'))
    (root / "weights.py").write_text(f"ROOT = {str(root)!r}\n" + WEIGHTS_JOB)
    both = "for f in ('train.py', 'weights.py'): exec(open(f).read(), {'__name__': '__main__'})"
    proc = subprocess.run(
        [PY, "-c", both], cwd=root, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


# ------------------------------------------------------------------ the README, as written


@pytest.mark.tf
@pytest.mark.slow
def test_readme_keras_tour_records_evaluates_and_exports(keras_jobs: Path) -> None:
    """The README's Keras job and config: checkpoints in ckpt/ recorded (they were ignored),
    TensorBoard metrics under logs/, evaluated by the keras evaluator with a custom feed, and
    the best exported as a verified SavedModel."""
    _, toml = readme_blocks()
    root = keras_jobs
    config = root / "ckptd.toml"
    config.write_text(toml.replace("/data", str(root)))
    db = root / "ckptd.db"
    assert ckptd("config", "check", config=config).returncode == 0
    proc = ckptd("run", "--once", config=config, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = query(db, "SELECT step, format, state, prefix FROM checkpoints ORDER BY step")
    ckpt = root / "runs" / "keras-demo" / "ckpt"
    assert [(s, f, st) for s, f, st, _ in rows] == [(e, "keras", "complete") for e in (1, 2, 3)]
    assert all(Path(p).parent == ckpt for *_, p in rows)
    names = {
        (n, src)
        for n, src in query(db, "SELECT DISTINCT name, source FROM metrics WHERE value IS NOT NULL")
    }
    assert ("val_loss", "filename") in names
    assert ("accuracy", "evaluator") in names and ("loss", "evaluator") in names
    assert ("logs/validation/epoch_loss", "tfevents") in names
    assert query(db, "SELECT status, COUNT(*) FROM evaluations GROUP BY status") == [("done", 3)]
    ((path, status),) = query(db, "SELECT path, status FROM exports")
    assert status == "published"
    assert Path(path).is_relative_to(root / "exports" / "keras-demo")
    assert (Path(path) / "saved_model.pb").is_file()

    ls = ckptd("ls", "keras-demo", "--json", config=config)
    assert ls.returncode == 0, ls.stderr
    listed = json.loads(ls.stdout)
    assert sorted(c["step"] for c in listed) == [1, 2, 3]


# ------------------------------------------------------------------ weights-only checkpoints


@pytest.mark.tf
@pytest.mark.slow
def test_weights_only_checkpoints_evaluate_and_export_with_keras_model(
    keras_jobs: Path, tmp_path: Path
) -> None:
    """`.weights.h5` with keras_model: a .keras architecture file (one watch) or a builder
    function (another); both evaluated and exported. Without keras_model (a third watch) the
    evaluation error names the key to set. The Keras 2 style `.h5` beside them is reported by
    `status`, not silently ignored."""
    src = keras_jobs / "wruns" / "weights-demo"
    by_file = _copy(src, tmp_path / "by-file" / "weights-demo")
    by_fn = _copy(src, tmp_path / "by-function" / "weights-demo")
    bare = _copy(src, tmp_path / "bare" / "weights-demo")
    (keras_jobs / "heldout.npz").exists() or pytest.fail("the README job writes heldout.npz")
    watch = """
        [[watch]]
        path = "{path}"
        keras_model = "{model}"

        [watch.best]
        metric = "accuracy"

        [watch.evaluate]
        evaluator = "keras"
        data = "{data}"
        feed = {{ x = "images", y = "labels" }}

        [watch.freeze]
        export_dir = "{exports}"
        """
    config = tmp_path / "ckptd.toml"
    db = tmp_path / "ckptd.db"
    no_model = (
        f'[[watch]]\npath = "{bare}"\n[watch.evaluate]\nevaluator = "keras"\n'
        f'data = "{keras_jobs / "heldout.npz"}"\nfeed = {{ x = "images", y = "labels" }}\n'
        "max_attempts = 1\n"
    )
    config.write_text(
        f'[daemon]\ndatabase = "sqlite:///{db}"\n'
        + no_model
        + "".join(
            textwrap.dedent(watch).format(
                path=run, model=model, data=keras_jobs / "heldout.npz", exports=tmp_path / name
            )
            for run, model, name in (
                (by_file, keras_jobs / "arch.keras", "exports-file"),
                (by_fn, "tests.keras_fns:tour_model", "exports-fn"),
            )
        )
    )
    proc = ckptd("run", "--once", config=config, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = query(db, "SELECT format, state, prefix FROM checkpoints ORDER BY prefix")
    assert [(f, s) for f, s, _ in rows] == [("keras_weights", "complete")] * 6
    assert all("/ckpt/weights.0" in p for *_, p in rows)
    evaluations = query(
        db,
        "SELECT c.prefix, e.status, e.error FROM evaluations e "
        "JOIN checkpoints c ON c.id = e.checkpoint_id",
    )
    assert sorted(s for p, s, _ in evaluations if not p.startswith(str(bare))) == ["done"] * 4
    failed = [(s, e) for p, s, e in evaluations if p.startswith(str(bare))]
    assert [s for s, _ in failed] == ["failed", "failed"]
    assert all("holds weights only: set keras_model in its [[watch]]" in e for _, e in failed)
    exported = query(db, "SELECT path, status FROM exports ORDER BY path")
    assert [s for _, s in exported] == ["published", "published"]
    for path, _ in exported:
        assert (Path(path) / "saved_model.pb").is_file()

    events = ckptd("events", "--kind", "unrecognized_files", "--json", config=config)
    reported = json.loads(events.stdout)
    assert {e["subject"] for e in reported} == {str(by_file), str(by_fn), str(bare)}
    assert all(e["reason"].startswith("ckpt/legacy.h5: HDF5 file") for e in reported)
    assert all(e["detail"]["files"][0]["file"] == "ckpt/legacy.h5" for e in reported)
    # `status` lists the newest problems: the last one reported is among them.
    status = json.loads(ckptd("status", "--json", config=config).stdout)
    assert any(p["kind"] == "unrecognized_files" for p in status["problems"])
    text = ckptd("status", config=config).stdout
    assert "unrecognized_files" in text and "ckpt/legacy.h5" in text


# ------------------------------------------------------------------ finding them (no TensorFlow)


def test_keras_files_in_subdirectories_are_found_with_their_relative_paths(
    tmp_path: Path,
) -> None:
    """Real Keras files (the golden corpus) in ckpt/ and ckpt/best/ are found, down to two
    levels and no deeper, never through a symlinked directory; a SavedModel is skipped."""
    run = tmp_path / "run"
    (run / "ckpt" / "best").mkdir(parents=True)
    (run / "a" / "b" / "c").mkdir(parents=True)
    keras_files = sorted(p.name for p in (GOLDEN / "keras").iterdir())
    for name in keras_files[:2]:
        shutil.copy2(GOLDEN / "keras" / name, run / "ckpt" / name)
    shutil.copy2(GOLDEN / "keras" / keras_files[2], run / "ckpt" / "best" / keras_files[2])
    shutil.copy2(GOLDEN / "keras" / keras_files[0], run / "a" / "b" / "c" / keras_files[0])
    outside = _copy(GOLDEN / "keras", tmp_path / "outside")
    (run / "linked").symlink_to(outside, target_is_directory=True)
    (run / "export" / "1" / "variables").mkdir(parents=True)
    (run / "export" / "1" / "saved_model.pb").write_bytes(b"")
    (run / "export" / "1" / "variables" / "variables.index").write_bytes(b"")

    listing = list_run(run, "model.{epoch:02d}-{val_loss:.2f}.keras")
    found = {f.files: f for f in listing.checkpoints}
    assert set(found) == {
        (f"ckpt/{keras_files[0]}",),
        (f"ckpt/{keras_files[1]}",),
        (f"ckpt/best/{keras_files[2]}",),
    }
    for files, f in found.items():
        assert f.prefix == str(run / files[0]) and f.state == "complete"
    assert found[(f"ckpt/{keras_files[0]}",)].step == 1
    assert found[(f"ckpt/{keras_files[0]}",)].metrics == {"val_loss": 0.53}
    assert set(listing.dir_mtimes) >= {"ckpt", "ckpt/best", "a", "a/b"}
    assert listing.unread == {}


def test_a_keras_file_saved_into_ckpt_is_recorded_and_seen_by_a_quick_rescan(
    tmp_path: Path,
) -> None:
    """The reconciler records real Keras files in ckpt/ (before: ignored), a quick rescan's
    fingerprint notices a new one there, and an unread file is reported once."""
    rec, watches, engine = _setup(tmp_path)
    run = tmp_path / "runs" / "a"
    (run / "ckpt").mkdir(parents=True)
    models = sorted((GOLDEN / "keras").glob("model.*.keras"))
    shutil.copy2(models[0], run / "ckpt" / models[0].name)
    (spec,) = discover(0, watches[0])
    assert rec.reconcile(spec).recorded == ["a@1"]
    _age_dirs(run)
    rec.reconcile(spec)
    assert rec.unchanged(spec)
    shutil.copy2(models[1], run / "ckpt" / models[1].name)
    assert not rec.unchanged(spec)
    assert rec.reconcile(spec).recorded == ["a@2"]
    weights = next((GOLDEN / "keras").glob("*.weights.h5"))
    shutil.copy2(weights, run / "ckpt" / "old.h5")
    rec.reconcile(spec)
    (run / "ckpt" / "older.h5").write_bytes(b"")
    rec.reconcile(spec)  # the same reason: not reported again
    with session_scope(engine) as s:  # type: ignore[arg-type]
        (reported,) = audit_reads.actions(s, kinds=["unrecognized_files"])
    assert reported.subject == str(run)
    assert (reported.reason or "").startswith("ckpt/old.h5: HDF5 file")


def test_checkpoint_like_files_ckptd_does_not_read_are_listed_with_why(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "tf" / "sub").mkdir(parents=True)
    h5 = next(p for p in (GOLDEN / "keras").iterdir() if p.name.endswith(".weights.h5"))
    shutil.copy2(h5, run / "ckpt" / "model.h5")  # HDF5, but not named .weights.h5
    (run / "model.ckpt").write_bytes(b"v1")
    (run / "frozen.pb").write_bytes(b"")
    (run / "tf" / "ckpt-1.index").write_bytes(b"")  # a TF checkpoint below the run's top
    (run / "notes.txt").write_text("fine")
    unread = list_run(run).unread
    assert set(unread) == {"ckpt/model.h5", "model.ckpt", "frozen.pb", "tf/ckpt-1.index"}
    assert unread["ckpt/model.h5"].startswith("HDF5 file")
    assert "make that directory a run" in unread["tf/ckpt-1.index"]


def test_prune_removes_a_recorded_file_in_a_subdirectory_never_through_a_symlink(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "model.01.keras").write_bytes(b"x" * 10)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.02.keras").write_bytes(b"y")
    (run / "link").symlink_to(outside, target_is_directory=True)
    done, refused, bad = remove_groups(
        tmp_path, run, [["ckpt/model.01.keras"], ["link/model.02.keras"], ["../outside/x"]]
    )
    assert done.ok and done.removed == ["ckpt/model.01.keras"] and done.bytes_freed == 10
    assert not (run / "ckpt" / "model.01.keras").exists()
    assert not refused.ok and (outside / "model.02.keras").exists()
    assert not bad.ok and "refused" in bad.errors[0]


# ------------------------------------------------------------------ config check


def _watch(**keys: object) -> dict[str, object]:
    return {"daemon": {"database": "sqlite:////tmp/x.db"}, "watch": [{"path": "/data/r", **keys}]}


def _problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "ckptd.toml")
    return [str(p) for p in info.value.problems]


def test_config_keras_model_is_a_keras_file_or_a_function() -> None:
    cfg = parse_config(_watch(keras_model="models/arch.keras"), "/etc/ckptd/ckptd.toml")
    assert cfg.watches[0].keras_model == "/etc/ckptd/models/arch.keras"
    cfg = parse_config(_watch(keras_model="pkg.models:build"), "ckptd.toml")
    assert cfg.watches[0].keras_model == "pkg.models:build"
    (problem,) = _problems(_watch(keras_model="arch.h5"))
    assert problem.startswith("ckptd.toml: watch[0].keras_model: expected a .keras file")


def test_config_refuses_what_cannot_work_on_keras_checkpoints() -> None:
    ev = {"evaluator": "keras", "data": "/d.npz"}
    fr = {"export_dir": "/e", "format": ["saved_model", "frozen_graph"], "outputs": {"y": "y"}}
    best = {"metric": "accuracy"}
    problems = _problems(_watch(keras_model="m:f", best=best, freeze=fr))
    assert problems == [
        "ckptd.toml: watch[0].freeze.format: frozen_graph needs a TF1 meta graph; Keras "
        'checkpoints export as "saved_model"'
    ]
    problems = _problems(_watch(best=best, evaluate={**ev, "use_ema": True}, freeze=fr))
    assert [p.split(": ")[1] for p in problems] == [
        "watch[0].evaluate.use_ema",
        "watch[0].freeze.format",
    ]
    (problem,) = _problems(_watch(evaluate={**ev, "feed": {"inputs": "a", "y": "b"}}))
    assert "watch[0].evaluate.feed: the keras evaluator maps x (required)" in problem
    assert problem.endswith("got inputs")
    ok = parse_config(_watch(evaluate={**ev, "feed": {"x": "images", "y": "labels"}}), "c.toml")
    assert ok.watches[0].evaluate is not None
    assert dict(ok.watches[0].evaluate.feed) == {"x": "images", "y": "labels"}
