"""The training step of a TF checkpoint comes from the checkpoint itself (issue 12, item 3).

``CheckpointManager(step_counter=…, checkpoint_interval=…).save()`` names its files by save count
(``ckpt-1`` … ``ckpt-4``) while the run logs at steps 1, 11, 21, 31; a TF1 Saver may number its
files by anything while ``global_step`` holds the step. The step is read from the data file
(the ``.index`` says where); the file name's number is the fallback; a run whose logged steps
still match no checkpoint is reported in ``status`` and ``events``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from ckptd.io.formats import COMPLETE, scan_run
from ckptd.io.formats import tensorbundle as tb
from ckptd.io.formats.step import DEFAULT_KEYS, step_keys
from tests.conftest import ENV, PY, REPO, Corpus, ckptd, query

# Writes three runs with TensorFlow; prints {run: {prefix: step}} as TF's own reader sees it.
TRAIN = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    out = sys.argv[1]

    def log(run, steps):
        with tf.summary.create_file_writer(os.path.join(out, run, "eval")).as_default():
            for s in steps:
                tf.summary.scalar("accuracy", s / 1000, step=s)

    # TF2: files numbered by save count; saves every 10 steps of a tracked step counter.
    step = tf.Variable(0, dtype=tf.int64)
    w = tf.Variable(tf.zeros([4]))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step, w=w), os.path.join(out, "manager"), max_to_keep=None,
        step_counter=step, checkpoint_interval=10,
    )
    saved = []
    for i in range(1, 41):
        step.assign(i)
        w.assign_add(tf.ones([4]))
        if manager.save() is not None:
            saved.append(i)
    log("manager", saved)

    # TF2: a step counter under a name of the user's own (no optimizer, no `step`).
    train = tf.Module()
    train.counter = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(train=train)
    for i in (5, 10, 15):
        train.counter.assign(i)
        ckpt.save(os.path.join(out, "custom", "ckpt"))
    log("custom", [5, 10, 15])

    # TF1 Saver: global_step at 100, 200, 300; files numbered 1, 2, 3.
    with tf.Graph().as_default():
        gs = tf.compat.v1.train.get_or_create_global_step()
        tf.compat.v1.get_variable("v", [3])
        inc = tf.compat.v1.assign_add(gs, 100)
        saver = tf.compat.v1.train.Saver(max_to_keep=None)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for n in (1, 2, 3):
                sess.run(inc)
                saver.save(sess, os.path.join(out, "tf1", "model.ckpt"), global_step=n)
    log("tf1", [100, 200, 300])

    keys = {"manager": "step", "custom": "train/counter", "tf1": "global_step"}
    steps = {}
    for run, key in keys.items():
        full = key if run == "tf1" else key + "/.ATTRIBUTES/VARIABLE_VALUE"
        d = os.path.join(out, run)
        prefixes = sorted(os.path.join(d, f[:-6]) for f in os.listdir(d) if f.endswith(".index"))
        steps[run] = {p: int(tf.train.load_checkpoint(p).get_tensor(full)) for p in prefixes}
    print(json.dumps(steps))
    """
)


@pytest.fixture(scope="module")
def stepped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]]]:
    """The three runs (written once by TensorFlow) and the step TF reads from each checkpoint."""
    out = tmp_path_factory.mktemp("stepped")
    proc = subprocess.run(
        [PY, "-c", TRAIN, str(out)], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.splitlines()[-1])


def _config(tmp_path: Path, root: Path, step_variable: str | None = None) -> Path:
    line = f'step_variable = "{step_variable}"' if step_variable else ""
    conf = tmp_path / "ckptd.toml"
    conf.write_text(
        textwrap.dedent(
            f"""\
            [daemon]
            database = "sqlite:///{tmp_path / "ckptd.db"}"

            [[watch]]
            path = "{root}"
            runs = "*"
            {line}

            [watch.best]
            metric = "eval/accuracy"
            """
        )
    )
    return conf


def _recorded(db: Path, run: str) -> dict[str, tuple[int, float | None]]:
    """prefix -> (step, eval/accuracy to 6 places: logged as float32) of a run's checkpoints."""
    rows = query(
        db,
        "SELECT c.prefix, c.step, m.value FROM checkpoints c JOIN runs r ON r.id = c.run_id "
        "LEFT JOIN metrics m ON m.checkpoint_id = c.id AND m.name = 'eval/accuracy' "
        "WHERE r.name = ?",
        run,
    )
    return {p: (s, None if v is None else round(v, 6)) for p, s, v in rows}


@pytest.mark.tf
@pytest.mark.slow
def test_each_checkpoint_gets_the_metric_logged_at_its_own_step(
    stepped: tuple[Path, dict[str, dict[str, int]]], tmp_path: Path
) -> None:
    out, tf_steps = stepped
    assert [Path(p).name for p in tf_steps["manager"]] == [f"ckpt-{i}" for i in (1, 2, 3, 4)]
    assert list(tf_steps["manager"].values()) == [1, 11, 21, 31]
    conf = _config(tmp_path, out)
    assert ckptd("run", "--once", config=conf).returncode == 0
    db = tmp_path / "ckptd.db"
    for run in ("manager", "tf1"):
        # The step TensorFlow reads from each checkpoint, and the value logged at that step.
        expected = {p: (s, s / 1000) for p, s in tf_steps[run].items()}
        assert _recorded(db, run) == expected, run
    best = json.loads(ckptd("best", "manager", "--json", config=conf).stdout)
    assert [(Path(b["path"]).name, b["step"]) for b in best["best"]] == [("ckpt-4", 31)], best
    status = json.loads(ckptd("status", "--json", config=conf).stdout)
    # `custom` keeps its counter where ckptd does not look: numbered by name, and said so.
    assert [(w["run"], w["kind"]) for w in status["warnings"]] == [("custom", "steps_unmatched")]

    # A rescan of unchanged checkpoints keeps their steps without reading them again.
    manager = out / "manager"
    first = scan_run(manager)
    again = scan_run(manager, known={f.prefix: f.signature for f in first})
    assert sorted((f.prefix, f.step) for f in again) == sorted(tf_steps["manager"].items())


@pytest.mark.tf
@pytest.mark.slow
def test_step_variable_names_a_counter_of_the_users_own(
    stepped: tuple[Path, dict[str, dict[str, int]]], tmp_path: Path
) -> None:
    out, tf_steps = stepped
    root = tmp_path / "runs"
    shutil.copytree(out / "custom", root / "custom")
    moved = {str(root / "custom" / Path(p).name): s for p, s in tf_steps["custom"].items()}

    # Without step_variable: numbered by name (1, 2, 3), nothing matches the logged 5, 10, 15;
    # status says so, and one event tells it (once, however often the run is scanned).
    conf = _config(tmp_path, root)
    for _ in range(2):
        assert ckptd("run", "--once", config=conf).returncode == 0
    db = tmp_path / "ckptd.db"
    assert sorted(s for s, _v in _recorded(db, "custom").values()) == [1, 2, 3]
    status = json.loads(ckptd("status", "--json", config=conf).stdout)
    (warning,) = status["warnings"]
    assert warning["run"] == "custom" and warning["kind"] == "steps_unmatched"
    assert "5–15" in warning["message"] and "1–3" in warning["message"]
    assert "step_variable" in warning["message"]
    text = ckptd("status", config=conf).stdout
    assert "warning: run custom: event files log steps 5–15" in text
    events = json.loads(ckptd("events", "--kind", "steps_unmatched", "--json", config=conf).stdout)
    assert [(e["kind"], e["run"]) for e in events] == [("steps_unmatched", "custom")], events

    # With it: the counter's steps, each with its own value, and no warning.
    db.unlink()
    conf = _config(tmp_path, root, step_variable="train/counter")
    assert ckptd("run", "--once", config=conf).returncode == 0
    assert _recorded(db, "custom") == {p: (s, s / 1000) for p, s in moved.items()}
    assert json.loads(ckptd("status", "--json", config=conf).stdout)["warnings"] == []


# ------------------------------------------------------------------ without TensorFlow


@pytest.mark.parametrize("kind", ["tf1", "tf2", "sharded"])
def test_golden_steps_are_read_from_the_data(golden: Corpus, kind: str) -> None:
    """The checked-in runs: the step each checkpoint holds (global_step, step) is the one the
    trainer reported; ``save_counter`` (1, 2, 3) is not the step."""
    run = golden.run_dir(kind)
    found = scan_run(run)
    assert all(f.state == COMPLETE for f in found)
    reported = {rec["prefix"]: rec["step"] for rec in golden.saves[kind]}
    assert {f.prefix: f.step for f in found} == reported
    counted = scan_run(run, step_variable="save_counter")
    if kind != "tf1":
        assert sorted(f.step for f in counted) == list(range(1, len(found) + 1))


def test_a_step_that_fails_its_checksum_falls_back_to_the_name(
    golden: Corpus, tmp_path: Path
) -> None:
    """Data bytes that are not what the index describes (rewritten since) are not a step."""
    run = golden.copy("tf2", tmp_path / "run")
    name = Path(golden.saves["tf2"][0]["prefix"]).name
    index = (run / f"{name}.index").read_bytes()
    at = tb.read_header(index, DEFAULT_KEYS).located
    assert at is not None and at.key == b"step/.ATTRIBUTES/VARIABLE_VALUE"
    data = run / f"{name}.data-{at.shard:05d}-of-00001"
    raw = bytearray(data.read_bytes())
    raw[at.offset : at.offset + 8] = (12345).to_bytes(8, "little")
    data.write_bytes(bytes(raw))
    found = {Path(f.prefix).name: f for f in scan_run(run)}
    assert found[name].state == COMPLETE and found[name].step == int(name.split("-")[1])


def test_step_keys_of_a_watch() -> None:
    assert step_keys(None) == DEFAULT_KEYS
    assert b"save_counter/.ATTRIBUTES/VARIABLE_VALUE" not in DEFAULT_KEYS
    assert step_keys("global_step") == (b"global_step", b"global_step/.ATTRIBUTES/VARIABLE_VALUE")
    full = "train/counter/.ATTRIBUTES/VARIABLE_VALUE"
    assert step_keys(full) == (full.encode(),)


def test_checkpoints_validated_before_steps_were_read_are_not_read_again(golden: Corpus) -> None:
    """A database from before keeps its rows: a 6-element signature (no step) still skips the
    index, with the step it was recorded at (the name's), and the row does not change."""
    run = golden.run_dir("tf2")
    fresh = {f.prefix: f for f in scan_run(run, step_variable="save_counter")}
    assert sorted(f.step for f in fresh.values()) == [1, 2, 3]  # read: these are not the names'
    old = {p: f.signature[:6] for p, f in fresh.items()}
    again = {f.prefix: f for f in scan_run(run, known=old, step_variable="save_counter")}
    assert {p: (f.step, f.signature) for p, f in again.items()} == {
        p: (int(p.rsplit("-", 1)[1]), sig) for p, sig in old.items()
    }
