"""Retention follows save order, never deletes what the state file names, and anchors
``keep_every`` where TensorFlow's CheckpointManager does (issue 12, items 1 and 7)."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ckptd.core import retention
from ckptd.core.model import Checkpoint
from ckptd.core.ranking import select_best
from ckptd.core.retention import CURRENT, LAST, NEWEST, KeepEvery, TrainerState
from ckptd.io import statefile
from ckptd.io.statefile import CheckpointState, current_prefix
from tests.conftest import Corpus, ckptd, write_config
from tests.retention_rules import Rules
from tests.test_policy import METRIC, T0, ckpt

NOW = T0 + timedelta(hours=10)


def _plan(items: list[Checkpoint], rules: Rules, trainer: TrainerState) -> retention.Plan:
    return retention.plan(items, retention.rules_from(rules, None), NOW, trainer)


def _restarted() -> list[Checkpoint]:
    """ckpt-1 … ckpt-41, then a trainer restarted from scratch wrote ckpt-1 and ckpt-11 again
    (as new rows, or as the old rows updated: both are tested)."""
    old = [ckpt(i + 1, 10 * i + 1, minutes=i) for i in range(5)]
    return [*old, ckpt(6, 1, minutes=10), ckpt(7, 11, minutes=11)]


def test_keep_last_and_newest_follow_save_order_not_steps() -> None:
    items = _restarted()
    plan = _plan(items, Rules(keep_last=2), TrainerState())
    assert plan.keep == {6: (LAST,), 7: (NEWEST, LAST)}
    assert [c.step for c in plan.delete] == [1, 11, 21, 31, 41]
    # The same when recording updated the overwritten rows in place (their new save time).
    rewritten = [*items[2:5], replace(items[0], created_at=T0 + timedelta(minutes=10))]
    rewritten.append(replace(items[1], created_at=T0 + timedelta(minutes=11)))
    plan = _plan(rewritten, Rules(keep_last=2), TrainerState())
    assert plan.keep == {1: (LAST,), 2: (NEWEST, LAST)}
    assert [c.step for c in plan.delete] == [21, 31, 41]


def test_same_save_time_goes_by_step_then_record() -> None:
    same = [ckpt(3, 30, minutes=0), ckpt(1, 10, minutes=0), ckpt(2, 20, minutes=0)]
    assert [c.id for c in _plan(same, Rules(keep_last=1), TrainerState()).delete] == [1, 2]


def test_the_state_files_checkpoint_is_never_deleted() -> None:
    items = _restarted()
    current = TrainerState(current=items[2].prefix)  # ckpt-21: a restore rewrote the state file
    plan = _plan(items, Rules(keep_last=1), current)
    assert plan.keep == {3: (CURRENT,), 7: (NEWEST, LAST)}
    assert _plan(items, Rules(keep_last=1), TrainerState(items[6].prefix)).keep == {
        7: (NEWEST, LAST, CURRENT)
    }
    # A state file naming nothing recorded, or a checkpoint that is not complete, keeps nothing.
    assert retention.current(retention.History(items, items, NOW, TrainerState("/r/x"))) == {}
    corrupt = [replace(c, state="corrupt") for c in items]
    assert retention.current(retention.History(corrupt, [], NOW, current)) == {}


def _saves(*seconds: float) -> list[Checkpoint]:
    return [ckpt(i + 1, i + 1, minutes=s / 60) for i, s in enumerate(seconds)]


def test_keep_every_anchors_at_the_managers_creation() -> None:
    # A manager created at T0, saves 1.5 s, 2 s, 2.5 s, 4 s, 4.5 s and 6.5 s after it; every 2 s.
    items = _saves(1.5, 2, 2.5, 4, 4.5, 6.5)
    created = TrainerState(preserved_at=T0 - timedelta(seconds=1))  # TF writes creation - 1 s

    def kept(trainer: TrainerState, seconds: float = 2) -> list[int]:
        every = KeepEvery(timedelta(seconds=seconds), window=1)
        return sorted(every(retention.History(items, items, NOW, trainer)))

    # As TF does: ckpt-1 is 2.5 s after the anchor, ckpt-4 2.5 s after ckpt-1.
    assert kept(created) == [1, 4]
    # Without a state file (TF1), the first save is the anchor and is not kept.
    assert kept(TrainerState()) == [4]
    # A manager created 3 s after T0 (over an earlier trainer's saves): 4 s and 4.5 s are too
    # close to its anchor; 6.5 s is in the keep_last window.
    later = TrainerState(preserved_at=T0 + timedelta(seconds=3))
    assert kept(later) == []
    # Saves from before its anchor are walked from the first save (2.5 s is kept, 1 s after
    # 1.5 s); from the anchor on, the manager's own counts (4 s is not: 0.2 s after 3.8 s).
    assert kept(TrainerState(preserved_at=T0 + timedelta(seconds=3.8)), 1) == [3]
    assert kept(TrainerState(), 1) == [3, 4]


def test_trainer_state_reads_the_state_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert statefile.trainer_state(run, tmp_path) == retention.NO_STATE  # no file
    state = CheckpointState("ckpt-11", ["ckpt-41", "ckpt-11"], [5.0, 6.0], 1_700_000_000.5)
    statefile.write_atomic(run, state)
    got = statefile.trainer_state(run, tmp_path)
    assert got.current == f"{run}/ckpt-11"
    assert got.preserved_at == datetime(2023, 11, 14, 22, 13, 20, 500000)
    assert got.preserved_at == datetime.fromtimestamp(1_700_000_000.5, UTC).replace(tzinfo=None)
    statefile.write_atomic(run, CheckpointState("ckpt-1", [], [], float("inf")))
    assert statefile.trainer_state(run, tmp_path) == TrainerState(f"{run}/ckpt-1", None)
    (run / "checkpoint").unlink()
    os.mkfifo(run / "checkpoint")  # never opened: nothing is known
    assert statefile.trainer_state(run, tmp_path) == retention.NO_STATE


def test_current_prefix_spells_it_as_ckptd_records_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "link").symlink_to(run)
    assert current_prefix(CheckpointState(f"{run}/model.ckpt-3"), run) == f"{run}/model.ckpt-3"
    # TF1 wrote the directory as the trainer spelt it, through a symlink.
    via_link = CheckpointState(f"{tmp_path}/link/model.ckpt-3")
    assert current_prefix(via_link, run) == f"{run}/model.ckpt-3"
    assert current_prefix(CheckpointState("/elsewhere/ckpt-3"), run) == "/elsewhere/ckpt-3"
    assert current_prefix(CheckpointState(""), run) is None


def test_a_tie_for_best_goes_to_the_one_saved_later() -> None:
    old, new = ckpt(1, 41, minutes=0, value=0.9), ckpt(2, 11, minutes=5, value=0.9)
    assert select_best([old, new], METRIC, "max") == new  # the restarted run's, not step 41
    assert select_best([replace(new, created_at=None, recorded_at=None), old], METRIC, "max") == old


@pytest.mark.slow
def test_a_state_file_left_without_entries_points_at_the_last_saved(
    tmp_path: Path, corpus: Corpus
) -> None:
    """The state file names only what no longer exists: after a prune it points at the newest
    remaining checkpoint by save order (ckpt-10, written last), not by step (ckpt-30)."""
    root = tmp_path / "runs"
    run = corpus.copy("tf2", root / "run")
    for step, seconds in ((20, 100), (30, 200), (10, 300)):
        for f in run.glob(f"ckpt-{step}.*"):
            os.utime(f, (1_700_000_000 + seconds, 1_700_000_000 + seconds))
    statefile.write_atomic(run, CheckpointState("ckpt-99", ["ckpt-99"], [1.0]))
    retain = '[watch.retain]\nkeep_last = 2\nmin_age = "0s"\n'
    conf = write_config(tmp_path / "c.toml", root, db=tmp_path / "db", best=False, extra=retain)
    proc = ckptd("run", "--once", config=conf)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in run.glob("*.index")) == ["ckpt-10.index", "ckpt-30.index"]
    state = statefile.read(run)
    assert state is not None and state.model_checkpoint_path == "ckpt-10"
