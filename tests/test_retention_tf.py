"""Retention on what TensorFlow wrote, checked by TensorFlow (issue 12, items 1 and 7).

A trainer restarted from scratch in the same directory: pruning keeps what it resumes from.
``keep_every``: ckptd keeps exactly what a ``CheckpointManager`` with
``keep_checkpoint_every_n_hours`` keeps for the same saves.
"""

from __future__ import annotations

import json
import random
import subprocess
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ckptd.core import retention
from ckptd.io import statefile
from tests.conftest import ENV, PY, ckptd, query, write_config
from tests.retention_rules import Rules
from tests.test_policy import ckpt

pytestmark = [pytest.mark.tf, pytest.mark.slow]

# A TF2 trainer from scratch (no restore): its variables say which run wrote a checkpoint.
TRAINER = textwrap.dedent(
    """
    import os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    directory, run, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    step, weight = tf.Variable(0, dtype=tf.int64), tf.Variable(0.0)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step, weight=weight), directory, max_to_keep=5
    )
    for s in map(int, steps):
        time.sleep(0.05)  # training
        step.assign(s)
        weight.assign(1000.0 * run + s)
        manager.save(checkpoint_number=s)
    """
)

# What a trainer restarted now resumes from.
RESUME = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    directory = sys.argv[1]
    step, weight = tf.Variable(0, dtype=tf.int64), tf.Variable(0.0)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step, weight=weight), directory, max_to_keep=5
    )
    out = {"latest": tf.train.latest_checkpoint(directory), "manager": manager.latest_checkpoint}
    out["checkpoints"] = list(manager.checkpoints)
    manager.restore_or_initialize()
    out["step"], out["weight"] = int(step.numpy()), float(weight.numpy())
    print(json.dumps(out))
    """
)

# One checkpoint saved through two managers at set times after their creation: one keeps the
# last 2 and one every n hours, the other keeps everything (for ckptd to prune).
EVERY_N_HOURS = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    tf_dir, all_dir, hours, offsets = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    v = tf.Variable(0.0)
    ckpt = tf.train.Checkpoint(v=v)
    ckpt.save(tf_dir + "-warm-up/w")  # the first save traces functions: not on the clock
    start = time.time()
    by_tf = tf.train.CheckpointManager(
        ckpt, tf_dir, max_to_keep=2, keep_checkpoint_every_n_hours=hours
    )
    everything = tf.train.CheckpointManager(ckpt, all_dir, max_to_keep=None)
    saved_at = []
    for i, offset in enumerate(map(float, offsets.split(",")), 1):
        time.sleep(max(0.0, start + offset - time.time()))
        v.assign(float(i))
        by_tf.save(checkpoint_number=i)
        everything.save(checkpoint_number=i)
        saved_at.append(time.time() - start)
    print(json.dumps(saved_at))
    """
)

RETAIN = """
[watch.retain]
keep_last = 2
min_age = "0s"
every = "1h"
{extra}
"""


def _tf(script: str, *args: object) -> str:
    proc = subprocess.run(
        [PY, "-c", script, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _run_once(conf: Path) -> None:
    proc = ckptd("run", "--once", config=conf, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name[len("ckpt-") : -len(".index")]) for p in directory.glob("*.index"))


def test_a_restarted_trainer_resumes_from_its_own_newest_after_a_prune(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = root / "run"
    run.mkdir(parents=True)
    db = tmp_path / "ckptd.db"
    conf = write_config(
        tmp_path / "c.toml", root, db=db, best=False, extra=RETAIN.format(extra="dry_run = true")
    )
    _tf(TRAINER, run, 1, "1,11,21,31,41")
    _run_once(conf)  # ckptd records the first run as it goes (and deletes nothing)
    _tf(TRAINER, run, 2, "1,11")  # restarted from scratch: ckpt-1 and ckpt-11 again
    state = statefile.read(run)
    assert state is not None and state.model_checkpoint_path == "ckpt-11"  # TF's latest

    conf.write_text(conf.read_text().replace("dry_run = true", ""))
    _run_once(conf)  # keep_last = 2: the two saved last, whatever their steps

    assert _steps(run) == [1, 11]
    states = query(db, "select prefix, state from checkpoints")
    assert {p for p, s in states if s == "pruned"} == {f"{run}/ckpt-{s}" for s in (21, 31, 41)}
    assert {p for p, s in states if s == "complete"} == {f"{run}/ckpt-{s}" for s in (1, 11)}
    state = statefile.read(run)
    assert state is not None and state.model_checkpoint_path == "ckpt-11"
    assert state.all_model_checkpoint_paths == ["ckpt-1", "ckpt-11"]
    out: dict[str, Any] = json.loads(_tf(RESUME, run).strip().splitlines()[-1])
    assert out["latest"] == out["manager"] == f"{run}/ckpt-11"
    assert out["checkpoints"] == [f"{run}/ckpt-1", f"{run}/ckpt-11"]
    assert (out["step"], out["weight"]) == (11, 2011.0)  # the new run's newest, not the old one


def test_keep_every_keeps_what_tensorflow_keeps(tmp_path: Path) -> None:
    # Every 2 s, with max_to_keep / keep_last 2. The first save is 1.5 s after the managers'
    # creation (TF anchors at creation - 1 s), so TF keeps it; the other gaps leave 0.5 s to
    # the interval's edge either way.
    offsets = (1.5, 2.0, 2.5, 4.0, 4.5, 5.0, 5.5, 6.5, 7.0, 7.5)
    by_tf, root = tmp_path / "by_tf", tmp_path / "runs"
    everything = root / "run"
    everything.mkdir(parents=True)
    saved_at = json.loads(
        _tf(EVERY_N_HOURS, by_tf, everything, 2 / 3600, ",".join(map(str, offsets)))
    )
    assert len(saved_at) == len(offsets)
    kept_by_tf = _steps(by_tf)
    assert 1 in kept_by_tf, (kept_by_tf, saved_at)  # what anchoring at the first save misses
    assert len(_steps(everything)) == len(offsets)

    db = tmp_path / "ckptd.db"
    extra = RETAIN.format(extra='keep_every = "2s"')
    _run_once(write_config(tmp_path / "c.toml", root, db=db, best=False, extra=extra))
    assert _steps(everything) == kept_by_tf, saved_at


# The same on many schedules, on TensorFlow's clock (``time.time`` faked, as test_policy does).
ORACLE = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from unittest import mock
    import tensorflow as tf
    out = []
    for i, case in enumerate(json.loads(sys.argv[2])):
        by_tf, everything = (os.path.join(sys.argv[1], f"{i}-{d}") for d in ("tf", "all"))
        clock = [case["created"]]
        with mock.patch("time.time", lambda: clock[0]):
            ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
            managers = [
                tf.train.CheckpointManager(
                    ckpt, by_tf, max_to_keep=case["n"], keep_checkpoint_every_n_hours=case["h"]
                ),
                tf.train.CheckpointManager(ckpt, everything, max_to_keep=None),
            ]
            for step, t in zip(case["steps"], case["times"]):
                clock[0] = t
                for manager in managers:
                    manager.save(checkpoint_number=step)
        names = os.listdir(by_tf)
        out.append(sorted(int(f[5:-6]) for f in names if f.endswith(".index")))
    print(json.dumps(out))
    """
)


def test_keep_every_matches_tensorflow_on_many_schedules(tmp_path: Path) -> None:
    rng = random.Random(12)
    cases = []
    for _ in range(12):
        hours = rng.choice([0.5, 1.0, 2.5])
        t = created = 1_700_000_000.0 + rng.uniform(0, 1e6)
        t += rng.uniform(0, 2 * hours * 3600)  # the gap between the manager and its first save
        times = []
        for _ in range(rng.randint(3, 30)):
            times.append(t)
            t += rng.uniform(60, 3 * 3600)
        steps = [10 * (i + 1) for i in range(len(times))]
        cases.append(
            {"n": rng.randint(1, 4), "h": hours, "created": created, "times": times, "steps": steps}
        )
    tf_kept = json.loads(_tf(ORACLE, tmp_path, json.dumps(cases)).strip().splitlines()[-1])
    assert any(10 in kept for kept in tf_kept)  # TF keeps some first saves: old ckptd never did
    for i, (case, expected) in enumerate(zip(cases, tf_kept, strict=True)):
        items = [
            replace(ckpt(j + 1, s, minutes=0), created_at=_utc(t), recorded_at=_utc(t))
            for j, (s, t) in enumerate(zip(case["steps"], case["times"], strict=True))
        ]
        trainer = statefile.trainer_state(tmp_path / f"{i}-all", tmp_path)
        assert trainer.preserved_at == _utc(case["created"] - 1)  # TF: its creation - 1 s
        rules = Rules(keep_last=case["n"], keep_every=timedelta(hours=case["h"]))
        rule_set = retention.rules_from(rules, None)
        plan = retention.plan(items, rule_set, _utc(case["times"][-1] + 1), trainer)
        assert sorted(c.step for c in items if c.id in plan.keep) == expected, case


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None)
