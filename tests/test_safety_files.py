"""No file in a run can stop ckptd, and nothing outside the watch root is ever read or written.

Issue 10, items 1, 2, 4 (.index and state-file caps), 12 (unreadable run directories) and 16
(a watch path that is a symlink). The live-daemon tests run a real `ckptd run` on real TF
checkpoints; a hostile user plants FIFOs, symlinks and oversized files where checkpoints and
the state file belong.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import parse_config
from ckptd.daemon.reconcile import Reconciler
from ckptd.daemon.runs import discover
from ckptd.io import formats, observe, safeio, statefile
from ckptd.io.formats import CORRUPT, INDEX_MAX_BYTES, scan_run
from ckptd.io.statefile import STATE_FILE_MAX_BYTES, CheckpointState
from ckptd.store import migrate, reads
from ckptd.store import runs as store_runs
from ckptd.store.db import make_engine, session_scope
from ckptd.store.handle import Store
from tests.conftest import (
    ENV,
    PY,
    REPO,
    Corpus,
    DaemonProcess,
    ckptd,
    query,
    wait_for,
    write_config,
)

RETAIN = '\n[watch.retain]\nkeep_last = 1\nmin_age = "0s"\nevery = "1h"\n'
# Root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH is refused by a mode-000 directory like
# any other user: how the tests make a run directory really unreadable when they run as root.
NO_DAC_OVERRIDE = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
)


def _states(db: Path, like: str) -> list[tuple[str, str, str | None]]:
    sql = "select prefix, state, reason from checkpoints where prefix like ? order by prefix"
    return [tuple(r) for r in query(db, sql, like)]  # type: ignore[misc]


def _count(db: Path, like: str, state: str = "complete") -> int:
    sql = "select count(*) from checkpoints where state = ? and prefix like ?"
    return int(query(db, sql, state, like)[0][0])


def _started(d: DaemonProcess) -> bool:
    """The start-up scan finished: past the resume repair and the backfill."""
    return "startup scan recorded" in d.log()


def _snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = os.lstat(path)
    return path.read_bytes(), st.st_ino, st.st_uid, st.st_mtime_ns


# ------------------------------------------------------------------ item 1: symlinked run dir


@pytest.mark.slow
def test_a_symlinked_run_directory_never_leads_prune_or_show_outside_the_root(
    tmp_path: Path, corpus: Corpus, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """`ckptd prune` and the repair at daemon start rewrite state files only through the watch
    root: a run directory swapped for a symlink is left alone, its target never written."""
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, extra=RETAIN, best=False)
    corpus.copy("tf2", root / "a")
    corpus.copy("tf1", root / "b")
    d = daemon_factory(conf)
    wait_for(lambda: _count(db, f"{root}/%") == 6)
    assert d.stop() == 0
    first = ckptd("prune", config=conf)
    assert first.returncode == 0, first.stderr
    assert _count(db, f"{root}/%", "pruned") == 4  # a and b keep their newest only

    # The attack: run a becomes a symlink to a directory outside the root holding a state file
    # (owned by someone else) and an index ckptd would otherwise read.
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "checkpoint"
    victim.write_text('model_checkpoint_path: "ckpt-10"\nall_model_checkpoint_paths: "ckpt-10"\n')
    os.chown(victim, 65534, 65534)
    shutil.copy2(corpus.run_dir("tf2") / "ckpt-30.index", outside / "ckpt-30.index")
    os.rename(root / "a", tmp_path / "a-moved")
    (root / "a").symlink_to(outside)
    before = _snapshot(victim)
    listing = sorted(os.listdir(outside))

    again = ckptd("prune", config=conf)
    assert again.returncode == 0, again.stderr
    assert _snapshot(victim) == before
    assert sorted(os.listdir(outside)) == listing
    show = ckptd("show", "a@30", config=conf)
    assert show.returncode == 1 and "Traceback" not in show.stderr
    assert "symlink" in show.stderr and str(root / "a" / "ckpt-30") in show.stderr, show.stderr

    # Daemon start: the resume repair (runs with pruned checkpoints) refuses it too.
    d2 = daemon_factory(conf)
    wait_for(lambda: _started(d2))
    assert f"{root}/a/checkpoint: not rewritten: " in d2.log()
    assert "'a' is a symlink or not a directory" in d2.log()
    assert _snapshot(victim) == before
    assert sorted(os.listdir(outside)) == listing
    assert _count(db, f"{root}/b/%") == 1  # the bystander run is untouched
    assert d2.stop() == 0
    assert "Traceback" not in d2.log()


def test_state_file_helpers_refuse_a_symlinked_run_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "checkpoint").write_text('model_checkpoint_path: "x"\n')
    root = tmp_path / "root"
    root.mkdir()
    (root / "run").symlink_to(outside)
    assert statefile.read(root / "run", root) is None
    with pytest.raises(safeio.UnsafePath):
        statefile.write_atomic(root / "run", CheckpointState("y", ["y"]), root)
    assert (outside / "checkpoint").read_text() == 'model_checkpoint_path: "x"\n'
    with pytest.raises(safeio.UnsafePath):
        scan_run(root / "run", root=root)
    req = observe.Request.first_look(root / "run", None, 60.0, root)
    assert observe.observe(req).present is False


# ------------------------------------------------------------------ item 2: FIFOs


@pytest.mark.slow
def test_fifos_named_like_checkpoints_are_corrupt_and_the_daemon_goes_on(
    tmp_path: Path, corpus: Corpus, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, rescan="1s")
    corpus.copy("tf2", root / "a")
    d = daemon_factory(conf)
    wait_for(lambda: _count(db, f"{root}/a/%") == 3)
    fifos = ["model.ckpt-5.index", "x.keras", "x.weights.h5"]
    for name in fifos:
        os.mkfifo(root / "a" / name)
    corpus.copy("tf1", root / "b")  # written after the FIFOs: still recorded
    wait_for(lambda: _count(db, f"{root}/b/%") == 3)
    expected = [
        (f"{root}/a/model.ckpt-5", "corrupt", "model.ckpt-5.index: not a regular file"),
        (f"{root}/a/x.keras", "corrupt", "not a regular file"),
        (f"{root}/a/x.weights.h5", "corrupt", "not a regular file"),
    ]
    wait_for(lambda: [s for s in _states(db, f"{root}/a/%") if s[1] == CORRUPT] == expected)
    assert _count(db, f"{root}/a/%") == 3
    assert d.stop() == 0  # SIGTERM is honoured: no thread is stuck in open()
    # A restart with the FIFOs still there gets through its start-up scan.
    corpus.copy("keras", root / "c")
    d2 = daemon_factory(conf)
    wait_for(lambda: _started(d2))
    wait_for(lambda: _count(db, f"{root}/c/%") == 6)
    assert d2.stop() == 0
    assert all(stat.S_ISFIFO(os.lstat(root / "a" / n).st_mode) for n in fifos)
    assert "Traceback" not in d.log() + d2.log()


@pytest.mark.slow
def test_a_fifo_or_dev_zero_state_file_never_hangs_prune_or_daemon_start(
    tmp_path: Path, corpus: Corpus, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, extra=RETAIN, best=False)
    corpus.copy("tf2", root / "a")
    d = daemon_factory(conf)
    wait_for(lambda: _count(db, f"{root}/a/%") == 3)
    assert d.stop() == 0
    state = root / "a" / "checkpoint"
    state.unlink()
    os.mkfifo(state)
    # real: the warning reaches stderr through logging, which pytest captures in-process
    pruned = ckptd("prune", config=conf, timeout=60, real=True)  # before: blocked forever
    assert pruned.returncode == 0, pruned.stderr
    assert f"{state}: not a regular file; not read or rewritten" in pruned.stderr, pruned.stderr
    assert _count(db, f"{root}/a/%", "pruned") == 2
    assert stat.S_ISFIFO(os.lstat(state).st_mode)
    # Daemon start repairs the state file of every run with pruned checkpoints: it must not
    # block there either (a new run is recorded after it).
    corpus.copy("tf1", root / "b")
    d2 = daemon_factory(conf)
    wait_for(lambda: _count(db, f"{root}/b/%") == 3)
    assert d2.stop() == 0
    assert f"{state}: not a regular file; not read or rewritten" in d2.log()
    # A symlink to /dev/zero: never read (before: read until MemoryError).
    state.unlink()
    state.symlink_to("/dev/zero")
    again = ckptd("prune", config=conf, timeout=60, real=True)
    assert again.returncode == 0, again.stderr
    assert "not a regular file (a symlink)" in again.stderr, again.stderr
    d3 = daemon_factory(conf)
    wait_for(lambda: _started(d3))
    assert d3.stop() == 0
    assert os.readlink(state) == "/dev/zero"
    assert "Traceback" not in d2.log() + d3.log()


def test_show_refuses_a_fifo_index_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.ckpt-5.index")
    result = ckptd("show", str(tmp_path / "model.ckpt-5"), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ckptd: {tmp_path}/model.ckpt-5.index cannot be read: not a regular file"
    ]


# ------------------------------------------------------------------ item 4: caps


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)  # costs nothing on disk; read whole, it would cost `size` of memory
    return path


def test_an_oversized_index_is_corrupt_naming_the_cap_and_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sparse(tmp_path / "model.ckpt-7.index", 2 << 30)
    (tmp_path / "model.ckpt-7.data-00000-of-00001").write_bytes(b"x" * 16)
    reads: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    (found,) = scan_run(tmp_path)
    assert found.state == CORRUPT
    assert found.reason == f"index is larger than the {INDEX_MAX_BYTES >> 20} MiB cap; not read"
    assert reads == []
    result = ckptd("show", str(tmp_path / "model.ckpt-7"), timeout=60)
    assert result.returncode == 1
    assert f"larger than {INDEX_MAX_BYTES >> 20} MiB" in result.stderr


def test_an_oversized_state_file_is_unreadable_and_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _sparse(tmp_path / "checkpoint", STATE_FILE_MAX_BYTES + 1)
    with caplog.at_level(logging.WARNING):
        assert statefile.read(tmp_path) is None
    assert f"larger than {STATE_FILE_MAX_BYTES:,} bytes" in caplog.text
    assert state.stat().st_size == STATE_FILE_MAX_BYTES + 1


# ------------------------------------------------------------------ item 12: unreadable run dir


def _reconciler(tmp_path: Path) -> tuple[Reconciler, Any, Any]:
    root = tmp_path / "runs"
    root.mkdir()
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/ckptd.db"},
            "watch": [{"path": str(root), "runs": "*"}],
        }
    )
    engine = make_engine(cfg.daemon.database)
    migrate.upgrade(engine)
    return Reconciler(Store(engine)), cfg.watches[0], engine


@pytest.fixture
def failing_listing(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Directories (by path) whose listing fails with EIO, however they are listed."""
    failing: set[str] = set()
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        where = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else os.fspath(path)
        if where in failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO), where)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    yield failing


def test_an_unreadable_run_directory_leaves_its_checkpoints_as_recorded(
    tmp_path: Path, corpus: Corpus, failing_listing: set[str]
) -> None:
    """EIO while listing the run directory (injected at the listing call): nothing turns gone,
    no fingerprint lets a quick rescan skip it, and the next scan that reads it finds all."""
    rec, watch, engine = _reconciler(tmp_path)
    run = corpus.copy("tf2", tmp_path / "runs" / "a")
    (spec,) = discover(0, watch)
    assert len(rec.reconcile(spec).recorded) == 3
    failing_listing.add(str(run))
    for _ in range(2):
        outcome = rec.reconcile(spec)
        assert outcome.gone == [] and outcome.recorded == []
        assert not rec.unchanged(spec)
    with session_scope(engine) as s:
        assert {c.state for c in reads.checkpoints(s)} == {"complete"}
        assert store_runs.resolve_run(s, "a").present
    failing_listing.clear()
    outcome = rec.reconcile(spec)
    assert outcome.gone == [] and outcome.recorded == []
    with session_scope(engine) as s:
        assert [c.state for c in reads.checkpoints(s)] == ["complete"] * 3
    engine.dispose()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.slow
def test_a_run_directory_chmod_000_under_a_live_daemon_turns_nothing_gone(
    tmp_path: Path, corpus: Corpus, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """A real EACCES: the daemon runs without CAP_DAC_OVERRIDE (root otherwise ignores mode 000)."""
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, rescan="1s")
    run = corpus.copy("tf2", root / "a")
    corpus.copy("tf1", root / "b")
    d = daemon_factory(conf, NO_DAC_OVERRIDE if os.geteuid() == 0 else ())
    wait_for(lambda: _count(db, f"{root}/%") == 6)
    os.chmod(run, 0)
    try:
        wait_for(lambda: f"{run}: cannot read the run directory: Permission denied" in d.log())
        seen = _last_rescan(db)
        wait_for(lambda: _last_rescan(db) > seen + 1)  # at least one more full rescan of it
        assert {s for _p, s, _r in _states(db, f"{root}/%")} == {"complete"}
    finally:
        os.chmod(run, 0o755)
    # Readable again: retried at the next scan, all good, and it records new checkpoints.
    for f in run.glob("ckpt-30.*"):
        shutil.copy2(f, run / f.name.replace("ckpt-30", "ckpt-40"))
    wait_for(lambda: _count(db, f"{root}/a/%") == 4)
    assert {s for _p, s, _r in _states(db, f"{root}/%")} == {"complete"}
    assert f"{run}: readable again" in d.log()
    assert d.stop() == 0
    assert "Traceback" not in d.log()


def _last_rescan(db: Path) -> float:
    rows = query(db, "select status from daemons order by id desc limit 1")
    return float(json.loads(rows[0][0]).get("jobs", {}).get("rescan", 0.0)) if rows else 0.0


# ------------------------------------------------------------------ item 16: symlinked root


@pytest.mark.slow
def test_a_single_run_watch_whose_path_is_a_symlink_is_followed(
    tmp_path: Path, corpus: Corpus, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    real = corpus.copy("tf2", tmp_path / "real" / "mnist")
    link = tmp_path / "mnist-link"
    link.symlink_to(real)
    db = tmp_path / "ckptd.db"
    # No periodic rescan in this test: new checkpoints must be seen through filesystem events.
    conf = write_config(tmp_path / "c.toml", link, db=db, runs=None, rescan="1h")
    check = ckptd("config", "check", config=conf)
    assert check.returncode == 0, check.stderr
    d = daemon_factory(conf)
    wait_for(lambda: _count(db, f"{link}/%") == 3)
    assert query(db, "select name, path from runs") == [("mnist-link", str(link))]
    # New checkpoints written through the real path are recorded (the target is watched).
    for f in real.glob("ckpt-30.*"):
        shutil.copy2(f, real / f.name.replace("ckpt-30", "ckpt-40"))
    wait_for(lambda: _count(db, f"{link}/%") == 4)
    # Below the root nothing is followed: a checkpoint file that is a symlink is corrupt.
    outside = corpus.run_dir("tf2")
    (real / "ckpt-50.index").symlink_to(outside / "ckpt-30.index")
    (real / "ckpt-50.data-00000-of-00001").symlink_to(outside / "ckpt-30.data-00000-of-00001")
    wait_for(lambda: _count(db, f"{link}/ckpt-50", "corrupt") == 1)
    assert d.stop() == 0
    assert "Traceback" not in d.log()


def test_fifo_index_read_never_blocks_a_scan_thread(tmp_path: Path) -> None:
    """The scanner itself, without a daemon: a FIFO index returns at once, recorded corrupt."""
    os.mkfifo(tmp_path / "model.ckpt-5.index")
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(scan_run(tmp_path)), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "scan_run blocked on a FIFO"
    (found,) = result[0]
    assert (found.state, found.reason) == (CORRUPT, "model.ckpt-5.index: not a regular file")


def test_discovery_never_enters_a_symlinked_directory_below_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "team-a" / "exp1").mkdir(parents=True)
    (tmp_path / "outside" / "exp2").mkdir(parents=True)
    (root / "team-b").symlink_to(tmp_path / "outside")
    (root / "team-a" / "exp3").symlink_to(tmp_path / "outside" / "exp2")
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/d.db"},
            "watch": [{"path": str(root), "runs": "*/*"}],
        }
    )
    assert [s.name for s in discover(0, cfg.watches[0])] == ["team-a/exp1"]
    assert formats.event_files(root / "team-a" / "exp1", root=root) == []


@pytest.mark.tf
def test_the_worker_never_imports_modules_from_the_callers_directory(tmp_path: Path) -> None:
    """`ckptd evaluate` run from inside a writable run directory: a planted numpy.py there must
    not be what the TensorFlow worker imports."""
    marker = tmp_path / "planted-code-ran"
    (tmp_path / "numpy.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError\n")
    code = (
        "from ckptd.worker.client import WorkerClient\n"
        "c = WorkerClient()\n"
        "print(c.call({'op': 'ping'}, timeout=240))\n"
        "c.terminate()\n"
    )
    env = {**ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [PY, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert not marker.exists(), "the worker imported numpy.py from the caller's directory"
    assert "cannot import the TensorFlow worker" not in out.stdout, out.stdout
