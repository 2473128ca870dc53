"""Reconcile against a real SQLite database and real TensorFlow checkpoints."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from ckptd.config import parse_config
from ckptd.daemon.main import Daemon
from ckptd.daemon.reconcile import Reconciler
from ckptd.daemon.runs import RunSpec, discover, run_of
from ckptd.store import audit_reads, migrate, reads
from ckptd.store import runs as store_runs
from ckptd.store.db import make_engine, session_scope
from ckptd.store.handle import Store
from tests.conftest import Corpus, wait_for


def _setup(
    tmp_path: Path, runs: str | None = "*", **watch: object
) -> tuple[Reconciler, list, object]:
    root = tmp_path / "runs"
    root.mkdir(exist_ok=True)
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/ckptd.db"},
            "watch": [
                {
                    "path": str(root),
                    **({"runs": runs} if runs else {}),
                    "keras_template": "model.{epoch:02d}-{val_loss:.2f}.keras",
                    "best": {"metric": "eval/accuracy"},
                    **watch,
                }
            ],
        }
    )
    engine = make_engine(cfg.daemon.database)
    migrate.upgrade(engine)
    return Reconciler(Store(engine)), cfg.watches, engine


def _ls(engine: object, run: str | None = None) -> list:
    with session_scope(engine) as s:  # type: ignore[arg-type]
        run_id = store_runs.resolve_run(s, run).id if run else None
        return reads.checkpoints(s, run_id=run_id)


def test_backfill_every_format_with_metrics(tmp_path: Path, corpus: Corpus) -> None:
    rec, watches, engine = _setup(tmp_path)
    for kind in ("tf1", "tf2", "sharded", "keras"):
        corpus.copy(kind, tmp_path / "runs" / kind)
    outcomes = rec.reconcile_many(discover(0, watches[0]))
    assert sum(len(o.recorded) for o in outcomes) > 0
    items = _ls(engine)
    by_run: dict[str, list] = {}
    for c in items:
        by_run.setdefault(c.run, []).append(c)
    for kind in ("tf1", "tf2", "sharded"):
        saves = corpus.saves[kind]
        got = {c.step: c for c in by_run[kind]}
        assert sorted(got) == [s["step"] for s in saves]
        for s in saves:
            c = got[s["step"]]
            assert c.state == "complete" and c.prefix == str(
                tmp_path / "runs" / kind / Path(s["prefix"]).name
            )
            assert c.metrics["eval/accuracy"] == pytest.approx(
                s["metrics"]["eval/accuracy"], rel=1e-6
            )
            assert c.recorded_at is not None
        assert all(c.format == ("tf1" if kind == "tf1" else "tf2") for c in got.values())
        assert all(c.has_meta == (kind == "tf1") for c in got.values())
    assert all(len([f for f in c.files if ".data-" in f]) == 4 for c in by_run["sharded"])
    keras = [c for c in by_run["keras"] if c.format == "keras"]
    assert sorted(c.step for c in keras) == [1, 2, 3]
    for s in corpus.saves["keras"]:
        (c,) = [k for k in keras if k.step == s["step"]]
        # Parsed from the file name, rounded by the template to 2 decimals.
        assert c.metrics["val_loss"] == pytest.approx(s["metrics"]["val_loss"], abs=0.006)


def test_second_reconcile_and_restart_add_nothing(tmp_path: Path, corpus: Corpus) -> None:
    rec, watches, engine = _setup(tmp_path)
    corpus.copy("tf1", tmp_path / "runs" / "a")
    specs = discover(0, watches[0])
    first = rec.reconcile_many(specs)
    assert len(first[0].recorded) == 3
    assert rec.reconcile_many(specs)[0].recorded == []
    restarted = Reconciler(Store(engine))  # a new daemon: cold cache, same database
    assert restarted.reconcile_many(specs)[0].recorded == []
    assert len(_ls(engine)) == 3


def _db_rows(engine: object) -> list[tuple]:
    """Everything reconcile writes, without ids and times (comparable across databases)."""
    with session_scope(engine) as s:  # type: ignore[arg-type]
        return sorted(
            (
                c.run,
                c.step,
                c.state,
                c.format,
                tuple(c.files),
                c.size,
                c.reason,
                c.has_meta,
                c.created_at,
                sorted(c.metrics.items()),
            )
            for c in reads.checkpoints(s)
        )


def test_parallel_backfill_records_what_the_sequential_one_does(
    tmp_path: Path, corpus: Corpus
) -> None:
    """observe_all with worker processes (real forkserver pool) == observing in-process."""
    results = []
    for mode in ("sequential", "parallel"):
        base = tmp_path / mode
        base.mkdir()
        rec, watches, engine = _setup(base)
        for kind in ("tf1", "tf2", "sharded", "keras"):
            corpus.copy(kind, base / "runs" / kind)
        (base / "runs" / "empty").mkdir()
        specs = discover(0, watches[0])
        if mode == "parallel":
            assert rec.register(specs) == len(specs)
            outcomes = rec.reconcile_many(specs, workers=2)
            from multiprocessing import forkserver

            assert wait_for(lambda: forkserver._forkserver._forkserver_pid is None, timeout=10)
        else:
            outcomes = rec.reconcile_many(specs)
        assert sum(len(o.recorded) for o in outcomes) > 0
        results.append(_db_rows(engine))
        with session_scope(engine) as s:
            runs = {r.name: r for r in store_runs.runs(s)}
        assert set(runs) == {"tf1", "tf2", "sharded", "keras", "empty"}
    assert results[0] == results[1]
    assert len(results[0]) >= 12


def test_observation_made_before_a_write_is_redone(tmp_path: Path, corpus: Corpus) -> None:
    """A stale observation (a checkpoint was recorded after it) must not mark that one gone."""
    rec, watches, engine = _setup(tmp_path)
    run = corpus.copy("tf1", tmp_path / "runs" / "a")
    specs = discover(0, watches[0])
    newest = sorted(run.glob("model.ckpt-30.*"))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for f in newest:
        f.rename(hidden / f.name)
    rec.reconcile_many(specs)
    rec.register(specs)
    (old,) = list(rec.observe_all(specs))  # sees steps 10 and 20 …
    for f in newest:
        (hidden / f.name).rename(run / f.name)
    assert rec.reconcile(specs[0]).recorded == ["a@30"]  # … then step 30 is recorded
    assert rec.reconcile(specs[0], old).gone == []
    assert {c.step: c.state for c in _ls(engine)} == {
        10: "complete",
        20: "complete",
        30: "complete",
    }


def test_restart_preloads_and_rereads_nothing(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec, watches, engine = _setup(tmp_path)
    corpus.copy("tf1", tmp_path / "runs" / "a")
    corpus.copy("tf2", tmp_path / "runs" / "b")
    specs = discover(0, watches[0])
    rec.reconcile_many(specs)
    before = _db_rows(engine)
    with session_scope(engine) as s:
        scanned = s.execute(text("SELECT name, scanned_at FROM runs")).all()

    def no_reads(*_a: object, **_k: object) -> None:
        raise AssertionError("an unchanged checkpoint or event file was read again")

    monkeypatch.setattr("ckptd.io.formats.tf.read_header", no_reads)
    monkeypatch.setattr("ckptd.io.observe.read_scalars", no_reads)
    restarted = Reconciler(Store(engine))  # a new daemon: same database
    assert restarted.register(specs) == 0  # both runs' states loaded at once, none new
    assert all(o.recorded == [] for o in restarted.reconcile_many(specs, workers=1))
    assert _db_rows(engine) == before
    with session_scope(engine) as s:  # nothing changed: no transaction, not even scanned_at
        assert s.execute(text("SELECT name, scanned_at FROM runs")).all() == scanned


def test_changes_while_down_are_caught_up(tmp_path: Path, corpus: Corpus) -> None:
    rec, watches, engine = _setup(tmp_path)
    run = corpus.copy("tf1", tmp_path / "runs" / "a")
    rec.reconcile_many(discover(0, watches[0]))
    # While "down": the trainer deletes step 10 and a new run appears.
    for f in run.glob("model.ckpt-10.*"):
        f.unlink()
    corpus.copy("tf2", tmp_path / "runs" / "b")
    rec2 = Reconciler(Store(engine))
    rec2.reconcile_many(discover(0, watches[0]))
    states = {(c.run, c.step): c.state for c in _ls(engine)}
    assert states[("a", 10)] == "gone"
    assert states[("a", 20)] == "complete"
    assert [k for k in states if k[0] == "b"] == [("b", 10), ("b", 20), ("b", 30)]
    with session_scope(engine) as s:
        gone = audit_reads.actions(s, kinds=["gone"])
    assert [a.subject for a in gone] == [str(run / "model.ckpt-10")]
    assert gone[0].reason == "deleted outside ckptd"


def test_a_run_directory_gone_at_once_gives_its_reason(tmp_path: Path, corpus: Corpus) -> None:
    """Moved away or deleted in one step: every checkpoint is gone "run directory is gone"."""
    rec, watches, engine = _setup(tmp_path)
    run = corpus.copy("tf1", tmp_path / "runs" / "a")
    specs = discover(0, watches[0])
    rec.reconcile_many(specs)
    run.rename(tmp_path / "elsewhere")
    rec.reconcile_many(specs)  # (as the daemon does for a run it knows)
    assert {(c.step, c.state) for c in _ls(engine)} == {(10, "gone"), (20, "gone"), (30, "gone")}
    with session_scope(engine) as s:
        gone = audit_reads.actions(s, kinds=["gone"])
    assert sorted(a.subject for a in gone) == [str(run / f"model.ckpt-{n}") for n in (10, 20, 30)]
    assert {a.reason for a in gone} == {"run directory is gone"}


def test_partial_then_complete(tmp_path: Path, corpus: Corpus) -> None:
    """A save in progress is not recorded; when it completes it is, with its metric."""
    rec, watches, engine = _setup(tmp_path, runs=None)
    src = corpus.run_dir("tf2")
    run = tmp_path / "runs"
    shutil.copy(src / "ckpt-10.data-00000-of-00001", run)
    index = (src / "ckpt-10.index").read_bytes()
    (run / "ckpt-10.index").write_bytes(index[: len(index) // 2])  # TF2 writes .index in place
    (spec,) = discover(0, watches[0])
    assert rec.reconcile(spec).recorded == []
    assert _ls(engine) == []
    (run / "ckpt-10.index").write_bytes(index)
    shutil.copytree(src / "eval", run / "eval")
    assert rec.reconcile(spec).recorded == ["runs@10"]
    (c,) = _ls(engine)
    assert c.state == "complete" and "eval/accuracy" in c.metrics


def test_a_checkpoint_seen_while_cp_p_copies_it_is_one_row(tmp_path: Path, corpus: Corpus) -> None:
    """`cp -p` and shutil.copytree write the index, then set its time, then copy the data. Seen
    at each step, the checkpoint is corrupt (data missing) under two index identities, then
    complete: one row throughout, never a "replaced" version of itself."""
    rec, watches, engine = _setup(tmp_path, runs=None)
    src = corpus.run_dir("tf2")
    run = tmp_path / "runs"
    (spec,) = discover(0, watches[0])
    shutil.copyfile(src / "ckpt-10.index", run / "ckpt-10.index")  # content, time of the copy
    rec.reconcile(spec)
    shutil.copystat(src / "ckpt-10.index", run / "ckpt-10.index")  # then the source's time
    rec.reconcile(spec)
    with session_scope(engine) as s:
        assert s.execute(text("SELECT state FROM checkpoints")).scalars().all() == ["corrupt"]
    shutil.copy2(src / "ckpt-10.data-00000-of-00001", run)
    rec.reconcile(spec)
    with session_scope(engine) as s:
        rows = s.execute(text("SELECT step, state FROM checkpoints")).all()
        kinds = [a.kind for a in audit_reads.actions(s)]
    assert [tuple(r) for r in rows] == [(10, "complete")]
    assert "replaced" not in kinds


def test_meta_arriving_after_is_recorded(tmp_path: Path, corpus: Corpus) -> None:
    rec, watches, engine = _setup(tmp_path, runs=None)
    src = corpus.run_dir("tf1")
    run = tmp_path / "runs"
    for f in src.glob("model.ckpt-10.*"):
        if f.suffix != ".meta":
            shutil.copy(f, run)
    (spec,) = discover(0, watches[0])
    rec.reconcile(spec)
    (c,) = _ls(engine)
    assert c.state == "complete" and not c.has_meta
    shutil.copy(src / "model.ckpt-10.meta", run)
    rec.reconcile(spec)
    (c,) = _ls(engine)
    assert c.has_meta and "model.ckpt-10.meta" in c.files


def test_corrupt_checkpoint_is_recorded_with_reason(tmp_path: Path, corpus: Corpus) -> None:
    rec, watches, engine = _setup(tmp_path, runs=None)
    run = tmp_path / "runs"
    src = corpus.run_dir("sharded")
    for f in src.glob("ckpt-10.*"):
        if "data-00002" not in f.name:
            shutil.copy(f, run)
    (spec,) = discover(0, watches[0])
    outcome = rec.reconcile(spec)
    assert outcome.corrupt == ["runs@10"]
    (c,) = _ls(engine)
    assert c.state == "corrupt" and "00002" in (c.reason or "")
    with session_scope(engine) as s:
        assert [a.kind for a in audit_reads.actions(s)] == ["run_discovered", "corrupt"]


def test_corrupt_event_file_is_reported_and_skipped(tmp_path: Path, corpus: Corpus) -> None:
    rec, watches, engine = _setup(tmp_path, runs=None)
    run = tmp_path / "runs"
    for f in corpus.run_dir("tf1").iterdir():
        if f.is_file():
            shutil.copy(f, run)
    (run / "eval").mkdir()
    (run / "eval" / "events.out.tfevents.0.garbage").write_bytes(bytes(range(256)) * 8)
    (spec,) = discover(0, watches[0])
    rec.reconcile(spec)
    assert len(_ls(engine)) == 3  # the checkpoints are fine
    with session_scope(engine) as s:
        problems = audit_reads.actions(s, kinds=["event_file_corrupt"])
    assert len(problems) == 1 and "corrupt record" in (problems[0].reason or "")
    rec.reconcile(spec)  # reported once, not every scan
    with session_scope(engine) as s:
        assert len(audit_reads.actions(s, kinds=["event_file_corrupt"])) == 1


def test_incremental_event_reads_attach_late_metrics(tmp_path: Path, corpus: Corpus) -> None:
    """Checkpoint first, eval summary later (an evaluator job writing eval/ after the save)."""
    rec, watches, engine = _setup(tmp_path, runs=None)
    run = tmp_path / "runs"
    for f in corpus.run_dir("tf1").glob("model.ckpt-*"):
        shutil.copy(f, run)
    (spec,) = discover(0, watches[0])
    rec.reconcile(spec)
    assert all("eval/accuracy" not in c.metrics for c in _ls(engine))
    shutil.copytree(corpus.run_dir("tf1") / "eval", run / "eval")
    rec.reconcile(spec)
    expected = {s["step"]: s["metrics"]["eval/accuracy"] for s in corpus.saves["tf1"]}
    got = {c.step: c.metrics["eval/accuracy"] for c in _ls(engine)}
    assert got == pytest.approx(expected, rel=1e-6)


def test_run_mapping_nested_names(tmp_path: Path) -> None:
    cfg = parse_config({"watch": [{"path": str(tmp_path), "runs": "team-*/*"}]})
    (w,) = cfg.watches
    spec = run_of(0, w, f"{tmp_path}/team-a/exp3/eval/events.out.tfevents.1")
    assert spec == RunSpec(0, "team-a/exp3", tmp_path / "team-a" / "exp3", w)
    assert run_of(0, w, f"{tmp_path}/other/exp3/x.index") is None
    assert run_of(0, w, f"{tmp_path}/team-a") is None
    (tmp_path / "team-a" / "exp3").mkdir(parents=True)
    (tmp_path / "team-b").mkdir()
    (tmp_path / "escape").mkdir()
    (tmp_path / "team-b" / "link").symlink_to(tmp_path / "escape")
    assert [r.name for r in discover(0, w)] == ["team-a/exp3"]  # the symlinked run is not followed


def test_daemon_rescan_catches_what_events_missed(tmp_path: Path, corpus: Corpus) -> None:
    """No observer at all (every event dropped): the periodic rescan still records everything."""
    root = tmp_path / "runs"
    root.mkdir()
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/d.db"},
            "watch": [{"path": str(root), "runs": "*"}],
        }
    )
    daemon = Daemon(cfg)
    daemon.prepare()
    assert daemon.full_reconcile() == 0
    corpus.copy("tf2", root / "late")
    daemon.rescan()
    assert [c.step for c in _ls(daemon.store.engine, "late")] == [10, 20, 30]
    shutil.rmtree(root / "late")
    daemon.rescan()
    assert {c.state for c in _ls(daemon.store.engine, "late")} == {"gone"}
    daemon.shutdown()


def test_data_shard_of_the_wrong_size_is_corrupt(tmp_path: Path, corpus: Corpus) -> None:
    rec, watches, engine = _setup(tmp_path, runs=None)
    run = tmp_path / "runs"
    for f in corpus.run_dir("tf2").glob("ckpt-10.*"):
        shutil.copy(f, run)
    data = run / "ckpt-10.data-00000-of-00001"
    data.write_bytes(b"garbage" * 10)  # wrong size: cannot hold what the index describes
    (spec,) = discover(0, watches[0])
    assert rec.reconcile(spec).corrupt == ["runs@10"]
    (c,) = _ls(engine)
    assert c.state == "corrupt"
    assert "data shard 00000 has 70 bytes, the index needs" in (c.reason or "")


def test_non_utf8_names_are_reported_not_recorded(tmp_path: Path, corpus: Corpus) -> None:
    rec, watches, engine = _setup(tmp_path, runs=None)
    run = tmp_path / "runs"
    for f in corpus.run_dir("tf2").glob("ckpt-10.*"):
        shutil.copy(f, run)
    bad = os.fsencode(run) + b"/ckpt-\xff.index"
    with open(bad, "wb") as fh:
        fh.write(b"x")
    (spec,) = discover(0, watches[0])
    assert rec.reconcile(spec).recorded == ["runs@10"]
    rec.reconcile(spec)  # reported once, not on every scan
    with session_scope(engine) as s:
        reported = audit_reads.actions(s, kinds=["unsupported_name"])
    assert [a.subject for a in reported] == ["ckpt-\\xff.index"]
    assert "not valid UTF-8" in (reported[0].reason or "")
    assert os.path.exists(bad)


def _age_dirs(run: Path, seconds: float = 60) -> None:
    """Directory mtimes in the past, as for a run written a minute ago (not racy any more)."""
    past = time.time() - seconds
    for d in [run, *[p for p in run.rglob("*") if p.is_dir()]]:
        os.utime(d, (past, past))


def test_quick_rescan_fingerprint_sees_every_change_a_listing_would(
    tmp_path: Path, corpus: Corpus
) -> None:
    rec, watches, _engine = _setup(tmp_path)
    run = corpus.copy("tf1", tmp_path / "runs" / "a")
    (spec,) = discover(0, watches[0])
    os.utime(run)  # copytree kept the corpus' old mtimes: as if the trainer wrote just now
    rec.reconcile(spec)
    assert not rec.unchanged(spec), "directories modified just now: the fingerprint is racy"
    _age_dirs(run)
    rec.reconcile(spec)
    assert rec.unchanged(spec)
    # A new file in the run directory (a new checkpoint, a deletion, a rename) …
    (run / "notes.txt").write_text("x")
    assert not rec.unchanged(spec)
    rec.reconcile(spec)
    _age_dirs(run)
    rec.reconcile(spec)
    assert rec.unchanged(spec)
    # … an event file growing …
    (event,) = sorted((run / "eval").glob("events.out.tfevents.*"))
    with event.open("ab") as fh:
        fh.write(b"\0")
    assert not rec.unchanged(spec)
    rec.reconcile(spec)
    _age_dirs(run)
    rec.reconcile(spec)
    assert rec.unchanged(spec)
    # … a new event file in a subdirectory, or the run directory going away.
    (run / "eval" / "events.out.tfevents.2.host").write_bytes(b"")
    assert not rec.unchanged(spec)
    rec.reconcile(spec)
    _age_dirs(run)
    rec.reconcile(spec)
    assert rec.unchanged(spec)
    shutil.rmtree(run)
    assert not rec.unchanged(spec)


def test_partial_write_is_never_skipped_by_a_quick_rescan(tmp_path: Path, corpus: Corpus) -> None:
    """A checkpoint still being written turns corrupt with time alone: no fingerprint."""
    rec, watches, engine = _setup(tmp_path)
    run = corpus.copy("tf1", tmp_path / "runs" / "a")
    (run / "model.ckpt-10.index").unlink()  # data without an index: a save in progress …
    for f in run.glob("model.ckpt-10.*"):
        os.utime(f)  # … written just now (copytree kept the corpus' old mtimes)
    (spec,) = discover(0, watches[0])
    _age_dirs(run)
    rec.reconcile(spec)
    assert 10 not in {c.step for c in _ls(engine)}, "a save in progress is not recorded yet"
    assert not rec.unchanged(spec)


def test_daemon_deep_rescan_catches_an_in_place_rewrite(tmp_path: Path, corpus: Corpus) -> None:
    """Quick rescans skip unchanged runs; every DEEP_RESCAN_EVERY-th re-lists and re-stats all,
    catching what changes no directory (an index rewritten in place, its events dropped)."""
    from ckptd.daemon import main as daemon_main

    root = tmp_path / "runs"
    root.mkdir()
    run = corpus.copy("tf1", root / "a")
    _age_dirs(run)
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/d.db"},
            "watch": [{"path": str(root), "runs": "*"}],
        }
    )
    daemon = Daemon(cfg)
    daemon.prepare()
    daemon.full_reconcile()
    assert {c.step: c.state for c in _ls(daemon.store.engine)} == {
        s: "complete" for s in (10, 20, 30)
    }
    index = run / "model.ckpt-20.index"
    data = bytearray(index.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same name, same size: only the file's mtime changes
    with index.open("r+b") as fh:
        fh.write(data)
    seen = []
    for _ in range(daemon_main.DEEP_RESCAN_EVERY):
        daemon.rescan()
        seen.append({c.step: c.state for c in _ls(daemon.store.engine)}[20])
    assert seen[:-1] == ["complete"] * (daemon_main.DEEP_RESCAN_EVERY - 1), "quick passes skip"
    assert seen[-1] == "corrupt"
    daemon.shutdown()


def test_observe_many_falls_back_in_process_when_the_pool_breaks(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool that breaks (seccomp, no /dev/shm, a killed worker) costs speed, never a run."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from ckptd.io import observe as observe_mod

    class Broken:
        def __init__(self, *_a: object, **_k: object) -> None:
            self.submitted = 0

        def submit(self, fn: object, *_a: object) -> Future:
            f: Future = Future()
            if fn is int:  # the start-up probe: the pool is up
                f.set_running_or_notify_cancel()
                f.set_result(0)
                return f
            self.submitted += 1
            if self.submitted != 2:  # pending: the caller observes it itself
                return f
            # the second was taken by a worker, which then died
            f.set_running_or_notify_cancel()
            f.set_exception(BrokenProcessPool("a worker died"))
            return f

        def shutdown(self, **_k: object) -> None:
            pass

    rec, watches, _engine = _setup(tmp_path)
    for kind in ("tf1", "tf2", "sharded"):
        corpus.copy(kind, tmp_path / "runs" / kind)
    specs = discover(0, watches[0])
    expected = [o.found for o in rec.observe_all(specs, workers=1)]
    monkeypatch.setattr(observe_mod, "ProcessPoolExecutor", Broken)
    monkeypatch.setattr(observe_mod, "start_fork_server", lambda: None)
    monkeypatch.setattr(observe_mod, "stop_fork_server", lambda **_k: None)
    got = [o.found for o in rec.observe_all(specs, workers=2)]
    assert got == expected and len(got) == 3

    class NoStart(Broken):
        def submit(self, fn: object, *_a: object) -> Future:
            raise OSError("fork server cannot start")

    monkeypatch.setattr(observe_mod, "ProcessPoolExecutor", NoStart)
    assert [o.found for o in rec.observe_all(specs, workers=2)] == expected


def test_observer_ignores_reads_and_reports_writes(tmp_path: Path, corpus: Corpus) -> None:
    """Listing and reading run directories (every rescan does, by the thousand) must not feed
    the real inotify observer events; creating a file must."""
    from ckptd.daemon.watch import Watcher

    root = tmp_path / "runs"
    run = corpus.copy("tf1", root / "a")
    cfg = parse_config({"daemon": {}, "watch": [{"path": str(root), "runs": "*"}]})
    seen: list[str] = []
    watcher = Watcher(cfg.watches, lambda _i, path: seen.append(path))
    watcher.start()
    try:
        assert watcher.describe()[0]["observer"] == "inotify"
        # The kernel is not even asked for open / close-without-write events.
        from watchdog.observers.inotify_c import InotifyConstants

        observer = watcher.slots[0].observer
        assert observer is not None
        (emitter,) = observer.emitters
        mask = emitter.get_event_mask_from_filter()  # type: ignore[attr-defined]
        assert not mask & (InotifyConstants.IN_OPEN | InotifyConstants.IN_CLOSE_NOWRITE)
        assert mask & InotifyConstants.IN_CREATE and mask & InotifyConstants.IN_MODIFY
        for _ in range(20):
            for entry in os.scandir(run):
                if entry.is_file():
                    entry.stat()
            (run / "checkpoint").read_bytes()
        time.sleep(1.0)
        assert seen == [], seen[:5]
        (run / "new-file").write_text("x")
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert str(run / "new-file") in seen
    finally:
        watcher.stop()


def test_renames_still_pair_with_the_short_move_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watchdog's 0.5 s hold on IN_MOVED_FROM (which could delay the next checkpoint by that
    much) is cut to MOVE_PAIRING_DELAY; renames done the way TensorFlow writes its state file
    still come through as one paired move, and the file written next is reported too."""
    from watchdog.events import FileMovedEvent
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    from ckptd.daemon import watch

    assert InotifyMoveEventGrouper.delay == watch.MOVE_PAIRING_DELAY < 0.1
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    cfg = parse_config({"daemon": {}, "watch": [{"path": str(root), "runs": "*"}]})
    events: list[object] = []
    real = watch._Handler.on_any_event

    def record(self: watch._Handler, event: object) -> None:
        events.append(event)
        real(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(watch._Handler, "on_any_event", record)
    watcher = watch.Watcher(cfg.watches, lambda _i, _path: None)
    watcher.start()
    try:
        for i in range(20):
            tmp = root / "a" / f"checkpoint.tmp{i}"
            tmp.write_text(f'model_checkpoint_path: "ckpt-{i}"\n')
            os.replace(tmp, root / "a" / "checkpoint")
            (root / "a" / f"ckpt-{i}.index").write_text("x")
        want = str(root / "a" / "ckpt-19.index")
        assert wait_for(lambda: any(getattr(e, "src_path", None) == want for e in events), 10)
        moves = [e for e in events if isinstance(e, FileMovedEvent)]
        assert len(moves) == 20 and all(m.dest_path.endswith("/checkpoint") for m in moves)
    finally:
        watcher.stop()


def test_idle_benchmark_sizes_its_window_by_the_daemons_deep_rescan_period() -> None:
    """bench/footprint.py does not import ckptd; its copy of DEEP_RESCAN_EVERY must match."""
    import re

    from ckptd.daemon import main as daemon_main
    from tests.conftest import REPO

    text = (REPO / "bench" / "footprint.py").read_text()
    (value,) = re.findall(r"^DEEP_RESCAN_EVERY = (\d+)", text, re.M)
    assert int(value) == daemon_main.DEEP_RESCAN_EVERY


def test_backfill_survives_a_run_whose_observation_fails(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error listing one run costs that run (logged, retried at the next scan),
    not the parallel backfill of the others."""
    from ckptd.daemon import main as daemon_main
    from ckptd.io import formats
    from ckptd.io import observe as observe_mod

    root = tmp_path / "runs"
    root.mkdir()
    n = daemon_main.PARALLEL_MIN_RUNS + 1
    for i in range(n):
        corpus.copy("tf2", root / f"r{i:02d}")
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/d.db"},
            "watch": [{"path": str(root), "runs": "*"}],
        }
    )
    daemon = Daemon(cfg)
    daemon.prepare()
    real_scan = formats.list_run

    def flaky_scan(run_dir: Path, *a: object, **k: object) -> formats.Listing:
        if run_dir.name == "r03":
            raise RuntimeError("simulated bug")
        return real_scan(run_dir, *a, **k)  # type: ignore[arg-type]

    class NeverUp(observe_mod.ObservePool):  # observed in this process, where the patch applies
        def _start(self, workers: int) -> None:
            return None

    monkeypatch.setattr(formats, "list_run", flaky_scan)
    monkeypatch.setattr(observe_mod, "ObservePool", NeverUp)
    assert daemon.full_reconcile(workers=2) == 3 * (n - 1)
    assert daemon.health.reconcile_errors == 1
    assert {c.run for c in _ls(daemon.store.engine)} == {f"r{i:02d}" for i in range(n)} - {"r03"}
    monkeypatch.setattr(formats, "list_run", real_scan)
    assert daemon.full_reconcile() == 3
    daemon.shutdown()


def test_cold_start_prefetch_records_what_the_sequential_backfill_does(
    tmp_path: Path, corpus: Corpus
) -> None:
    """`ckptd run` begins a cold start's observations before the daemon reads its database
    (prefetch.start); the backfill takes them over and records what an in-process one does."""
    from multiprocessing import forkserver

    from ckptd.daemon import prefetch
    from ckptd.io import observe

    kinds = ("tf1", "tf2", "sharded", "keras")
    results = []
    for mode in ("sequential", "prefetched"):
        base = tmp_path / mode
        base.mkdir()
        rec, watches, engine = _setup(base)
        for i in range(observe.PARALLEL_MIN_RUNS):
            corpus.copy(kinds[i % len(kinds)], base / "runs" / f"r{i}")
        cfg = parse_config(
            {
                "daemon": {"database": str(engine.url)},  # type: ignore[attr-defined]
                "watch": [{"path": str(base / "runs"), "runs": "*"}],
            }
        )
        specs = discover(0, watches[0])
        if mode == "prefetched":
            pool = prefetch.start(cfg, 2)
            assert pool is not None
            rec.register(specs)
            outcomes = [
                rec.reconcile(s, o)
                for s, o in zip(specs, rec.observe_all(specs, 2, prefetched=pool), strict=True)
            ]
            observe.stop_fork_server()
            assert forkserver._forkserver._forkserver_pid is None
            # The database now knows runs: a restart starts nothing early.
            assert prefetch.start(cfg, 2) is None
        else:
            outcomes = rec.reconcile_many(specs)
        assert sum(len(o.recorded) for o in outcomes) > 0
        results.append(_db_rows(engine))
    assert results[0] == results[1]


def test_prefetch_is_dropped_when_the_database_knows_the_runs(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First looks are only used for runs the database knows nothing about: a prefetch that
    turns out stale (another process recorded the runs meanwhile) is closed, not applied."""
    from ckptd.io import observe

    rec, watches, engine = _setup(tmp_path)
    for i in range(3):
        corpus.copy("tf1", tmp_path / "runs" / f"r{i}")
    specs = discover(0, watches[0])
    rec.reconcile_many(specs)  # recorded: no longer unknown
    before = _db_rows(engine)

    class Stale:
        def __init__(self) -> None:
            self.closed = False
            self.requests = [
                observe.Request.first_look(
                    s.path, s.watch.keras_template, observe.STALE_AFTER, s.watch.path
                )
                for s in specs
            ]

        def close(self) -> None:
            self.closed = True

    used: list[object] = []
    real = observe.observe_many

    def spy(requests: object, workers: int, *, pool: object = None) -> object:
        used.append(pool)
        return real(requests, workers, pool=pool)  # type: ignore[arg-type]

    monkeypatch.setattr("ckptd.api.record.observe_many", spy)
    stale = Stale()
    rec.register(specs)
    observations = list(rec.observe_all(specs, 1, prefetched=stale))  # type: ignore[arg-type]
    assert stale.closed and used == [None]
    assert all(o is not None and o.basis is not None for o in observations)
    for s, o in zip(specs, observations, strict=True):
        assert not rec.reconcile(s, o).recorded
    assert _db_rows(engine) == before


def test_prefetch_only_for_a_database_that_knows_no_run(tmp_path: Path, corpus: Corpus) -> None:
    from ckptd.daemon.prefetch import knows_no_run

    url = f"sqlite:///{tmp_path}/ckptd.db"
    assert knows_no_run(url)  # no file yet
    (tmp_path / "ckptd.db").touch()
    assert knows_no_run(url)  # a file without the schema
    rec, watches, _engine = _setup(tmp_path)  # migrated, still no run
    assert knows_no_run(url)
    corpus.copy("tf1", tmp_path / "runs" / "a")
    rec.reconcile_many(discover(0, watches[0]))
    assert not knows_no_run(url)
    assert not knows_no_run("postgresql://ckptd@db/ckptd")
