"""Evaluation queue + real worker processes: exactly once, warm, timeouts, crashes, retries."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from ckptd.api.evaluate import Evaluator
from ckptd.config import parse_config
from ckptd.daemon.reconcile import Reconciler
from ckptd.daemon.runs import discover
from ckptd.store import audit_reads, migrate, reads
from ckptd.store import runs as store_runs
from ckptd.store.db import make_engine, session_scope
from ckptd.store.handle import Store
from ckptd.worker.client import WorkerClient
from tests.conftest import Corpus

pytestmark = pytest.mark.tf


def _setup(
    tmp_path: Path, corpus: Corpus, evaluate: dict, kinds=("tf2",)
) -> tuple[Evaluator, object, Path]:
    root = tmp_path / "runs"
    root.mkdir()
    for kind in kinds:
        corpus.copy(kind, root / kind)
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/ckptd.db"},
            "watch": [
                {
                    "path": str(root),
                    "runs": "*",
                    "best": {"metric": "eval/score"},
                    "evaluate": evaluate,
                }
            ],
        }
    )
    engine = make_engine(cfg.daemon.database)
    migrate.upgrade(engine)
    Reconciler(Store(engine)).reconcile_many(discover(0, cfg.watches[0]))
    return Evaluator(Store(engine), cfg, WorkerClient()), engine, root


def _evaluations(engine: object) -> dict[int, tuple[str, int, str | None]]:
    from sqlalchemy import select

    from ckptd.store import tables

    with session_scope(engine) as s:  # type: ignore[arg-type]
        rows = s.execute(
            select(
                tables.checkpoints.c.step,
                tables.evaluations.c.status,
                tables.evaluations.c.attempts,
                tables.evaluations.c.error,
            ).join(
                tables.evaluations, tables.evaluations.c.checkpoint_id == tables.checkpoints.c.id
            )
        ).all()
    return {step: (status, attempts, error) for step, status, attempts, error in rows}


def test_every_checkpoint_evaluated_exactly_once_in_one_warm_worker(
    tmp_path: Path, corpus: Corpus
) -> None:
    ev, engine, root = _setup(
        tmp_path,
        corpus,
        {"evaluator": "python", "function": "tests.daemon_eval_fns:step_score"},
        kinds=("tf2", "tf1"),
    )
    try:
        assert ev.enqueue() == 6
        assert ev.enqueue() == 0  # idempotent: already queued
        outcomes = ev.run_pending()
        assert [o.status for o in outcomes] == ["done"] * 6
        assert ev.run_pending() == []  # nothing evaluated twice
        assert ev.client.started == 1  # one warm worker for all six
        pids = {o.metrics["eval/pid"] for o in outcomes}
        assert len(pids) == 1
    finally:
        ev.close()
    for kind in ("tf1", "tf2"):
        assert sorted((root / kind / ".evaluated").read_text().split()) == ["10", "20", "30"]
    assert {s: v[0] for s, v in _evaluations(engine).items()} == {
        10: "done",
        20: "done",
        30: "done",
    }
    with session_scope(engine) as s:  # type: ignore[arg-type]
        items = reads.checkpoints(s, run_id=store_runs.resolve_run(s, "tf2").id)
    assert {c.step: c.metrics["eval/score"] for c in items} == {10: 0.01, 20: 0.02, 30: 0.03}
    assert all(c.evaluation == "done" for c in items)


def test_hanging_worker_is_killed_at_its_timeout_and_work_goes_on(
    tmp_path: Path, corpus: Corpus
) -> None:
    ev, _engine, _root = _setup(
        tmp_path,
        corpus,
        {
            "evaluator": "python",
            "function": "tests.daemon_eval_fns:hang",
            "timeout": "3s",
            "max_attempts": 1,
        },
    )
    try:
        ev.enqueue()
        (first,) = ev.run_pending(limit=1)
        assert first.status == "failed" and "did not answer within 3 s" in (first.error or "")
        assert ev.client.pid() is None  # the hung worker was killed, not left behind
    finally:
        ev.close()


def test_crashing_worker_fails_one_job_and_the_next_runs(tmp_path: Path, corpus: Corpus) -> None:
    ev, _engine, root = _setup(
        tmp_path,
        corpus,
        {"evaluator": "python", "function": "tests.daemon_eval_fns:crash", "max_attempts": 1},
    )
    try:
        ev.enqueue()
        (first,) = ev.run_pending(limit=1)
        assert first.status == "failed" and "SIGKILL" in (first.error or "")
        # Same queue, now with a working evaluator: the daemon carries on.
        ev.config = parse_config(
            {
                "daemon": {"database": f"sqlite:///{tmp_path}/unused.db"},
                "watch": [
                    {
                        "path": str(root),
                        "runs": "*",
                        "evaluate": {
                            "evaluator": "python",
                            "function": "tests.daemon_eval_fns:step_score",
                        },
                    }
                ],
            }
        )
        rest = ev.run_pending()
        assert [o.status for o in rest] == ["done", "done"]
        assert ev.client.started == 2
    finally:
        ev.close()


def test_errors_are_recorded_retried_with_backoff_then_failed(
    tmp_path: Path, corpus: Corpus
) -> None:
    ev, engine, _root = _setup(
        tmp_path,
        corpus,
        {
            "evaluator": "python",
            "function": "tests.daemon_eval_fns:boom",
            "max_attempts": 2,
            "retry_backoff": "0s",
        },
    )
    try:
        ev.enqueue()
        ev.run_pending()
    finally:
        ev.close()
    evaluations = _evaluations(engine)
    assert {s: (st, n) for s, (st, n, _e) in evaluations.items()} == {
        10: ("failed", 2),
        20: ("failed", 2),
        30: ("failed", 2),
    }
    assert "boom at step 10" in (evaluations[10][2] or "")
    with session_scope(engine) as s:  # type: ignore[arg-type]
        failures = audit_reads.actions(s, kinds=["evaluation_failed"])
    assert len(failures) == 6 and sum(bool(a.detail["final"]) for a in failures) == 3


def test_checkpoint_deleted_before_evaluation_fails_cleanly(tmp_path: Path, corpus: Corpus) -> None:
    ev, _engine, root = _setup(
        tmp_path, corpus, {"evaluator": "python", "function": "tests.daemon_eval_fns:step_score"}
    )
    try:
        ev.enqueue()
        for f in (root / "tf2").glob("ckpt-10.*"):
            f.unlink()
        outcomes = ev.run_pending()
    finally:
        ev.close()
    by = {o.checkpoint: o for o in outcomes}
    assert by["tf2@10"].status == "failed" and "no longer exists" in (by["tf2@10"].error or "")
    assert by["tf2@20"].status == by["tf2@30"].status == "done"


def test_command_evaluator(tmp_path: Path, corpus: Corpus) -> None:
    script = tmp_path / "eval.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            prefix, step = sys.argv[1], int(sys.argv[2])
            print(json.dumps({"eval/score": step / 100, "ok": 1}))
            """
        )
    )
    ev, _engine, _root = _setup(
        tmp_path,
        corpus,
        {
            "evaluator": "command",
            "command": [sys.executable, str(script), "{checkpoint}", "{step}"],
        },
    )
    try:
        ev.enqueue()
        outcomes = ev.run_pending()
    finally:
        ev.close()
    assert sorted(o.metrics["eval/score"] for o in outcomes) == [0.1, 0.2, 0.3]
    assert ev.client.started == 0  # no TensorFlow worker for a command


def test_meta_graph_evaluation_waits_for_the_meta_file(tmp_path: Path, corpus: Corpus) -> None:
    root = tmp_path / "runs"
    (root / "late").mkdir(parents=True)
    for f in corpus.run_dir("tf1").glob("model.ckpt-10.*"):
        if f.suffix != ".meta":
            shutil.copy(f, root / "late")
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/ckptd.db"},
            "watch": [
                {
                    "path": str(root),
                    "runs": "*",
                    "evaluate": {
                        "evaluator": "meta_graph",
                        "data": str(corpus.run_dir("tf1") / "heldout.npz"),
                        "feed": {"x:0": "x", "y_:0": "y"},
                        "fetch": {"eval/accuracy": "accuracy:0"},
                    },
                }
            ],
        }
    )
    engine = make_engine(cfg.daemon.database)
    migrate.upgrade(engine)
    rec = Reconciler(Store(engine))
    rec.reconcile_many(discover(0, cfg.watches[0]))
    ev = Evaluator(Store(engine), cfg, WorkerClient())
    try:
        assert ev.enqueue() == 1
        assert ev.run_pending() == []  # no .meta yet: it waits (and starts no worker)
        assert ev.client.started == 0
        shutil.copy(corpus.run_dir("tf1") / "model.ckpt-10.meta", root / "late")
        rec.reconcile_many(discover(0, cfg.watches[0]))
        (outcome,) = ev.run_pending()
    finally:
        ev.close()
    assert outcome.status == "done", outcome.error
    expected = corpus.saves["tf1"][0]["metrics"]["eval/accuracy"]
    assert outcome.metrics["eval/accuracy"] == pytest.approx(expected, rel=1e-5)
    assert json.dumps(outcome.metrics)
