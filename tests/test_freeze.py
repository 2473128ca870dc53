"""Exporting the best: verified, atomic, kept to `keep`, and redone after a crash mid-export."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from ckptd.api.freeze import TMP_PREFIX, Freezer
from ckptd.config import parse_config
from ckptd.daemon.reconcile import Reconciler
from ckptd.daemon.runs import discover
from ckptd.store import audit_reads, migrate, reads
from ckptd.store import runs as store_runs
from ckptd.store.db import make_engine, session_scope
from ckptd.store.handle import Store
from tests.conftest import Corpus, ckptd, query, wait_for, write_config

pytestmark = pytest.mark.tf

FREEZE = """
[watch.freeze]
format = ["saved_model", "frozen_graph"]
export_dir = "{export}"
inputs = {{ "x" = "x:0" }}
outputs = {{ "y" = "y:0" }}
every = "{every}"
keep = {keep}
"""


def _best_step(corpus: Corpus) -> int:
    return int(
        max(corpus.saves["tf1"], key=lambda s: (s["metrics"]["eval/accuracy"], s["step"]))["step"]
    )


def test_freeze_best_publishes_verified_export_once(tmp_path: Path, corpus: Corpus) -> None:
    root = tmp_path / "runs"
    corpus.copy("tf1", root / "mnist")
    export = tmp_path / "export"
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/ckptd.db"},
            "watch": [
                {
                    "path": str(root),
                    "runs": "*",
                    "best": {"metric": "eval/accuracy"},
                    "freeze": {
                        "format": ["saved_model", "frozen_graph"],
                        "export_dir": str(export),
                        "inputs": {"x": "x:0"},
                        "outputs": {"y": "y:0"},
                        "keep": 1,
                    },
                }
            ],
        }
    )
    engine = make_engine(cfg.daemon.database)
    migrate.upgrade(engine)
    Reconciler(Store(engine)).reconcile_many(discover(0, cfg.watches[0]))
    freezer = Freezer(Store(engine))
    try:
        with session_scope(engine) as s:
            run = store_runs.resolve_run(s, "mnist")
        outcome = freezer.freeze_run(run, cfg.watches[0])
        best = _best_step(corpus)
        assert outcome.status == "published", outcome.message
        # The first publish is version 1 (not the step): Serving serves the highest version.
        assert outcome.path == str(export / "mnist" / "1") and outcome.verified
        assert outcome.version == 1
        version = Path(outcome.path)
        assert (version / "saved_model.pb").exists() and (version / "frozen.pb").exists()
        assert (version / "variables").is_dir()
        assert not [p for p in (export / "mnist").iterdir() if p.name.startswith(".")]
        again = freezer.freeze_run(run, cfg.watches[0])
        assert again.status == "unchanged"
        # Two more on demand with keep = 1: the newest stays, the best's is never removed,
        # the one in between goes.
        with session_scope(engine) as s:
            others = [c for c in reads.checkpoints(s, run_id=run.id) if c.step != best]
        for other in others:
            assert freezer.freeze_run(run, cfg.watches[0], other).status == "published"
    finally:
        freezer.close()
    with session_scope(engine) as s:
        kinds = [a.kind for a in audit_reads.actions(s)]
    assert kinds.count("exported") == 3 and kinds.count("export_removed") == 1
    assert sorted(p.name for p in (export / "mnist").iterdir()) == sorted(
        ["1", str(1 + len(others))]
    )


def test_daemon_killed_during_export_leaves_no_numeric_dir_and_redoes_it(
    tmp_path: Path, corpus: Corpus, daemon_factory
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    export = tmp_path / "export"
    db = tmp_path / "ckptd.db"
    conf = write_config(
        tmp_path / "c.toml", root, db=db, extra=FREEZE.format(export=export, every="1h", keep=2)
    )
    corpus.copy("tf1", root / "mnist")
    d = daemon_factory(conf)
    run_export = export / "mnist"

    def temp_dir_exists() -> bool:
        return run_export.is_dir() and any(
            p.name.startswith(TMP_PREFIX) for p in run_export.iterdir()
        )

    deadline = time.monotonic() + 120
    while not temp_dir_exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert temp_dir_exists(), "the export never started"
    d.stop(signal.SIGKILL)
    numeric = [p for p in run_export.iterdir() if p.name.isdigit()]
    assert numeric == [], f"a crash mid-export published {numeric}"
    assert query(db, "select status from exports") == [("exporting",)]
    d2 = daemon_factory(conf)
    best = _best_step(corpus)
    # The interrupted export never appeared: the redone one is version 1.
    wait_for(lambda: (run_export / "1" / "saved_model.pb").exists(), timeout=120)
    wait_for(lambda: ("published",) in query(db, "select status from exports"), timeout=30)
    assert not [p for p in run_export.iterdir() if p.name.startswith(TMP_PREFIX)]
    statuses = sorted(query(db, "select status, error from exports"))
    assert statuses[0][0] == "failed" and "interrupted" in statuses[0][1]
    assert d2.stop() == 0
    listing = json.loads(ckptd("ls", "mnist", "--json", config=conf).stdout)
    assert [c["step"] for c in listing if c["exported"]] == [best]
    assert [(c["export_version"], c["serving"]) for c in listing if c["exported"]] == [(1, True)]
