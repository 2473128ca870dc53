"""Pruning real checkpoints on disk: safe deletion, crash-resume, and TensorFlow still works after."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from ckptd.api import prune
from ckptd.config import load_config
from ckptd.io import fsops, safeio, statefile
from ckptd.store import audit_reads, pruning
from ckptd.store import runs as store_runs
from ckptd.store.db import make_engine, session_scope
from ckptd.store.handle import Store
from tests.conftest import ENV, PY, Corpus, ckptd, query, write_config

RETAIN = """
[watch.retain]
keep_last = {keep_last}
min_age = "0s"
every = "1h"
"""


def _setup(
    tmp_path: Path, corpus: Corpus, kinds: tuple[str, ...], keep_last: int = 1, best: bool = False
) -> tuple[Path, Path, Path]:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(
        tmp_path / "c.toml", root, db=db, extra=RETAIN.format(keep_last=keep_last), best=best
    )
    for kind in kinds:
        corpus.copy(kind, root / kind)
    return root, db, conf


def _record_then_allow_pruning(conf: Path) -> None:
    """``run --once`` under ``dry_run = true`` (records, deletes nothing); then dry_run off."""
    conf.write_text(conf.read_text().replace('every = "1h"', 'every = "1h"\ndry_run = true'))
    assert ckptd("run", "--once", config=conf).returncode == 0
    conf.write_text(conf.read_text().replace("dry_run = true", "dry_run = false"))


def _states(db: Path) -> dict[str, str]:
    return dict(query(db, "select prefix, state from checkpoints"))


TF_STILL_WORKS = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    tf1_dir, tf2_dir = sys.argv[1], sys.argv[2]
    out = {}
    # TF1: latest_checkpoint + Saver.restore through the meta graph, as the classic eval does.
    latest = tf.train.latest_checkpoint(tf1_dir)
    g = tf.Graph()
    with g.as_default(), tf.compat.v1.Session() as sess:
        saver = tf.compat.v1.train.import_meta_graph(latest + ".meta")
        saver.restore(sess, latest)
        out["tf1_latest"] = latest
    # TF2: a restarted CheckpointManager sees exactly what exists and restores the latest.
    v = tf.Variable(0.0)
    mgr = tf.train.CheckpointManager(tf.train.Checkpoint(), tf2_dir, max_to_keep=10)
    out["tf2_checkpoints"] = list(mgr.checkpoints)
    out["tf2_latest"] = mgr.latest_checkpoint
    reader = tf.train.load_checkpoint(mgr.latest_checkpoint)
    out["tf2_vars"] = len(reader.get_variable_to_shape_map())
    print(json.dumps(out))
    """
)


@pytest.mark.tf
def test_prune_keeps_tensorflow_working(tmp_path: Path, corpus: Corpus) -> None:
    root, db, conf = _setup(tmp_path, corpus, ("tf1", "tf2"))
    dry = ckptd("prune", "--dry-run", "--json", config=conf)
    assert dry.returncode == 1 and "no database" in dry.stderr  # nothing recorded yet
    assert ckptd("run", "--once", config=conf).returncode == 0
    states = _states(db)
    for kind, prefix in (("tf1", "model.ckpt"), ("tf2", "ckpt")):
        assert states[f"{root}/{kind}/{prefix}-30"] == "complete"
        assert states[f"{root}/{kind}/{prefix}-10"] == "pruned"
        assert not list((root / kind).glob(f"{prefix}-10.*")) and not list(
            (root / kind).glob(f"{prefix}-20.*")
        )
        assert len(list((root / kind).glob(f"{prefix}-30.*"))) >= 2
    tf2_state = statefile.read(root / "tf2")
    assert tf2_state is not None and tf2_state.all_model_checkpoint_paths == ["ckpt-30"]
    assert len(tf2_state.all_model_checkpoint_timestamps) == 1  # TF2's timestamps stay aligned
    proc = subprocess.run(
        [PY, "-c", TF_STILL_WORKS, str(root / "tf1"), str(root / "tf2")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tf1_latest"] == f"{root}/tf1/model.ckpt-30"
    assert (
        out["tf2_checkpoints"] == [f"{root}/tf2/ckpt-30"]
        and out["tf2_latest"] == f"{root}/tf2/ckpt-30"
    )
    assert out["tf2_vars"] > 0
    events = json.loads(ckptd("events", "--kind", "pruned", "--json", config=conf).stdout)
    assert len(events) == 4 and all(e["reason"] == "not kept by keep_last=1" for e in events)


@pytest.mark.slow
def test_dry_run_plans_with_reasons_and_deletes_nothing(tmp_path: Path, corpus: Corpus) -> None:
    root, db, conf = _setup(tmp_path, corpus, ("tf2",), keep_last=1, best=True)
    conf.write_text(conf.read_text().replace('every = "1h"', 'every = "1h"\ndry_run = true'))
    assert ckptd("run", "--once", config=conf).returncode == 0  # dry_run config: logs only
    assert set(_states(db).values()) == {"complete"}
    result = ckptd("prune", "tf2", "--dry-run", "--json", config=conf)
    assert result.returncode == 0, result.stderr
    (plan,) = json.loads(result.stdout)
    actions = {row["step"]: (row["action"], row["reasons"]) for row in plan["plan"]}
    assert actions[30][0] == "keep" and actions[30][1][:2] == ["newest", "last"]
    best = max(corpus.saves["tf2"], key=lambda s: (s["metrics"]["eval/accuracy"], s["step"]))[
        "step"
    ]
    assert "best" in actions[best][1]  # [watch.best] is configured: the best is always kept
    for step in (10, 20):
        assert actions[step] == (("keep", ["best"]) if step == best else ("delete", []))
    assert len(list((root / "tf2").glob("ckpt-*.index"))) == 3
    human = ckptd("prune", "--dry-run", config=conf)
    assert (
        f"would delete {2 if best == 30 else 1}" in human.stdout
        and "not kept by any rule" in human.stdout
    )


@pytest.mark.slow
def test_pin_protects_and_unpin_releases(tmp_path: Path, corpus: Corpus) -> None:
    root, db, conf = _setup(tmp_path, corpus, ("tf2",), best=True)
    _record_then_allow_pruning(conf)
    assert ckptd("pin", "tf2@10", "--reason", "paper", config=conf).returncode == 0
    result = ckptd("prune", "tf2", config=conf)
    assert result.returncode == 0, result.stderr
    best = max(corpus.saves["tf2"], key=lambda s: (s["metrics"]["eval/accuracy"], s["step"]))[
        "step"
    ]
    states = _states(db)
    assert states[f"{root}/tf2/ckpt-10"] == "complete"
    assert states[f"{root}/tf2/ckpt-20"] == ("complete" if best == 20 else "pruned")
    assert ckptd("unpin", "tf2@10", config=conf).returncode == 0
    assert ckptd("prune", "tf2", config=conf).returncode == 0
    assert _states(db)[f"{root}/tf2/ckpt-10"] == ("complete" if best == 10 else "pruned")
    kinds = [e["kind"] for e in json.loads(ckptd("events", "--json", config=conf).stdout)]
    assert kinds.count("pinned") == 1 and kinds.count("unpinned") == 1


@pytest.mark.slow
def test_symlink_never_followed_and_unrecorded_files_survive(
    tmp_path: Path, corpus: Corpus
) -> None:
    root, db, conf = _setup(tmp_path, corpus, ("tf2",))
    _record_then_allow_pruning(conf)  # recorded, nothing deleted yet
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"do not delete me")
    data = root / "tf2" / "ckpt-10.data-00000-of-00001"
    data.unlink()
    data.symlink_to(outside)  # planted after recording: a checkpoint file pointing outside
    (root / "tf2" / "ckpt-20.index.bak").write_bytes(b"not ckptd's")  # never recorded
    (root / "tf2" / "ckpt-20.data-00000-of-00001").unlink()  # the trainer got there first
    result = ckptd("prune", "tf2", config=conf)
    assert result.returncode == 0, result.stderr
    assert outside.read_bytes() == b"do not delete me"
    assert not data.is_symlink()  # the link itself went with its checkpoint, not its target
    assert (root / "tf2" / "ckpt-20.index.bak").exists()
    assert (root / "tf2" / "ckpt-30.index").exists()
    states = _states(db)
    assert states[f"{root}/tf2/ckpt-10"] == states[f"{root}/tf2/ckpt-20"] == "pruned"
    missing = json.loads(ckptd("events", "--kind", "pruned", "--json", config=conf).stdout)
    assert any(e["detail"]["already_missing"] == ["ckpt-20.data-00000-of-00001"] for e in missing)


def test_symlink_present_at_scan_is_corrupt_and_never_pruned(
    tmp_path: Path, corpus: Corpus
) -> None:
    root, db, conf = _setup(tmp_path, corpus, ("tf2",))
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"do not delete me")
    data = root / "tf2" / "ckpt-10.data-00000-of-00001"
    data.unlink()
    data.symlink_to(outside)
    assert ckptd("run", "--once", config=conf).returncode == 0
    assert _states(db)[f"{root}/tf2/ckpt-10"] == "corrupt"
    assert data.is_symlink() and outside.read_bytes() == b"do not delete me"


def test_fsops_refuses_paths_through_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.index").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.index").write_bytes(b"keep")
    (root / "link").symlink_to(elsewhere)
    bad = fsops.remove_files(root, root / "link", ["a.index"])
    assert not bad.ok and "symlink" in bad.errors[0]
    assert (elsewhere / "a.index").exists()
    assert not fsops.remove_files(root, tmp_path / "elsewhere", ["a.index"]).ok  # outside the root
    assert not fsops.remove_files(root, root / "real", ["../real/a.index"]).ok
    ok = fsops.remove_files(root, root / "real", ["a.index", "missing.index"])
    assert ok.ok and ok.removed == ["a.index"] and ok.missing == ["missing.index"]


def _many_checkpoints(src: Path, run: Path, n: int) -> None:
    """n real checkpoints, hard-linked from one real TF2 checkpoint, with a TF2 state file.
    They all hold that checkpoint's step: record them with a config through :func:`_by_name`."""
    run.mkdir(parents=True)
    files = [f for f in src.iterdir() if f.name.startswith("ckpt-10.")]
    base = time.time() - 3600
    for step in range(1, n + 1):
        for f in files:
            os.link(f, run / f.name.replace("ckpt-10.", f"ckpt-{step}."))
    state = statefile.CheckpointState(
        f"ckpt-{n}", [f"ckpt-{s}" for s in range(1, n + 1)], [base + s for s in range(1, n + 1)]
    )
    statefile.write_atomic(run, state)


def _by_name(conf: Path) -> Path:
    """``conf`` with the watch's step read from a variable no checkpoint has: each of the
    copies of :func:`_many_checkpoints` is then at the step its file name says."""
    text = conf.read_text()
    conf.write_text(
        text.replace("keras_template =", 'step_variable = "no_such_step"\nkeras_template =')
    )
    return conf


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_sigkill_during_prune_then_restart_loses_nothing(tmp_path: Path, corpus: Corpus) -> None:
    root = tmp_path / "runs"
    db = tmp_path / "ckptd.db"
    _many_checkpoints(corpus.run_dir("tf2"), root / "big", 500)

    def config(keep_last: int, dry_run: bool) -> Path:
        extra = RETAIN.format(keep_last=keep_last) + ("dry_run = true\n" if dry_run else "")
        return _by_name(write_config(tmp_path / "c.toml", root, db=db, extra=extra, best=False))

    conf = config(500, dry_run=True)
    assert ckptd("run", "--once", config=conf).returncode == 0
    assert len(_states(db)) == 500
    rng = random.Random(1234)
    kills = 0
    for keep_last in (400, 300, 200, 100, 50):
        conf = config(keep_last, dry_run=False)
        proc = subprocess.Popen(
            [PY, "-m", "ckptd", "--config", str(conf), "prune", "big"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Kill it mid-work: once its intent ("pruning") is committed, after a random extra delay
        # that lands anywhere in the deletion phase (or, sometimes, after it).
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if query(db, "select count(*) from checkpoints where state = 'pruning'")[0][0]:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # Restart: the daemon's start-up resumes any interrupted deletion (dry_run: it adds none).
        conf = config(keep_last, dry_run=True)
        assert ckptd("run", "--once", config=conf).returncode == 0
        _check_consistent(root / "big", db, keep_newest=keep_last)
    assert kills >= 3, "the test rarely interrupted a prune; adjust its timing"
    events = _pruned_events(conf)
    assert sum("resumed after restart" in (e["reason"] or "") for e in events) > 0, (
        "no interrupted deletion was resumed"
    )
    # Every deletion is listed once, whether resumed or not.
    pruned = {p for p, st in _states(db).items() if st == "pruned"}
    assert sorted(e["subject"] for e in events) == sorted(pruned)


def _pruned_events(conf: Path, *args: str) -> list[dict[str, Any]]:
    """``ckptd events --kind pruned --json``: what users see of the deletions."""
    proc = ckptd("events", "--kind", "pruned", "--json", "--limit", "100000", *args, config=conf)
    assert proc.returncode == 0, proc.stderr
    events: list[dict[str, Any]] = json.loads(proc.stdout)
    return events


def _check_consistent(run: Path, db: Path, keep_newest: int) -> None:
    rows = query(db, "select prefix, step, state, files from checkpoints")
    on_disk = {f.name for f in run.iterdir()}
    for prefix, _step, state, files in rows:
        files = json.loads(files)
        present = [f for f in files if f in on_disk]
        assert state in ("complete", "pruned"), (prefix, state)
        if state == "complete":
            assert present == files, (
                f"{prefix} is recorded complete but lost {set(files) - set(present)}"
            )
        else:
            assert present == [], f"{prefix} is recorded pruned but {present} remain"
    complete = sorted(step for _, step, state, _ in rows if state == "complete")
    assert complete[-keep_newest:] == list(range(501 - keep_newest, 501)), (
        "a checkpoint the plan kept is missing"
    )
    state = statefile.read(run)
    assert state is not None
    listed = [state.resolve(run, p) for p in state.all_model_checkpoint_paths]
    assert all(p.with_name(p.name + ".index").exists() for p in listed), (
        "the state file names a deleted checkpoint"
    )
    assert len(state.all_model_checkpoint_timestamps) == len(listed)
    assert state.resolve(run, state.model_checkpoint_path) == run / "ckpt-500"


# ------------------------------------------------------------------ batching across runs


def _assert_only(run: Path, name: str) -> None:
    """``run`` holds just checkpoint ``name`` (TF2: .index + one shard) and a state file that
    lists only it, with its timestamp."""
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint",
        f"{name}.data-00000-of-00001",
        f"{name}.index",
    ]
    state = statefile.read(run)
    assert state is not None and state.all_model_checkpoint_paths == [name]
    assert state.model_checkpoint_path == name
    assert len(state.all_model_checkpoint_timestamps) == 1


def _recorded_runs(
    tmp_path: Path, corpus: Corpus, n_runs: int, per_run: int, keep_last: int
) -> tuple[Path, Path, Any, Any]:
    """``n_runs`` runs of ``per_run`` real checkpoints, recorded (nothing deleted yet); the
    root, the database, the parsed config (with ``keep_last``) and an engine on the database."""
    root = tmp_path / "runs"
    for r in range(n_runs):
        _many_checkpoints(corpus.run_dir("tf2"), root / f"run-{r}", per_run)
    db = tmp_path / "ckptd.db"
    conf = write_config(
        tmp_path / "c.toml",
        root,
        db=db,
        extra=RETAIN.format(keep_last=keep_last) + "dry_run = true\n",
        best=False,
    )
    assert ckptd("run", "--once", config=_by_name(conf)).returncode == 0
    conf.write_text(conf.read_text().replace("dry_run = true", "dry_run = false"))
    cfg = load_config(conf)
    return root, db, cfg, make_engine(cfg.daemon.database)


def _runs_and_watches(engine: Any, cfg: Any) -> list[tuple[Any, Any]]:
    with session_scope(engine) as s:
        runs = store_runs.runs(s)
    return [(r, cfg.watches[0]) for r in runs]


@pytest.mark.parametrize("batch", [20_000, 25])
def test_prune_runs_batches_every_phase_across_runs(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    root, db, cfg, engine = _recorded_runs(tmp_path, corpus, n_runs=4, per_run=12, keep_last=2)
    monkeypatch.setattr(pruning, "CHUNK", 5)  # several IN (...) chunks per phase
    monkeypatch.setattr(pruning, "BATCH", batch)  # 25: pruned as two groups of two runs
    # The state each phase commits, as the store is asked to: the intent, then the results.
    seen: list[dict[int, str]] = []
    mark_pruning, record_results = pruning.mark_pruning, pruning.record_results

    def intent(store: Store, wanted: dict[str, list[int]], *args: Any) -> set[int]:
        marked = mark_pruning(store, wanted, *args)
        seen.append(dict.fromkeys(marked, "pruning"))
        return marked

    def results(store: Store, done: dict[str, list[int]], *args: Any) -> set[int]:
        seen.append({cid: "pruned" for ids in done.values() for cid in ids})
        return record_results(store, done, *args)

    monkeypatch.setattr(pruning, "mark_pruning", intent)
    monkeypatch.setattr(pruning, "record_results", results)
    store = Store(engine)
    items = _runs_and_watches(engine, cfg)
    dry = prune.prune(store, items, dry_run=True)
    assert [len(r.plan.delete) for r in dry] == [10] * 4 and all(r.dry_run for r in dry)
    assert set(_states(db).values()) == {"complete"} and not seen  # a dry run deletes nothing
    done = prune.prune(store, [*items, items[0]])  # a run listed twice is pruned once
    assert [len(r.pruned) for r in done[:4]] == [10] * 4 and done[4] is done[0]
    # Every file here is a hard link of one source checkpoint: unlinking them frees no space.
    assert all(not r.failed and r.bytes_freed == 0 for r in done)
    rows = query(db, "select prefix, step, state, reason from checkpoints")
    assert len(rows) == 48
    for prefix, step, state, reason in rows:
        if step > 10:
            assert state == "complete", prefix
        else:
            assert (state, reason) == ("pruned", "not kept by keep_last=2"), prefix
    # One audit row per run, listing its deletions; events show each deletion.
    assert query(db, "select count(*) from actions where kind = 'pruned'") == [(4,)]
    with session_scope(engine) as s:
        audit = [
            (e.subject, e.detail) for e in audit_reads.actions(s, limit=1000, kinds=["pruned"])
        ]
    assert sorted(s for s, _ in audit) == sorted(p for p, _, st, _ in rows if st == "pruned")
    for subject, d in audit:
        assert isinstance(subject, str) and isinstance(d["files"], list)
        name = Path(subject).name
        assert sorted(d["files"]) == [f"{name}.data-00000-of-00001", f"{name}.index"]
        assert d["already_missing"] == [] and d["bytes"] == 0  # hard links: nothing freed
    groups = 1 if batch > 40 else 2  # each group: its intent, then its result
    assert [set(s.values()) for s in seen] == [{"pruning"}, {"pruned"}] * groups
    assert [len(s) for s in seen] == [40 // groups] * 2 * groups
    for r in range(4):
        run = root / f"run-{r}"
        assert {p.name for p in run.iterdir()} == {
            "checkpoint",
            *(f"ckpt-{s}.{ext}" for s in (11, 12) for ext in ("index", "data-00000-of-00001")),
        }
        state = statefile.read(run)
        assert state is not None and state.all_model_checkpoint_paths == ["ckpt-11", "ckpt-12"]
        assert len(state.all_model_checkpoint_timestamps) == 2
        assert state.model_checkpoint_path == "ckpt-12"
    again = prune.prune(store, items)  # nothing left to delete: no rows, no writes
    assert all(not r.pruned and not r.plan.delete for r in again)
    with session_scope(engine) as s:
        assert len(audit_reads.actions(s, limit=1000, kinds=["pruned"])) == 40
    engine.dispose()


def test_prune_runs_interrupted_mid_batch_is_resumed(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, db, cfg, engine = _recorded_runs(tmp_path, corpus, n_runs=3, per_run=6, keep_last=1)
    real = fsops.remove_groups
    calls: list[str] = []

    class Crash(BaseException):
        pass

    def crash_on_second_run(root_: Any, directory: Any, groups: list[list[str]]) -> Any:
        calls.append(str(directory))
        if str(directory).endswith("run-1"):
            raise Crash  # as a SIGKILL would, after other runs' files went
        return real(root_, directory, groups)

    monkeypatch.setattr(fsops, "remove_groups", crash_on_second_run)
    with pytest.raises(Crash):
        prune.prune(Store(engine), _runs_and_watches(engine, cfg))
    # Intent was committed for every run before any file went; no result was committed.
    states = query(db, "select step, state from checkpoints")
    assert sorted(st for step, st in states if step < 6) == ["pruning"] * 15
    assert not query(db, "select id from actions where kind = 'pruned'")
    # Run directories are cleaned in parallel: the others' files went, run-1's did not.
    assert len(calls) == 3
    assert not list((root / "run-0").glob("ckpt-1.*"))
    assert not list((root / "run-2").glob("ckpt-1.*"))
    assert list((root / "run-1").glob("ckpt-1.*"))
    monkeypatch.setattr(fsops, "remove_groups", real)
    assert prune.resume(Store(engine)) == 15
    assert sorted(st for _, st in query(db, "select step, state from checkpoints")) == (
        ["complete"] * 3 + ["pruned"] * 15
    )
    with session_scope(engine) as s:
        resumed = [(e.reason, e.detail) for e in audit_reads.actions(s, kinds=["pruned"])]
    assert len(resumed) == 15 and all("resumed after restart" in (r or "") for r, _ in resumed)
    assert sum(1 for _, d in resumed if d["already_missing"]) == 10  # run-0's and run-2's
    for r in range(3):
        _assert_only(root / f"run-{r}", "ckpt-6")
    engine.dispose()


def test_gone_filter_drops_exactly_the_vanished_entries(tmp_path: Path) -> None:
    """`without` with `gone_at` (the state-file rewrite of a prune) drops what `without` of the
    removed and the vanished prefixes drops: entries in the run directory looked up by dir fd."""
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    for name in ("a-1", "a-2", "a-4", "sub/a-5", "a-7"):
        (run / f"{name}.index").write_bytes(b"")
    (run / "a-6").write_bytes(b"")  # a single-file (Keras-like) entry, no .index
    entries = [
        "a-1",  # deleted by this prune
        "a-2",  # kept, exists
        "a-3",  # vanished (the trainer deleted it)
        str(run / "a-4"),  # TF1 style: absolute
        "./a-4",
        "sub/a-5",
        "a-6",
        "",
        str(tmp_path / "elsewhere" / "a-8"),  # absolute, outside, missing
        "a-7",
    ]
    stamps = [float(i) for i in range(len(entries))]
    removed = {str(run / "a-1"), str(run / "a-7"), str(run / "sub" / "a-5")}
    for current in ("a-7", "a-2", "a-9", str(run / "a-1"), ""):
        for with_stamps in (stamps, stamps[:-1]):
            state = statefile.CheckpointState(current, entries, with_stamps, 12.5)
            vanished = {
                state.resolve(run, p)
                for p in entries
                if not (
                    state.resolve(run, p).with_name(state.resolve(run, p).name + ".index").exists()
                    or state.resolve(run, p).exists()
                )
            }
            expected = statefile.without(state, run, {Path(p) for p in removed} | vanished)
            with safeio.open_dir_under(run, run) as dfd:
                got = statefile.without(state, str(run), removed, statefile.gone_at(dfd, run))
            assert got == expected, (current, with_stamps)


def test_fsops_accepts_str_paths_and_refuses_a_sibling_sharing_the_roots_prefix(
    tmp_path: Path,
) -> None:
    root, sibling = tmp_path / "root", tmp_path / "root2"
    (root / "run").mkdir(parents=True)
    sibling.mkdir()
    (sibling / "a.index").write_bytes(b"keep")
    (root / "a.index").write_bytes(b"x")
    (root / "run" / "b.index").write_bytes(b"x")
    (root / "run" / "sub").mkdir()
    refused = fsops.remove_files(str(root), str(sibling), ["a.index"])
    assert not refused.ok and "not under the watch root" in refused.errors[0]
    assert (sibling / "a.index").read_bytes() == b"keep"
    assert fsops.remove_files(str(root), str(root), ["a.index"]).removed == ["a.index"]
    groups = fsops.remove_groups(str(root) + "/", str(root / "run"), [["b.index"], ["sub"]])
    assert groups[0].ok and groups[0].removed == ["b.index"] and groups[0].bytes_freed == 1
    assert not groups[1].ok and "is a directory" in groups[1].errors[0]
    assert (root / "run" / "sub").is_dir()


def test_bytes_freed_counts_only_data_the_unlink_frees(tmp_path: Path) -> None:
    """Unlinking one of two hard links frees nothing; the last link frees the data."""
    (tmp_path / "a.data").write_bytes(b"x" * 100)
    os.link(tmp_path / "a.data", tmp_path / "b.data")
    first = fsops.remove_files(str(tmp_path), str(tmp_path), ["a.data"])
    assert first.removed == ["a.data"] and first.bytes_freed == 0
    last = fsops.remove_files(str(tmp_path), str(tmp_path), ["b.data"])
    assert last.removed == ["b.data"] and last.bytes_freed == 100


# ------------------------------------------------------------------ audit rows and events


@pytest.mark.slow
def test_events_list_each_deletion_of_a_batched_audit_row(tmp_path: Path, corpus: Corpus) -> None:
    root, db, _cfg, engine = _recorded_runs(tmp_path, corpus, n_runs=2, per_run=5, keep_last=1)
    engine.dispose()
    conf = tmp_path / "c.toml"
    # A row as ckptd wrote them before deletions were batched: one event of its own.
    con = sqlite3.connect(db)
    with con:
        con.execute(
            "insert into actions (at, kind, subject, reason, detail) values (?, ?, ?, ?, ?)",
            ("2020-01-01 00:00:00.000000", "pruned", "/old/ckpt-1", "legacy", '{"step": 1}'),
        )
    con.close()
    proc = ckptd("prune", config=conf)
    assert proc.returncode == 0, proc.stderr
    # Stored: one row per run, listing its deletions.
    assert query(db, "select count(*) from actions where kind = 'pruned'") == [(3,)]
    deleted = [f"{root}/run-{r}/ckpt-{s}" for r in range(2) for s in range(1, 5)]
    events = _pruned_events(conf)
    assert [e["subject"] for e in events] == ["/old/ckpt-1", *deleted]  # newest last
    assert events[0]["reason"] == "legacy" and events[0]["detail"] == {"step": 1}
    ids = {p: i for p, i in query(db, "select prefix, id from checkpoints")}
    for e, prefix in zip(events[1:], deleted, strict=True):
        name = Path(prefix).name
        assert e["kind"] == "pruned" and e["reason"] == "not kept by keep_last=1"
        assert e["run"] == Path(prefix).parent.name
        assert e["detail"]["step"] == int(name.split("-")[1])
        assert sorted(e["detail"]["files"]) == [f"{name}.data-00000-of-00001", f"{name}.index"]
        assert e["detail"]["already_missing"] == [] and e["detail"]["bytes"] == 0  # hard links
        assert e["detail"]["checkpoint_id"] == ids[prefix]
    # --limit counts events, not rows: the newest 3 deletions (of run-1's row of 4) …
    assert [e["subject"] for e in _pruned_events(conf, "--limit", "3")] == deleted[-3:]
    # … across rows, and across kinds.
    assert [e["subject"] for e in _pruned_events(conf, "--limit", "6")] == deleted[-6:]
    assert ckptd("pin", "run-0@5", config=conf).returncode == 0
    mixed = json.loads(ckptd("events", "--limit", "2", "--json", config=conf).stdout)
    assert [e["kind"] for e in mixed] == ["pruned", "pinned"] and mixed[0]["subject"] == deleted[-1]
    assert [e["subject"] for e in _pruned_events(conf, "--run", "run-0")] == deleted[:4]
    # The table lists each deletion too, one line each.
    human = ckptd("events", "--kind", "pruned", "--limit", "100", config=conf)
    assert human.returncode == 0, human.stderr
    lines = [line.split() for line in human.stdout.splitlines() if " pruned " in line]
    subjects = [next(word for word in line if word.startswith("/")) for line in lines]
    assert subjects == ["/old/ckpt-1", *deleted]
    # `status` shows the newest deletions among its recent events.
    status = json.loads(ckptd("status", "--json", config=conf).stdout)
    assert [p["subject"] for p in status["problems"]] == deleted[-5:]


class _Crash(BaseException):
    """As a SIGKILL would stop the prune: nothing after it runs, nothing catches it."""


@pytest.mark.parametrize("crash", ["after_intent", "after_unlink", "after_state_file"])
def test_resume_after_a_crash_between_phases(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch, crash: str
) -> None:
    root, db, cfg, engine = _recorded_runs(tmp_path, corpus, n_runs=2, per_run=4, keep_last=1)
    doomed = [f"{root}/run-{r}/ckpt-{s}" for r in range(2) for s in range(1, 4)]

    def boom(*_args: Any, **_kwargs: Any) -> Any:
        raise _Crash

    with monkeypatch.context() as m:
        if crash == "after_intent":  # before any file is removed
            m.setattr(fsops, "remove_groups", boom)
        elif crash == "after_unlink":  # files removed, state files not rewritten
            m.setattr(statefile, "write_at", boom)
        else:  # state files rewritten, "pruned" not committed
            m.setattr(pruning, "record_results", boom)
        with pytest.raises(_Crash):
            prune.prune(Store(engine), _runs_and_watches(engine, cfg))
    states = _states(db)
    left = {p for p in doomed if list(Path(p).parent.glob(Path(p).name + ".*"))}
    assert {states[p] for p in doomed} == {"pruning"}  # no result was committed
    assert left == (set(doomed) if crash == "after_intent" else set())
    if crash == "after_intent":
        # Two intents with different reasons (two prunes under different configs): each
        # checkpoint keeps its own.
        con = sqlite3.connect(db)
        with con:
            con.execute("update checkpoints set reason = 'by hand' where prefix = ?", (doomed[0],))
        con.close()
    for r in range(2):  # the state files list every checkpoint until they are rewritten
        state = statefile.read(root / f"run-{r}")
        assert state is not None
        assert len(state.all_model_checkpoint_paths) == (1 if crash == "after_state_file" else 4)

    resumed = prune.resume(Store(engine))
    assert resumed == 6
    rows = query(db, "select prefix, state, reason from checkpoints")
    assert sorted(st for _, st, _ in rows) == ["complete"] * 2 + ["pruned"] * 6
    for r in range(2):
        _assert_only(root / f"run-{r}", "ckpt-4")
    with session_scope(engine) as s:
        events = audit_reads.actions(s, kinds=["pruned"])
    assert sorted(e.subject or "" for e in events) == sorted(doomed)  # each deletion, once
    reasons = {e.subject: e.reason for e in events}
    stored = {p: reason for p, _, reason in rows}
    for p in doomed:
        assert reasons[p] == stored[p]  # `ls` and `events` agree on why it went
        if p == doomed[0] and crash == "after_intent":
            assert reasons[p] == "by hand (resumed after restart)"
        else:
            assert reasons[p] == "not kept by keep_last=1 (resumed after restart)"
    for e in events:
        files = e.detail["files" if crash == "after_intent" else "already_missing"]
        assert isinstance(files, list) and len(files) == 2
    engine.dispose()
