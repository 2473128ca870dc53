"""Recording real TensorFlow / Keras output (tests/tf_jobs.py in subprocesses): a trainer
restarted from scratch in the same directory (a new incarnation, metrics matched within it),
names written again (replaced versions), Keras epochs matched to TensorBoard's epoch series."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckptd.api.record import Recorder
from ckptd.core.model import COMPLETE, REPLACED, Action, Checkpoint
from ckptd.core.ranking import ranked
from ckptd.core.recording import RunDir
from ckptd.store import migrate, reads
from ckptd.store.audit_reads import actions
from ckptd.store.handle import Store
from tests.conftest import ENV, PY, REPO, ckptd, write_config

pytestmark = [pytest.mark.tf, pytest.mark.slow]

JOBS = str(REPO / "tests" / "tf_jobs.py")
KERAS_TEMPLATE = "model.{epoch:02d}-{val_loss:.2f}.keras"


@dataclass
class Recorded:
    root: Path
    run: Path
    db: Path
    store: Store
    recorder: Recorder
    run_dir: RunDir

    def record(self) -> Any:
        return self.recorder.record(self.run_dir)

    def checkpoints(self) -> list[Checkpoint]:
        return reads.load_checkpoints(self.store)

    def events(self, kind: str) -> list[Action]:
        with self.store.session() as s:
            return actions(s, kinds=[kind])


def _recorded(tmp: Path, keras_template: str | None = None) -> Recorded:
    root = tmp / "runs"
    run = root / "job"
    run.mkdir(parents=True)
    db = tmp / "ckptd.db"
    store = Store.open(f"sqlite:///{db}")
    migrate.upgrade(store.engine)
    return Recorded(root, run, db, store, Recorder(store), RunDir("job", run, root, keras_template))


def _job(*args: str) -> None:
    subprocess.run([PY, JOBS, *args], env=ENV, check=True, timeout=300, capture_output=True)


def _stepped(args: list[str], each: Callable[[str], None]) -> str:
    """Run a job that waits for a line on stdin after each step; ``each`` gets its line.
    Returns the job's last line."""
    proc = subprocess.Popen(
        [PY, JOBS, *args],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    last = ""
    try:
        for line in proc.stdout:
            last = line.strip()
            if last.startswith(("written", "epoch")):
                each(last)
                proc.stdin.write("\n")
                proc.stdin.flush()
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=300) == 0
    return last


def _by(items: list[Checkpoint], state: str) -> dict[int | None, Checkpoint]:
    return {c.step: c for c in items if c.state == state}


# ------------------------------------------------------------------ a restarted trainer


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    """ckpt-1 … ckpt-41 (eval/accuracy = 1000 + step), then the trainer started from scratch in
    the same directory: ckpt-1, ckpt-11 again (2000 + step). Recorded after each."""
    r = _recorded(tmp_path_factory.mktemp("restart"))
    _job("manager", str(r.run), "41", "1000")
    r.record()
    _job("manager", str(r.run), "11", "2000")
    r.record()
    yield r
    r.store.close()


def test_a_restart_from_scratch_starts_a_new_incarnation(restarted: Recorded) -> None:
    items = restarted.checkpoints()
    live, old = _by(items, COMPLETE), _by(items, REPLACED)
    assert {s: c.incarnation for s, c in live.items()} == {1: 2, 11: 2, 21: 1, 31: 1, 41: 1}
    assert {s: c.incarnation for s, c in old.items()} == {1: 1, 11: 1}
    (event,) = restarted.events("new_incarnation")
    assert event.detail == {"incarnation": 2, "step": 1, "after": 41}
    assert "started over" in (event.reason or "")
    assert sorted(e.detail["step"] for e in restarted.events("replaced")) == [1, 11]


def test_metrics_are_matched_within_the_incarnation_that_logged_them(
    restarted: Recorded,
) -> None:
    items = restarted.checkpoints()
    live, old = _by(items, COMPLETE), _by(items, REPLACED)
    acc = {s: c.metrics["eval/accuracy"] for s, c in live.items()}
    assert acc == {1: 2001, 11: 2011, 21: 1021, 31: 1031, 41: 1041}
    # The old versions keep what was theirs (history), never the new trainer's values.
    assert {s: c.metrics["eval/accuracy"] for s, c in old.items()} == {1: 1001, 11: 1011}


def test_recording_a_restarted_run_again_changes_nothing(restarted: Recorded) -> None:
    before = restarted.checkpoints()
    outcome = restarted.record()
    assert not outcome.recorded and not outcome.gone
    assert restarted.checkpoints() == before


def test_a_backfill_of_a_restarted_run_matches_the_newest_event_files(
    restarted: Recorded, tmp_path: Path
) -> None:
    """A first look at a run restarted before ckptd saw it: nothing recorded tells which save
    came first (a copy's times are the copy's), so no incarnation is inferred, and each
    checkpoint takes the newest event file's value at its step."""
    fresh = _recorded(tmp_path)
    fresh.run_dir = RunDir("job", restarted.run, restarted.root)
    fresh.record()
    acc = {c.step: c.metrics["eval/accuracy"] for c in fresh.checkpoints()}
    assert acc == {1: 2001, 11: 2011, 21: 1021, 31: 1031, 41: 1041}
    assert not fresh.events("new_incarnation")
    fresh.store.close()


def test_ls_shows_incarnations_and_replaced_versions(restarted: Recorded) -> None:
    config = write_config(
        restarted.root.parent / "ckptd.toml", restarted.root, db=restarted.db, best=False
    )
    shown = ckptd("ls", "job", "--all", config=config)
    assert shown.returncode == 0, shown.stderr
    lines = [line.split() for line in shown.stdout.splitlines()]
    assert ["job", "1", "↻2", "tf2", "complete"] in [line[:5] for line in lines]
    assert ["job", "1", "tf2", "replaced"] in [line[:4] for line in lines]
    listed = json.loads(ckptd("ls", "job", "--json", config=config).stdout)
    assert {c["step"]: c["incarnation"] for c in listed} == {1: 2, 11: 2, 21: 1, 31: 1, 41: 1}
    events = ckptd("events", "--kind", "new_incarnation", config=config)
    assert "the trainer started over" in events.stdout


# ------------------------------------------------------------------ the same name written again


def test_checkpoint_write_of_the_same_name_records_each_version(tmp_path: Path) -> None:
    r = _recorded(tmp_path)
    ids = []

    def record(_line: str) -> None:
        outcome = r.record()
        assert outcome.recorded == [str(r.run / "weights")]  # a new version, to evaluate
        ids.extend(outcome.new_complete_ids)

    _stepped(["weights", str(r.run), "3"], record)
    items = r.checkpoints()
    assert [c.id for c in items if c.state == COMPLETE] == [ids[-1]]
    assert sorted(c.id for c in items if c.state == REPLACED) == ids[:2]
    assert len(r.events("replaced")) == 2
    assert not r.events("new_incarnation")
    r.store.close()


# ------------------------------------------------------------------ Keras


@pytest.fixture(scope="module")
def keras_fit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Recorded, Any]]:
    """Four epochs of ModelCheckpoint (per epoch, and best.keras with save_best_only) and
    TensorBoard, recorded after each epoch; returns the recorded run and Keras' history."""
    r = _recorded(tmp_path_factory.mktemp("keras"), KERAS_TEMPLATE)
    history = json.loads(_stepped(["keras", str(r.run), "4"], lambda _line: r.record()))
    r.record()  # what TensorBoard flushed at the end
    yield r, history
    r.store.close()


def _epoch_losses(items: list[Checkpoint]) -> dict[int, float | None]:
    return {
        c.step: c.metrics.get("validation/epoch_loss")
        for c in items
        if c.state == COMPLETE and c.step is not None
    }


def test_each_keras_epoch_gets_its_own_epochs_validation_loss(
    keras_fit: tuple[Recorded, Any],
) -> None:
    r, history = keras_fit
    items = r.checkpoints()
    want = {e + 1: loss for e, loss in enumerate(history["val_loss"])}
    assert _epoch_losses(items) == pytest.approx(want)
    best = ranked([c for c in items if c.state == COMPLETE], "validation/epoch_loss", "min")[0]
    low = min(want, key=lambda e: want[e])
    assert best.step == low and best.prefix.endswith(f"model.{low:02d}-{want[low]:.2f}.keras")
    # Iteration-step series stay off epoch checkpoints.
    assert not any("evaluation_loss_vs_iterations" in n for c in items for n in c.metrics)


def test_a_backfill_of_a_keras_run_matches_epochs_too(
    keras_fit: tuple[Recorded, Any], tmp_path: Path
) -> None:
    r, history = keras_fit
    fresh = _recorded(tmp_path, KERAS_TEMPLATE)
    fresh.run_dir = RunDir("job", r.run, r.root, KERAS_TEMPLATE)
    fresh.record()
    want = {e + 1: loss for e, loss in enumerate(history["val_loss"])}
    assert _epoch_losses(fresh.checkpoints()) == pytest.approx(want)
    fresh.store.close()


def test_best_keras_saved_again_is_a_new_version_each_time(
    keras_fit: tuple[Recorded, Any],
) -> None:
    r, history = keras_fit
    losses = history["val_loss"]
    improved = sum(1 for i, v in enumerate(losses) if v < min(losses[:i], default=float("inf")))
    versions = [c for c in r.checkpoints() if c.prefix.endswith("best.keras")]
    assert [c.state for c in versions] == [REPLACED] * (improved - 1) + [COMPLETE]
    assert not r.events("new_incarnation")


def test_an_index_written_between_listing_and_reading_is_not_a_rewrite(
    tmp_path: Path, golden: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen by the cluster fault suite: TF2 writes ``.index`` in place, so the listing saw it
    empty and the read, a moment later, whole. The checkpoint was recorded complete with the
    empty file's signature, then recorded again as "written again under the same name"."""
    from ckptd.io import safeio

    run = golden.copy("tf2", tmp_path / "runs" / "a")
    index = run / "ckpt-30.index"
    whole = index.read_bytes()
    index.write_bytes(b"")  # the trainer has created it and not written it yet
    real_open = safeio.open_regular

    def written_meanwhile(name: str, dir_fd: int) -> Any:
        if name == index.name and not index.stat().st_size:
            index.write_bytes(whole)
        return real_open(name, dir_fd)

    monkeypatch.setattr(safeio, "open_regular", written_meanwhile)
    store = Store.open(f"sqlite:///{tmp_path / 'ckptd.db'}")
    migrate.ensure_store_schema(store)
    recorder = Recorder(store)
    spec = RunDir("a", run, tmp_path / "runs")
    recorder.record(spec)
    recorder.record(spec)  # the file is whole and unchanged since
    with store.session() as s:
        rows = [c for c in reads.checkpoints(s) if c.prefix == str(run / "ckpt-30")]
    assert [c.state for c in rows] == [COMPLETE], [(c.state, c.reason) for c in rows]
    store.close()
