"""Exports TF Serving serves as the best (versions that only grow, with what each one is in
``assets.extra/ckptd.json``), TF2 exports with a builder, and failed exports that back off."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ckptd.api.freeze import Freezer
from ckptd.config import Config, WatchConfig, parse_config
from ckptd.core import backoff
from ckptd.core.model import Checkpoint, Run, utcnow
from ckptd.daemon.reconcile import Reconciler
from ckptd.daemon.runs import discover
from ckptd.store import exports, migrate, reads
from ckptd.store import runs as store_runs
from ckptd.store.db import make_engine, session_scope
from ckptd.store.handle import Store
from tests.conftest import ENV, PY, Corpus, ckptd, query, wait_for, write_config

BUILDER = "tests.eval_fns:build_tf2"


@dataclass
class Setup:
    store: Store
    freezer: Freezer
    run: Run
    watch: WatchConfig
    conf: Path
    export: Path

    def checkpoints(self) -> dict[int, Checkpoint]:
        with session_scope(self.store.engine) as s:
            return {c.step: c for c in reads.checkpoints(s, run_id=self.run.id) if c.step}


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def _setup(tmp_path: Path, corpus: Corpus, kind: str, freeze: dict[str, Any]) -> Setup:
    """Run ``kind`` of the corpus recorded, with a Freezer and the config file `ckptd` reads."""
    root = tmp_path / "runs"
    corpus.copy(kind, root / "r")
    export = tmp_path / "export"
    db = tmp_path / "ckptd.db"
    lines = "".join(f"{k} = {_toml(v)}\n" for k, v in freeze.items())
    conf = write_config(
        tmp_path / "c.toml",
        root,
        db=db,
        extra=f'\n[watch.freeze]\nexport_dir = "{export}"\n{lines}',
    )
    cfg: Config = parse_config(
        {
            "daemon": {"database": f"sqlite:///{db}"},
            "watch": [
                {
                    "path": str(root),
                    "runs": "*",
                    "best": {"metric": "eval/accuracy"},
                    "freeze": {"export_dir": str(export), **freeze},
                }
            ],
        }
    )
    engine = make_engine(cfg.daemon.database)
    migrate.upgrade(engine)
    store = Store(engine)
    Reconciler(store).reconcile_many(discover(0, cfg.watches[0]))
    with session_scope(engine) as s:
        run = store_runs.resolve_run(s, "r")
    return Setup(store, Freezer(store), run, cfg.watches[0], conf, export / "r")


@pytest.fixture
def tf1(tmp_path: Path, corpus: Corpus) -> Iterator[Setup]:
    setup = _setup(
        tmp_path,
        corpus,
        "tf1",
        {"format": ["saved_model"], "inputs": {"x": "x:0"}, "outputs": {"y": "y:0"}, "keep": 2},
    )
    yield setup
    setup.freezer.close()


def _make_best(db: Path, best: Checkpoint, every: list[Checkpoint]) -> None:
    """An evaluator's accuracy (it outranks the event files') that makes ``best`` the best."""
    with sqlite3.connect(db) as conn:
        conn.execute("delete from metrics where source = 'evaluator'")
        conn.executemany(
            "insert into metrics (checkpoint_id, name, value, step, source, recorded_at) "
            "values (?, 'eval/accuracy', ?, ?, 'evaluator', ?)",
            [(c.id, 1.0 if c.id == best.id else 0.1, c.step, str(utcnow())) for c in every],
        )


def _serving(export: Path) -> Path:
    """The version TF Serving's default policy serves: the highest numeric directory."""
    return max((p for p in export.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


# What TensorFlow restores from the SavedModel's own variables, compared with each checkpoint.
SAME_VARIABLES = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    saved = tf.train.load_checkpoint(sys.argv[1])
    out = {}
    for prefix in sys.argv[2:]:
        ckpt = tf.train.load_checkpoint(prefix)
        names = [n for n in saved.get_variable_to_shape_map() if ckpt.has_tensor(n)]
        out[prefix] = [len(names), all(
            np.array_equal(saved.get_tensor(n), ckpt.get_tensor(n)) for n in names)]
    print(json.dumps(out))
    """
)


@pytest.mark.tf
@pytest.mark.slow
def test_serving_serves_the_best_after_it_moves_back_to_an_older_step(tf1: Setup) -> None:
    by_step = tf1.checkpoints()
    newest, older = by_step[max(by_step)], by_step[min(by_step)]
    db = tf1.store.engine.url.database
    assert db is not None
    seen = []
    for best in (newest, older, newest, older):
        _make_best(Path(db), best, list(by_step.values()))
        outcome = tf1.freezer.freeze_run(tf1.run, tf1.watch, honour_backoff=True)
        assert outcome.status == "published", outcome.message
        served = _serving(tf1.export)
        assert outcome.path == str(served)
        manifest = json.loads((served / "assets.extra" / "ckptd.json").read_text())
        assert manifest["step"] == best.step and manifest["checkpoint"] == best.prefix
        assert manifest["metric"] == "eval/accuracy" and manifest["value"] == 1.0
        assert manifest["version"] == int(served.name) and manifest["ckptd_version"]
        seen.append(int(served.name))
        again = tf1.freezer.freeze_run(tf1.run, tf1.watch, honour_backoff=True)
        assert (again.status, again.version) == ("unchanged", int(served.name))
    # Every publish takes the next number, also a step whose older version is still there:
    # version = step would have left Serving on the newer, worse export after the best moved
    # back to the older step.
    assert seen == [1, 2, 3, 4]
    # keep = 2: the two highest versions stay (and the best's); v1 is retired.
    assert sorted(int(p.name) for p in tf1.export.iterdir()) == [2, 3, 4]
    assert not [p for p in tf1.export.iterdir() if not p.name.isdigit()]
    # TensorFlow reads the served SavedModel's variables: they are the best checkpoint's.
    proc = subprocess.run(
        [
            PY,
            "-c",
            SAME_VARIABLES,
            str(_serving(tf1.export) / "variables" / "variables"),
            older.prefix,
            newest.prefix,
        ],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
    )
    same = json.loads(proc.stdout.strip().splitlines()[-1])
    assert same[older.prefix][0] > 0 and same[older.prefix][1] is True
    assert same[newest.prefix][1] is False
    # The database says the same: which version serves which step, in ls and best.
    assert query(
        Path(db), "select version, step, metric, metric_value from exports order by version"
    ) == [
        (1, newest.step, "eval/accuracy", 1.0),
        (2, older.step, "eval/accuracy", 1.0),
        (3, newest.step, "eval/accuracy", 1.0),
        (4, older.step, "eval/accuracy", 1.0),
    ]
    listed = json.loads(ckptd("ls", "r", "--json", config=tf1.conf).stdout)
    versions = {c["step"]: (c["export_version"], c["serving"]) for c in listed if c["exported"]}
    assert versions == {older.step: (4, True), newest.step: (3, False)}
    text = ckptd("ls", "r", config=tf1.conf).stdout
    assert "exported v4 (serving)" in text and "exported v3" in text
    top = ckptd("best", "r", config=tf1.conf).stdout
    assert "v4 (serving)" in top
    # A higher version put there by hand is what Serving would serve: the best goes above it.
    (tf1.export / "99").mkdir()
    outcome = tf1.freezer.freeze_run(tf1.run, tf1.watch, honour_backoff=True)
    assert (outcome.status, outcome.version) == ("published", 100)
    assert (tf1.export / "99").is_dir()  # not ckptd's: never removed


@pytest.mark.tf
@pytest.mark.slow
def test_tf2_export_with_a_builder_is_verified_and_published(
    tmp_path: Path, corpus: Corpus
) -> None:
    setup = _setup(tmp_path, corpus, "tf2", {"builder": BUILDER})
    try:
        outcome = setup.freezer.freeze_run(setup.run, setup.watch)
    finally:
        setup.freezer.close()
    # Before, verify was sent without the builder: "verify: missing field 'builder'".
    assert outcome.status == "published" and outcome.verified, outcome.message
    published = Path(str(outcome.path))
    assert published == setup.export / "1" and (published / "saved_model.pb").is_file()
    manifest = json.loads((published / "assets.extra" / "ckptd.json").read_text())
    best = max(corpus.saves["tf2"], key=lambda s: (s["metrics"]["eval/accuracy"], s["step"]))
    assert manifest["step"] == best["step"]


@pytest.mark.tf
@pytest.mark.slow
def test_a_failing_export_backs_off_and_status_says_until_when(
    tmp_path: Path, corpus: Corpus
) -> None:
    broken = "tests.eval_fns:no_such_builder"
    setup = _setup(
        tmp_path,
        corpus,
        "tf2",
        {"builder": broken, "retry_backoff": "1h", "max_attempts": 2},
    )
    run, watch = setup.run, setup.watch
    try:
        first = setup.freezer.freeze_run(run, watch, honour_backoff=True)
        assert first.status == "failed"
        waiting = setup.freezer.freeze_run(run, watch, honour_backoff=True)
        assert waiting.status == "skipped" and "next attempt at" in waiting.message
        status = json.loads(ckptd("status", "--json", config=setup.conf).stdout)
        (retry,) = status["export_retries"]
        assert retry["attempt"] == 1 and retry["run"] == "r"
        wait = (
            datetime.fromisoformat(retry["next_attempt_at"]).replace(tzinfo=None)
            - utcnow().replace(tzinfo=None)
        ).total_seconds()
        assert 3500 < wait <= 3600
        assert "next attempt at" in ckptd("status", config=setup.conf).stdout
        # Asked by hand (`ckptd freeze`), it is tried at once: the last attempt.
        assert setup.freezer.freeze_run(run, watch).status == "failed"
        gave_up = setup.freezer.freeze_run(run, watch, honour_backoff=True)
        assert gave_up.status == "skipped" and "ckptd freeze" in gave_up.message
    finally:
        setup.freezer.close()
    status = json.loads(ckptd("status", "--json", config=setup.conf).stdout)
    (retry,) = status["export_retries"]
    assert retry["attempt"] == 2 and retry["next_attempt_at"] is None
    assert "gave up" in ckptd("status", config=setup.conf).stdout
    events = json.loads(ckptd("events", "--json", config=setup.conf).stdout)
    failed = [e for e in events if e["kind"] == "export_failed"]
    assert sorted((e["detail"]["attempt"], e["detail"]["final"]) for e in failed) == [
        (1, False),
        (2, True),
    ]


@pytest.mark.tf
@pytest.mark.slow
def test_the_daemon_does_not_retry_a_failing_export_every_interval(
    tmp_path: Path, corpus: Corpus, daemon_factory: Any
) -> None:
    """Before: `every = "1s"` and a broken export made an export_failed event a second."""
    root = tmp_path / "runs"
    corpus.copy("tf2", root / "r")
    db = tmp_path / "ckptd.db"
    conf = write_config(
        tmp_path / "c.toml",
        root,
        db=db,
        extra=textwrap.dedent(
            f"""
            [watch.freeze]
            export_dir = "{tmp_path / "export"}"
            builder = "tests.eval_fns:no_such_builder"
            every = "1s"
            retry_backoff = "1h"
            """
        ),
    )
    d = daemon_factory(conf)
    failures = "select count(*) from actions where kind = 'export_failed'"
    wait_for(lambda: query(db, failures)[0][0] >= 1, timeout=120)
    time.sleep(5)  # five more runs of the freeze job
    assert query(db, failures)[0][0] == 1
    assert d.stop() == 0


# ------------------------------------------------------------------ without TensorFlow


def test_backoff_doubles_and_gives_up_after_the_last_attempt() -> None:
    now = utcnow()
    base = timedelta(seconds=30)
    assert backoff.retry_at(1, 3, base, now) == now + base
    assert backoff.retry_at(2, 3, base, now) == now + 2 * base
    assert backoff.retry_at(3, 3, base, now) is None
    assert backoff.retry_at(1, 3, base, now, hopeless=True) is None
    assert backoff.retry_at(99, 100, timedelta(days=1), now) == now + backoff.MAX_DELAY


@pytest.mark.slow
def test_versions_continue_above_step_named_exports_and_directories(
    tmp_path: Path, golden: Corpus
) -> None:
    """Exports made when the version was the step keep their directories; new versions are
    numbered above them, and above any numeric directory found there."""
    setup = _setup(tmp_path, golden, "tf1", {"inputs": {"x": "x:0"}, "outputs": {"y": "y:0"}})
    setup.freezer.close()
    c = min(setup.checkpoints().values(), key=lambda c: c.step or 0)
    root = str(setup.export)
    db = Path(str(setup.store.engine.url.database))
    with sqlite3.connect(db) as conn:
        conn.execute(
            "insert into exports (checkpoint_id, format, version, path, status, verified, "
            "created_at, step) values (?, 'saved_model', 30, ?, 'published', 1, ?, 30)",
            (c.id, f"{root}/30", str(utcnow())),
        )
    kw: dict[str, Any] = {"formats": "saved_model", "metric": None, "metric_value": None}
    _id, version, attempt = exports.begin(setup.store, c, root=root, on_disk=0, **kw)
    assert (version, attempt) == (31, 1)
    _id, version, _ = exports.begin(setup.store, c, root=root, on_disk=40, **kw)
    assert version == 41
    # Another run's root (a name that LIKE would match: "_") does not count.
    _id, version, _ = exports.begin(setup.store, c, root=root[:-1] + "_x", on_disk=0, **kw)
    assert version == 1


@pytest.mark.slow
def test_ls_marks_the_version_serving_even_when_its_checkpoint_is_not_listed(
    tmp_path: Path, golden: Corpus
) -> None:
    setup = _setup(tmp_path, golden, "tf1", {"inputs": {"x": "x:0"}, "outputs": {"y": "y:0"}})
    setup.freezer.close()
    by_step = setup.checkpoints()
    first, second = by_step[min(by_step)], by_step[max(by_step)]
    db = Path(str(setup.store.engine.url.database))
    root = str(setup.export)
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "insert into exports (checkpoint_id, format, version, path, status, verified, "
            "created_at, step) values (?, 'saved_model', ?, ?, 'published', 1, ?, ?)",
            [(c.id, v, f"{root}/{v}", str(utcnow()), c.step) for v, c in ((1, first), (2, second))],
        )
    listed = json.loads(ckptd("ls", "r", "--json", config=setup.conf).stdout)
    versions = {c["step"]: (c["export_version"], c["serving"]) for c in listed if c["exported"]}
    assert versions == {first.step: (1, False), second.step: (2, True)}
    # The served checkpoint is pruned (its export stays): the older one still is not served.
    with sqlite3.connect(db) as conn:
        conn.execute("update checkpoints set state = 'pruned' where id = ?", (second.id,))
    text = ckptd("ls", "r", config=setup.conf).stdout
    assert "exported v1" in text and "(serving)" not in text
