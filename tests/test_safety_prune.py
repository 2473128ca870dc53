"""Prune deletes only what it recorded (issue 10, items 7 and 8).

Item 7: besides recorded checkpoint files, prune removes only TensorFlow's own stale temporary
names of a recorded checkpoint prefix, lists them in the plan and audits them; a user's
``*_temp`` directory is never touched. Item 8: ``[watch.retain] dry_run = true`` holds for every
prune (CLI, scheduled, ``run --once``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from ckptd.io import fsops
from tests.conftest import Corpus, ckptd, query, write_config

RETAIN = """
[watch.retain]
keep_last = 1
min_age = "0s"
every = "1h"
dry_run = {dry_run}
"""
DAY = 86400
CHECKPOINT_FILE = re.compile(r"runs/tf[12]/(model\.)?ckpt-\d+\.(index|meta|data-\d{5}-of-\d{5})")
# Random parts as TF 2.21 writes them (traced with strace: BundleWriter's ".tempstate" + a
# 64-bit random number, file_io's atomic write ".tmp" + a uuid4 hex).
TEMPSTATE = ".tempstate12586517270750612351"
META_TMP = ".meta.tmp30ff3cadec204fe98fc3eff580c73d10"


def _setup(tmp_path: Path, corpus: Corpus, dry_run: bool) -> tuple[Path, Path, Path]:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(
        tmp_path / "c.toml",
        root,
        db=db,
        extra=RETAIN.format(dry_run=str(dry_run).lower()),
        best=False,
    )
    for kind in ("tf1", "tf2"):
        corpus.copy(kind, root / kind)
    return root, db, conf


def _age(*paths: Path, days: float = 2) -> None:
    """As if written ``days`` ago (children before their directory: that sets its mtime)."""
    when = time.time() - days * DAY
    for p in paths:
        os.utime(p, (when, when), follow_symlinks=False)


def _tree(top: Path) -> set[str]:
    return {str(p.relative_to(top.parent)) for p in top.rglob("*")}


def _tf2_temp_dir(run: Path, prefix: str, *extra: str) -> Path:
    """A ``PREFIX_temp/`` as a TF2 save leaves it when it dies before the merge: real part files
    (copies of the run's own checkpoint ``ckpt-10``) under TF's names, plus ``extra`` files."""
    d = run / f"{prefix}_temp"
    d.mkdir()
    part = "part-00000-of-00001"
    shutil.copy(run / "ckpt-10.index", d / f"{part}.index")
    shutil.copy(run / "ckpt-10.data-00000-of-00001", d / f"{part}.data-00000-of-00001{TEMPSTATE}")
    for name in extra:
        (d / name).write_text("the user's")
    _age(*d.iterdir(), d)
    return d


@pytest.mark.slow
def test_prune_removes_only_tensorflow_leftovers_of_recorded_checkpoints(
    tmp_path: Path, corpus: Corpus
) -> None:
    root, db, conf = _setup(tmp_path, corpus, dry_run=True)
    tf1, tf2 = root / "tf1", root / "tf2"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "part-00000-of-00001.index").write_text("not in the watch root")
    (outside / "precious").write_text("keep")

    # TensorFlow's own leftovers of recorded checkpoints (a save that died a day ago) ...
    ours = {
        "tf2": {"ckpt-10_temp/", "ckpt-20_temp/"},
        "tf1": {f"model.ckpt-10.index{TEMPSTATE}", f"model.ckpt-20{META_TMP}"},
    }
    _tf2_temp_dir(tf2, "ckpt-10")
    _tf2_temp_dir(tf2, "ckpt-20")
    shutil.copy(tf1 / "model.ckpt-10.index", tf1 / f"model.ckpt-10.index{TEMPSTATE}")
    shutil.copy(tf1 / "model.ckpt-20.meta", tf1 / f"model.ckpt-20{META_TMP}")
    _age(tf1 / f"model.ckpt-10.index{TEMPSTATE}", tf1 / f"model.ckpt-20{META_TMP}")
    # ... and everything that is not: the user's experiment_temp/ (the reported loss), a temp
    # dir with other content, one of a prefix never recorded, a symlinked one, a symlinked
    # tempstate, and a leftover being written right now.
    user = tf2 / "experiment_temp" / "results"
    user.mkdir(parents=True)
    (user / "table.csv").write_text("epoch,acc\n1,0.9\n")
    _age(user / "table.csv", user, user.parent)
    _tf2_temp_dir(tf2, "ckpt-30", "notes.txt")
    _tf2_temp_dir(tf2, "ckpt-99")
    (tf2 / "ckpt-40_temp").symlink_to(outside)
    (tf1 / f"model.ckpt-20.index{TEMPSTATE}").symlink_to(outside / "precious")
    not_utf8 = tf1 / f"model.ckpt-10\udcff.index{TEMPSTATE}"  # b"\xff" in the name
    not_utf8.write_bytes(b"")
    _age(not_utf8)
    fresh = tf1 / f"model.ckpt-30.data-00000-of-00001{TEMPSTATE}"
    shutil.copy(tf1 / "model.ckpt-30.data-00000-of-00001", fresh)

    assert ckptd("run", "--once", config=conf).returncode == 0  # records; dry_run: no deletion
    assert not query(db, "select id from actions where kind = 'removed_temp'")
    conf.write_text(conf.read_text().replace("dry_run = true", "dry_run = false"))
    before = _tree(root) | _tree(outside)

    # The plan lists exactly TF's leftovers, and a dry run removes nothing.
    dry = ckptd("prune", "--dry-run", "--json", config=conf)
    assert dry.returncode == 0, dry.stderr
    plans = {p["run"]: p for p in json.loads(dry.stdout)}
    for run in ("tf1", "tf2"):
        names = {
            f["name"] + ("/" if f["files"] is not None else "") for f in plans[run]["leftovers"]
        }
        assert names == ours[run]
    assert {tuple(f["files"]) for f in plans["tf2"]["leftovers"]} == {
        ("part-00000-of-00001.data-00000-of-00001" + TEMPSTATE, "part-00000-of-00001.index")
    }
    human = ckptd("prune", "--dry-run", config=conf)
    assert "would remove TensorFlow's stale temporary files: " in human.stdout
    assert "ckpt-10_temp/ (2 part files)" in human.stdout
    assert (tf2 / "ckpt-10_temp").is_dir() and (tf1 / f"model.ckpt-10.index{TEMPSTATE}").exists()

    result = ckptd("prune", "--json", config=conf)
    assert result.returncode == 0, result.stderr
    removed = {p["run"]: set(p["leftovers_removed"]) for p in json.loads(result.stdout)}
    assert {n for n in removed["tf2"] if n.endswith("/")} == ours["tf2"]
    assert removed["tf1"] == ours["tf1"]
    for name in ours["tf2"] | ours["tf1"]:
        assert not (root / ("tf2" if "_temp" in name else "tf1") / name).exists()
    # Nothing else was touched.
    assert (user / "table.csv").read_text() == "epoch,acc\n1,0.9\n"
    assert (tf2 / "ckpt-30_temp" / "notes.txt").exists()
    assert len(list((tf2 / "ckpt-30_temp").iterdir())) == 3
    assert len(list((tf2 / "ckpt-99_temp").iterdir())) == 2
    assert (tf2 / "ckpt-40_temp").is_symlink() and len(list(outside.iterdir())) == 2
    assert (tf1 / f"model.ckpt-20.index{TEMPSTATE}").is_symlink()
    assert (outside / "precious").read_text() == "keep" and fresh.exists() and not_utf8.exists()
    # Nothing else that is not a checkpoint file went (the pruned checkpoints' files did).
    gone = {p for p in before - _tree(root) - _tree(outside) if not CHECKPOINT_FILE.fullmatch(p)}
    assert gone == {
        f"runs/{run}/{name.rstrip('/')}" for run in ("tf1", "tf2") for name in ours[run]
    } | {f"runs/tf2/{n}" for n in removed["tf2"] if not n.endswith("/")}

    # One audit entry per run names every path it removed.
    events = json.loads(ckptd("events", "--kind", "removed_temp", "--json", config=conf).stdout)
    by_run = {e["run"]: e for e in events}
    assert len(events) == 2 and set(by_run) == {"tf1", "tf2"}
    assert set(by_run["tf1"]["detail"]["removed"]) == ours["tf1"]
    assert (
        set(by_run["tf2"]["detail"]["removed"])
        == removed["tf2"]
        == {
            f"ckpt-{s}_temp/{n}"
            for s in (10, 20)
            for n in (
                "part-00000-of-00001.index",
                f"part-00000-of-00001.data-00000-of-00001{TEMPSTATE}",
            )
        }
        | ours["tf2"]
    )
    # A second prune finds nothing more to remove.
    again = json.loads(ckptd("prune", "--json", config=conf).stdout)
    assert all(not p["leftovers"] for p in again)


def test_leftover_changed_after_planning_is_left_alone(tmp_path: Path) -> None:
    """Removal checks each planned name again: content added, or the directory swapped for a
    symlink, between plan and removal keeps it."""
    root = tmp_path / "root"
    run = root / "run"
    run.mkdir(parents=True)
    (run / "ckpt-1.index").write_bytes(b"x")
    (run / "ckpt-1.data-00000-of-00001").write_bytes(b"y")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "part-00000-of-00001.index").write_text("outside")
    for prefix in ("ckpt-1", "ckpt-2"):
        d = run / f"{prefix}_temp"
        d.mkdir()
        (d / "part-00000-of-00001.index").write_bytes(b"tf")
        _age(d / "part-00000-of-00001.index", d)
    plan = fsops.find_leftovers(root, run)
    assert sorted(f.name for f in plan) == ["ckpt-1_temp", "ckpt-2_temp"]
    (run / "ckpt-1_temp" / "mine.txt").write_text("added after the plan")
    shutil.rmtree(run / "ckpt-2_temp")
    (run / "ckpt-2_temp").symlink_to(outside)
    result = fsops.remove_leftovers(root, run, plan)
    assert result.removed == [] and sorted(result.missing) == ["ckpt-1_temp", "ckpt-2_temp"]
    assert (run / "ckpt-1_temp" / "part-00000-of-00001.index").exists()
    assert (outside / "part-00000-of-00001.index").read_text() == "outside"
    # Nor does a path outside the root, or through a symlink, reach anything.
    assert fsops.find_leftovers(root, outside) == []
    assert fsops.find_leftovers(root, run / "ckpt-2_temp") == []


@pytest.mark.slow
def test_dry_run_config_holds_for_cli_prune(tmp_path: Path, corpus: Corpus) -> None:
    root, db, conf = _setup(tmp_path, corpus, dry_run=True)
    assert ckptd("run", "--once", config=conf).returncode == 0
    before = sorted(p.name for p in (root / "tf2").iterdir())
    states = dict(query(db, "select prefix, state from checkpoints"))
    assert len(states) >= 6 and set(states.values()) == {"complete"}

    human = ckptd("prune", config=conf)  # no --dry-run: the config alone forbids deleting
    assert human.returncode == 0, human.stderr
    assert "dry-run mode: [watch.retain] dry_run = true in" in human.stdout
    assert "tf2: would delete 2, keep 1 (dry_run = true in the config)" in human.stdout
    assert "not kept by any rule" in human.stdout  # the plan is shown
    as_json = json.loads(ckptd("prune", "tf2", "--json", config=conf).stdout)
    assert as_json[0]["dry_run"] and as_json[0]["dry_run_config"] and not as_json[0]["pruned"]
    assert [r["action"] for r in as_json[0]["plan"]].count("delete") == 2

    assert sorted(p.name for p in (root / "tf2").iterdir()) == before
    assert dict(query(db, "select prefix, state from checkpoints")) == states
    assert not query(db, "select id from actions where kind = 'pruned'")
    # Turning it off is what lets the same command delete.
    conf.write_text(conf.read_text().replace("dry_run = true", "dry_run = false"))
    done = json.loads(ckptd("prune", "tf2", "--json", config=conf).stdout)
    assert not done[0]["dry_run"] and len(done[0]["pruned"]) == 2
