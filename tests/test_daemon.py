"""The real daemon process, a real TF trainer writing while it watches, restarts, signals."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ENV, PY, REPO, Corpus, ckptd, query, train, wait_for, write_config

pytestmark = pytest.mark.tf


def _complete(db: Path, run: str | None = None) -> dict[int, str]:
    sql = "select c.step, c.prefix from checkpoints c join runs r on r.id = c.run_id where c.state = 'complete'"
    rows = query(db, sql + (" and r.name = ?" if run else ""), *([run] if run else []))
    return dict(rows)


def test_live_training_every_checkpoint_lands_with_step_and_metric(
    tmp_path: Path, daemon_factory
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, rescan="1h")
    d = daemon_factory(conf)
    wait_for(lambda: query(db, "select count(*) from daemons")[0][0] == 1)
    # Two real trainers at once: TF1 Saver (+meta, eval/ summaries) and TF2 CheckpointManager.
    procs = {
        kind: subprocess.Popen(
            [
                PY,
                "-m",
                "ckptd.worker.train",
                kind,
                "--out",
                str(root / kind),
                "--steps",
                "40",
                "--save-every",
                "5",
                "--interval",
                "0.1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=ENV,
            cwd=REPO,
        )
        for kind in ("tf1", "tf2")
    }
    saves = {}
    for kind, p in procs.items():
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0
        saves[kind] = [json.loads(x) for x in out.splitlines() if '"saved"' in x]
    for kind in ("tf1", "tf2"):
        expected = {s["step"]: s for s in saves[kind]}
        assert len(expected) == 8
        got = wait_for(
            lambda k=kind, e=expected: c if len(c := _complete(db, k)) == len(e) else None
        )
        assert sorted(got) == sorted(expected)
        for step, s in expected.items():
            assert got[step] == s["prefix"]
            (value,) = wait_for(
                lambda st=step, k=kind: query(
                    db,
                    "select m.value from metrics m join checkpoints c on c.id = m.checkpoint_id "
                    "join runs r on r.id = c.run_id where r.name = ? and c.step = ? and m.name = 'eval/accuracy'",
                    k,
                    st,
                ),
            )[0]
            assert value == pytest.approx(s["metrics"]["eval/accuracy"], rel=1e-6)
    # The TF1 meta graph arrives after the state file; it must end up recorded.
    meta_sql = "select count(*) from checkpoints c join runs r on r.id=c.run_id where r.name='tf1' and has_meta"
    assert wait_for(lambda: query(db, meta_sql)[0][0] == 8)
    # The WAL is folded into the database by its own job, not by recording commits.
    jobs_sql = "select status from daemons order by id desc limit 1"
    assert wait_for(lambda: "wal-checkpoint" in json.loads(query(db, jobs_sql)[0][0])["jobs"])
    status = ckptd("status", "--json", config=conf)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["daemon"]["alive"] is True
    assert data["counts"]["complete"] == 16
    assert d.stop() == 0
    assert "Traceback" not in d.log()
    data = json.loads(ckptd("status", "--json", config=conf).stdout)
    assert data["daemon"]["alive"] is False and data["daemon"]["stopped_at"]


def test_restart_no_duplicates_and_nothing_missed(
    tmp_path: Path, corpus: Corpus, daemon_factory
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db)
    corpus.copy("tf1", root / "a")
    d = daemon_factory(conf)
    wait_for(lambda: len(_complete(db, "a")) == 3)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL  # crash, not a clean stop
    # While it is down: a new run, a deletion by the trainer.
    corpus.copy("tf2", root / "b")
    for f in (root / "a").glob("model.ckpt-10.*"):
        f.unlink()
    d2 = daemon_factory(conf)
    wait_for(lambda: len(_complete(db, "b")) == 3)
    wait_for(
        lambda: (
            query(db, "select state from checkpoints where prefix like '%/a/model.ckpt-10'")
            == [("gone",)]
        )
    )
    assert query(db, "select count(*), count(distinct prefix) from checkpoints") == [(6, 6)]
    # And it still watches: a checkpoint saved now is recorded.
    train("tf2", root / "c", "--steps", "5", "--save-every", "5")
    wait_for(lambda: list(_complete(db, "c")) == [5])
    assert d2.stop() == 0


def test_run_once_backfills_and_exits(tmp_path: Path, corpus: Corpus) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db)
    corpus.copy("sharded", root / "s")
    result = ckptd("run", "--once", config=conf)
    assert result.returncode == 0, result.stderr
    assert "recorded 2 new checkpoint(s)" in result.stderr
    assert sorted(_complete(db)) == [10, 20]


def test_bad_config_fails_before_start(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[[watch]]\npath = "/x"\nobserver = "fanotify"\n')
    result = ckptd("run", config=conf)
    assert result.returncode == 78
    assert (
        'watch[0].observer: expected one of "auto", "inotify", "polling", got "fanotify"'
        in result.stderr
    )
