"""Faults, load and bad input, against the real daemon with real TensorFlow writers.

Every test here is marked ``slow``; run them alone with

    pytest -m slow -s tests/test_faults.py

Sizes come from the environment, so CI runs a small load and a person can run the issue's:
``CKPTD_LOAD_WRITERS`` (default 6), ``CKPTD_LOAD_SECONDS`` (60), ``CKPTD_FAULT_ROUNDS`` (5),
``CKPTD_FAULT_SEED`` (the SIGKILL moments). The issue's size is
``CKPTD_LOAD_WRITERS=20 CKPTD_LOAD_SECONDS=300 CKPTD_FAULT_ROUNDS=20``. The totals (faults injected,
checkpoints involved, lost) are printed (``-s`` shows them) and, when ``CKPTD_FAULT_REPORT`` names
a file, written there as JSON.

"Accounted for" is checked the same way everywhere (``tests/audit.py``): the database, the disk,
the state files and the exports agree.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from ckptd.io import statefile
from tests.audit import SAVED_MODEL_FILES, TMP_PREFIX, audit, converge, count_lost, rows, show
from tests.conftest import ENV, PY, REPO, Corpus, ckptd, query, train, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.tf]

WRITERS = int(os.environ.get("CKPTD_LOAD_WRITERS", "6"))
LOAD_SECONDS = float(os.environ.get("CKPTD_LOAD_SECONDS", "60"))
ROUNDS = int(os.environ.get("CKPTD_FAULT_ROUNDS", "5"))
SEED = int(os.environ.get("CKPTD_FAULT_SEED", "20261122"))
RSS_LIMIT = 250 * 1024 * 1024  # the daemon process alone, never its TensorFlow workers
SAVE_EVERY = 5

# ------------------------------------------------------------------ the report


_RESULTS: dict[str, dict[str, Any]] = {}


def _report(test: str, *, faults: int, checkpoints: int, lost: int, **detail: Any) -> None:
    """Print one test's counts and the running totals; mirror them to $CKPTD_FAULT_REPORT."""
    _RESULTS[test] = {"faults": faults, "checkpoints": checkpoints, "lost": lost, **detail}
    total = {
        k: sum(int(r[k]) for r in _RESULTS.values()) for k in ("faults", "checkpoints", "lost")
    }
    extra = "".join(f", {k} {v}" for k, v in detail.items())
    print(
        f"\n[ckptd faults] {test}: faults injected {faults}, checkpoints involved {checkpoints}, "
        f"lost {lost}{extra}"
    )
    print(
        f"[ckptd faults] total: faults injected {total['faults']}, checkpoints involved "
        f"{total['checkpoints']}, lost {total['lost']}"
    )
    if path := os.environ.get("CKPTD_FAULT_REPORT"):
        doc = {
            "settings": {
                "writers": WRITERS,
                "load_seconds": LOAD_SECONDS,
                "rounds": ROUNDS,
                "seed": SEED,
            },
            "tests": _RESULTS,
            "total": total,
        }
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)


# ------------------------------------------------------------------ processes


def _exited(p: psutil.Process) -> bool:
    """Gone, or a zombie nobody reaps (orphans are re-parented to a pid 1 that may not wait)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _reap(procs: list[psutil.Process]) -> None:
    """Kill worker processes a SIGKILLed daemon left behind (only ours: checked by cmdline)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if not _exited(p) and "ckptd.worker" in " ".join(p.cmdline()):
                p.kill()


class Daemon:
    """A real ``ckptd run`` (or a wrapper around it) in its own session, with the repo importable
    (the python evaluators live in ``tests.daemon_eval_fns``)."""

    def __init__(
        self,
        config: Path,
        log: Path,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config, self.log_path = config, log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            argv or [PY, "-m", "ckptd", "--config", str(config), "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**ENV, "PYTHONPATH": str(REPO), **(env or {})},
            cwd=REPO,
            start_new_session=True,
        )
        self.left_behind: list[psutil.Process] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def registered(self, db: Path) -> bool:
        sql = "select count(*) from daemons where pid = ? and stopped_at is null"
        return self.alive() and query(db, sql, self.pid)[0][0] == 1

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> list[psutil.Process]:
        """SIGKILL, as a crash would; returns the worker processes it had."""
        workers = self.workers()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()
        self.left_behind += workers
        return workers

    def stop(self, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def cleanup(self) -> None:
        if self.alive():
            self.kill()
        self._log.close()
        _reap(self.left_behind)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(
        config: Path, *, argv: list[str] | None = None, env: dict[str, str] | None = None
    ) -> Daemon:
        d = Daemon(config, tmp_path / f"daemon{len(started)}.log", argv, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.cleanup()


def _status(conf: Path) -> dict[str, Any] | None:
    """`ckptd status --json` (a separate process, read-only); None if it failed."""
    result = ckptd("status", "--json", config=conf, timeout=60)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _wait_alive(conf: Path, d: Daemon, timeout: float = 60) -> dict[str, Any]:
    """Until `ckptd status` answers and reports this daemon alive (fresh heartbeat)."""

    def answered() -> dict[str, Any] | None:
        data = _status(conf)
        ok = data and data["daemon"]["alive"] and data["daemon"]["pid"] == d.pid
        return data if ok else None

    data: dict[str, Any] = wait_for(answered, timeout=timeout, interval=0.5)
    return data


# ------------------------------------------------------------------ writers


@dataclass
class Writer:
    """One real TF trainer subprocess; a thread collects the saves it prints."""

    kind: str
    run: Path
    expected: int
    proc: subprocess.Popen[str]
    stderr: Any
    saves: list[dict[str, Any]] = field(default_factory=list)
    reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("event") == "saved":
                    self.saves.append(rec)

    def join(self) -> None:
        """Wait for the protocol stream to end (the trainer has exited)."""
        if self.reader is not None:
            self.reader.join(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.join()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


def _start_writers(root: Path, n: int, seconds: float, logs: Path) -> list[Writer]:
    """``n`` trainers, TF1 and TF2 alternating, one save every 0.5, 0.75 or 1 s, keeping all
    (``--max-to-keep 0``: ckptd is the only thing that deletes)."""
    writers = []
    for i in range(n):
        kind = ("tf1", "tf2")[i % 2]
        interval = (0.5, 0.75, 1.0)[(i // 2) % 3]
        saves = max(2, math.ceil(seconds / interval))
        run = root / kind / f"w{i:02d}"
        # stdout is the trainer's JSON protocol; stderr goes to a file for post-mortems.
        err = (logs / f"writer{i:02d}.log").open("wb")
        proc = subprocess.Popen(
            [
                PY,
                "-m",
                "ckptd.worker.train",
                kind,
                "--out",
                str(run),
                "--steps",
                str(saves * SAVE_EVERY),
                "--save-every",
                str(SAVE_EVERY),
                "--interval",
                str(interval),
                "--max-to-keep",
                "0",
                "--seed",
                str(i),
                "--no-npz",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=ENV,
            cwd=REPO,
        )
        w = Writer(kind, run, saves, proc, err)
        w.reader = threading.Thread(target=w._read, name=f"writer{i}", daemon=True)
        w.reader.start()
        writers.append(w)
    return writers


class RssSampler(threading.Thread):
    """The daemon's resident set size (psutil, the daemon process only), once a second."""

    def __init__(self, pid: Callable[[], int]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.max = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(1.0):
            try:
                rss = psutil.Process(self.pid()).memory_info().rss
            except psutil.Error:
                continue  # between a SIGKILL and the restart
            self.max = max(self.max, rss)
            self.samples += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


# ------------------------------------------------------------------ accounting


def _tmp_dirs(export_dir: Path) -> set[Path]:
    if not export_dir.is_dir():
        return set()
    found = set()
    runs = [p for p in export_dir.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)]
    for d in [export_dir, *runs]:
        found |= {p for p in d.iterdir() if p.name.startswith(TMP_PREFIX)}
    return found


# ------------------------------------------------------------------ configs


def _config(
    path: Path,
    db: Path,
    watches: list[tuple[Path, str]],
    *,
    rescan: str = "2s",
    daemon: str = "",
) -> Path:
    """A config with one ``[[watch]]`` (runs = "*") per (path, extra TOML) pair."""
    text = textwrap.dedent(
        f"""\
        [daemon]
        database = "sqlite:///{db}"
        rescan_interval = "{rescan}"
        heartbeat_interval = "1s"
        {daemon}
        """
    )
    for watch, extra in watches:
        text += f'\n[[watch]]\npath = "{watch}"\nruns = "*"\n{textwrap.dedent(extra)}'
    path.write_text(text)
    return path


BEST = """
[watch.best]
metric = "eval/accuracy"
mode = "max"
"""

EVALUATE_STEP_SCORE = """
[watch.evaluate]
evaluator = "python"
function = "tests.daemon_eval_fns:step_score"
every = "5s"
timeout = "300s"
retry_backoff = "1s"
"""

RETAIN_LOAD = """
[watch.retain]
keep_last = 3
min_age = "0s"
every = "2s"
"""


def _freeze(export_dir: Path, every: str = "3s") -> str:
    return f"""
[watch.freeze]
format = ["saved_model", "frozen_graph"]
export_dir = "{export_dir}"
inputs = {{ x = "x:0" }}
outputs = {{ y = "y:0" }}
every = "{every}"
keep = 2
timeout = "300s"
"""


def _complete(db: Path, like: str) -> int:
    sql = "select count(*) from checkpoints where state = 'complete' and prefix like ?"
    return int(query(db, sql, like)[0][0])


# ------------------------------------------------------------------ load + SIGKILL


@pytest.mark.timeout(int(3 * LOAD_SECONDS + 150 * ROUNDS + 900))
def test_load_with_sigkill_rounds(tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """Real writers save into one watched root while the daemon evaluates, exports (TF1) and
    prunes; it is SIGKILLed at random moments and restarted, and after every restart the DB, the
    disk, the state files and the exports agree. Its RSS stays bounded and `ckptd status`
    always answers with it alive (no deadlock)."""
    root = tmp_path / "runs"
    (root / "tf1").mkdir(parents=True)
    (root / "tf2").mkdir()
    export_dir = tmp_path / "export"
    db = tmp_path / "ckptd.db"
    conf = _config(
        tmp_path / "ckptd.toml",
        db,
        [
            (root / "tf1", BEST + EVALUATE_STEP_SCORE + RETAIN_LOAD + _freeze(export_dir)),
            (root / "tf2", BEST + EVALUATE_STEP_SCORE + RETAIN_LOAD),
        ],
        rescan="5s",
    )
    d = daemons(conf)
    wait_for(lambda: d.registered(db), timeout=60)
    sampler = RssSampler(lambda: d.pid)
    sampler.start()
    logs = tmp_path / "writers"
    logs.mkdir()
    writers = _start_writers(root, WRITERS, LOAD_SECONDS, logs)
    runs = [w.run for w in writers]

    def all_saves() -> list[dict[str, Any]]:
        return [s for w in writers for s in list(w.saves)]

    rng = random.Random(SEED)
    t0 = time.monotonic()
    # Each writer needs ~4 s of CPU to import TensorFlow before its first save.
    startup = 4.0 * WRITERS / (os.cpu_count() or 1)
    kill_at = sorted(rng.uniform(startup, startup + 0.8 * LOAD_SECONDS) for _ in range(ROUNDS))
    kills = status_checks = orphans = 0
    during: dict[str, int] = {"prune": 0, "export": 0, "evaluation": 0}
    orphan_wait = 0.0
    try:
        for k, at in enumerate(kill_at, 1):
            while time.monotonic() - t0 < at:
                time.sleep(0.05)
            pre_tmp = _tmp_dirs(export_dir)
            workers = d.kill()
            kills += 1
            snapshot = all_saves()
            busy = query(
                db,
                "select (select count(*) from checkpoints where state = 'pruning'),"
                " (select count(*) from exports where status = 'exporting'),"
                " (select count(*) from evaluations where status = 'running')",
            )[0]
            for name, n in zip(("prune", "export", "evaluation"), busy, strict=True):
                during[name] += bool(n)
            d = daemons(conf)
            wait_for(lambda new=d: new.registered(db), timeout=60)
            problems = converge(
                lambda s=snapshot, g=pre_tmp: audit(
                    db, runs, s, export_dir, live=True, must_be_gone=g
                ),
                timeout=120,
            )
            assert not problems, show(problems, f"after SIGKILL round {k} and restart")
            # The killed daemon's TF worker must not outlive it for long (it runs in its own
            # session, so the kill does not reach it; it should notice its parent is gone).
            t_kill = time.monotonic()
            orphans += sum(not _exited(p) for p in workers)
            wait_for(lambda w=workers: all(_exited(p) for p in w), timeout=120, interval=0.2)
            orphan_wait = max(orphan_wait, time.monotonic() - t_kill)
            _wait_alive(conf, d)
            status_checks += 1
        # The rest of the load with one daemon, polled for liveness.
        deadline = t0 + 3 * (startup + LOAD_SECONDS) + 300
        while any(w.proc.poll() is None for w in writers) and time.monotonic() < deadline:
            _wait_alive(conf, d)
            status_checks += 1
            time.sleep(5)
        for w in writers:
            assert w.proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, (
                f"writer {w.run} failed; see {logs}"
            )
            w.join()
            assert len(w.saves) == w.expected, (w.run, len(w.saves), w.expected)
        saves = all_saves()
        # Quiet now: everything must agree without a restart, except that a TF2 trainer's last
        # save re-listed checkpoints ckptd had pruned, in a state file ckptd only rewrites when it
        # next deletes something (test_state_file_relisted_by_a_live_trainer_is_repaired).
        problems = converge(
            lambda: audit(db, runs, saves, export_dir, live=False, relisted=True), timeout=180
        )
        lost = count_lost(db, saves)
        unevaluated_sql = (
            "select count(*) from checkpoints c left join evaluations e on e.checkpoint_id = c.id"
            " where c.state = 'complete' and (e.status is null or e.status != 'done')"
        )
        wait_for(lambda: query(db, unevaluated_sql)[0][0] == 0, timeout=180, interval=0.5)
        published_runs = query(
            db,
            "select count(distinct c.run_id) from exports e join checkpoints c"
            " on c.id = e.checkpoint_id where e.status = 'published'",
        )[0][0]
        counts = dict(query(db, "select kind, count(*) from actions group by kind"))
        evaluated = query(db, "select count(*) from evaluations where status = 'done'")[0][0]
        _wait_alive(conf, d)
        status_checks += 1
        assert d.stop() == 0
        # A clean restart changes nothing and then everything agrees strictly.
        d = daemons(conf)
        wait_for(lambda: d.registered(db), timeout=60)
        after_restart = converge(
            lambda: audit(db, runs, saves, export_dir, live=False), timeout=120
        )
        assert d.stop() == 0
        tracebacks = [f.name for f in tmp_path.glob("daemon*.log") if "Traceback" in f.read_text()]
    finally:
        sampler.stop()
        for w in writers:
            w.close()
    pruned = sum(1 for st, *_ in rows(db).values() if st == "pruned")
    _report(
        "load_with_sigkill_rounds",
        faults=kills,
        checkpoints=len(saves),
        lost=lost,
        writers=WRITERS,
        load_seconds=LOAD_SECONDS,
        pruned=pruned,
        evaluated=evaluated,
        exports_published=counts.get("exported", 0),
        kills_during_prune=during["prune"],
        kills_during_export=during["export"],
        kills_during_evaluation=during["evaluation"],
        workers_outliving_a_kill=orphans,
        max_orphan_seconds=round(orphan_wait, 1),
        status_checks=status_checks,
        max_rss_mb=round(sampler.max / 2**20, 1),
        rss_samples=sampler.samples,
    )
    assert not problems, show(problems, "after the load, quiet, no restart")
    assert not after_restart, show(after_restart, "after a clean restart")
    assert lost == 0
    assert not tracebacks, f"the daemon logged exceptions: see {tracebacks} in {tmp_path}"
    assert published_runs == WRITERS // 2 + WRITERS % 2  # every TF1 run exported its best
    assert sampler.samples > 0 and sampler.max < RSS_LIMIT, (
        f"daemon RSS {sampler.max / 2**20:.0f} MB"
    )


def test_state_file_relisted_by_a_live_trainer_is_repaired(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon]
) -> None:
    """A TF2 trainer (CheckpointManager, max_to_keep=None) rewrites the state file at every save
    from its own list, so it re-lists what ckptd pruned. The next retention pass must repair the
    file even when it has nothing new to delete: after the trainer's last save nothing else will
    (the load test above sees this whenever the last-but-three checkpoint is the best)."""
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    retain = '\n[watch.retain]\nkeep_last = 1\nmin_age = "0s"\nevery = "1s"\n'
    conf = _config(tmp_path / "c.toml", db, [(root, retain)])
    run = corpus.copy("tf2", root / "a")
    d = daemons(conf)

    def listed() -> list[str] | None:
        state = statefile.read(run)
        return state.all_model_checkpoint_paths if state else None

    wait_for(lambda: listed() == ["ckpt-30"], timeout=30)
    # The trainer's next save, as CheckpointManager writes it (temp file, rename): all three.
    relisted = statefile.read(corpus.run_dir("tf2"))
    assert relisted is not None and len(relisted.all_model_checkpoint_paths) == 3
    statefile.write_atomic(run, relisted)
    wait_for(lambda: listed() == ["ckpt-30"], timeout=15)
    problems = audit(db, [run], [], live=False)
    assert not problems, show(problems, "after the trainer re-listed pruned checkpoints")
    assert d.stop() == 0


# ------------------------------------------------------------------ inotify exhausted

# The daemon, with watchdog's inotify watch creation failing as the kernel fails it when
# fs.inotify.max_user_watches is used up (ENOSPC). Lowering the real sysctl would starve every
# other process on this shared machine (and CI's), so the failure is injected in the process.
# "all": even the watch root cannot be watched (ckptd must fall back to polling);
# "subdirs": the root is watched but no directory below it (the limit is hit part-way, which
# watchdog swallows for subdirectories: only the periodic rescan can catch what lands there).
INOTIFY_EXHAUSTED = textwrap.dedent(
    """
    import errno, os, sys
    from watchdog.observers import inotify_c

    mode, root = os.environ["CKPTD_TEST_INOTIFY"], os.fsencode(os.environ["CKPTD_TEST_ROOT"])
    real = inotify_c.InotifyFD._get_or_create_watch

    def exhausted(self, path, mask):
        if mode == "all" or path != root:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real(self, path, mask)

    inotify_c.InotifyFD._get_or_create_watch = exhausted
    from ckptd.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("mode", ["all", "subdirs"])
def test_inotify_limit_exhausted_nothing_missed(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon], mode: str
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    # "all": no rescan within the test, so only the polling fallback can see new checkpoints.
    conf = _config(tmp_path / "c.toml", db, [(root, "")], rescan="1h" if mode == "all" else "2s")
    d = daemons(
        conf,
        argv=[PY, "-c", INOTIFY_EXHAUSTED, "--config", str(conf), "run"],
        env={"CKPTD_TEST_INOTIFY": mode, "CKPTD_TEST_ROOT": str(root)},
    )
    wait_for(lambda: d.registered(db), timeout=60)
    _wait_alive(conf, d)

    def observed() -> dict[str, Any] | None:
        # Until the first heartbeat a starting daemon lists its watches as "starting".
        watches = _status(conf)["daemon"]["watches"]
        return watches[0] if watches and watches[0]["observer"] != "starting" else None

    watch = wait_for(observed, timeout=60, interval=0.5)
    if mode == "all":
        assert "falling back to polling" in d.log()
        assert watch["observer"] == "polling" and watch["alive"]
    # Written after the daemon started: copies of real runs, and a real trainer saving live.
    for kind in ("tf1", "tf2", "sharded"):
        corpus.copy(kind, root / kind)
    saves = train("tf2", root / "live", "--steps", "20", "--save-every", "5", "--interval", "0.2")
    expected = sum(len(corpus.saves[k]) for k in ("tf1", "tf2", "sharded")) + len(saves)
    wait_for(lambda: _complete(db, f"{root}/%") == expected, timeout=60)
    runs = [root / k for k in ("tf1", "tf2", "sharded", "live")]
    problems = audit(db, runs, saves, live=False)
    assert not problems, show(problems, "inotify exhausted")
    assert d.alive()
    assert d.stop() == 0
    _report(
        f"inotify_exhausted[{mode}]", faults=1, checkpoints=expected, lost=count_lost(db, saves)
    )


# ------------------------------------------------------------------ watched directory deleted


def test_watched_directories_deleted_and_recreated(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = _config(tmp_path / "c.toml", db, [(root, "")], rescan="1s")
    corpus.copy("tf1", root / "a")
    corpus.copy("tf2", root / "b")
    d = daemons(conf)
    wait_for(lambda: _complete(db, f"{root}/%") == 6, timeout=60)

    def states(like: str) -> list[tuple[str, str]]:
        """The live rows: a copy seen half-done can leave a ``replaced`` row, which is history
        and stays so whatever becomes of the directory."""
        sql = "select state, reason from checkpoints where prefix like ? and state != 'replaced'"
        return query(db, sql, like)

    # A run directory deleted: its checkpoints become gone, with the reason. `rm -r` removes
    # the files one by one, so a scan in between rightly finds some deleted in a directory
    # that is still there (test_reconcile checks the reason of a directory gone at once).
    shutil.rmtree(root / "a")
    reasons = {"run directory is gone", "deleted outside ckptd"}
    wait_for(lambda: [s for s, _ in states(f"{root}/a/%")] == ["gone"] * 3)
    assert {r for _, r in states(f"{root}/a/%")} <= reasons
    # Recreated with new checkpoints: recorded.
    corpus.copy("tf2", root / "a")
    wait_for(lambda: _complete(db, f"{root}/a/ckpt-%") == 3, timeout=30)
    # The watch root itself deleted: everything under it becomes gone; the observer is stopped.
    shutil.rmtree(root)
    wait_for(lambda: {s for s, _ in states(f"{root}/%")} == {"gone"}, timeout=30)
    wait_for(lambda: f"stopped watching {root} (directory is gone)" in d.log(), timeout=30)
    # Recreated: watched again (the periodic rescan restarts the observer), new runs recorded,
    # including a checkpoint a real trainer saves after the recreation.
    root.mkdir()
    corpus.copy("sharded", root / "c")
    corpus.copy("tf1", root / "b")
    wait_for(lambda: f"watching {root} (inotify)" in d.log(), timeout=30)
    saves = train("tf2", root / "d", "--steps", "10", "--save-every", "5")
    wait_for(lambda: _complete(db, f"{root}/c/%") == 2, timeout=30)
    wait_for(lambda: _complete(db, f"{root}/b/model.ckpt-%") == 3, timeout=30)
    wait_for(lambda: _complete(db, f"{root}/d/%") == 2, timeout=30)
    assert query(db, "select name, present from runs order by name") == [
        ("a", 0),
        ("b", 1),
        ("c", 1),
        ("d", 1),
    ]
    _wait_alive(conf, d)
    wait_for(lambda: _status(conf)["daemon"]["watches"][0]["alive"], timeout=60, interval=0.5)
    assert d.stop() == 0
    involved = query(db, "select count(*) from checkpoints")[0][0]
    _report("watched_dirs_deleted", faults=2, checkpoints=involved, lost=count_lost(db, saves))


# ------------------------------------------------------------------ database locked


def test_database_locked_by_a_long_reader_and_a_writer(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = _config(tmp_path / "c.toml", db, [(root, "")], rescan="1s")
    corpus.copy("tf1", root / "a")
    d = daemons(conf)
    wait_for(lambda: _complete(db, f"{root}/%") == 3, timeout=60)
    # A long reader (a read transaction open across many rescans, e.g. a stuck report script):
    # in WAL mode it must not stop the daemon from recording.
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("BEGIN")
        seen = reader.execute("select count(*) from checkpoints").fetchone()[0]
        corpus.copy("tf2", root / "b")
        wait_for(lambda: _complete(db, f"{root}/b/%") == 3, timeout=30)
        assert reader.execute("select count(*) from checkpoints").fetchone()[0] == seen
    finally:
        reader.close()
    # A writer holding the write lock (BEGIN IMMEDIATE) for longer than a rescan and longer than
    # the daemon's busy timeout (10 s): its writes fail meanwhile; nothing may be lost.
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        corpus.copy("sharded", root / "c")
        held = time.monotonic()
        wait_for(lambda: "database is locked" in d.log(), timeout=60)
        time.sleep(max(0.0, 12 - (time.monotonic() - held)))  # the fault: hold it 12 s
        assert d.alive()
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    wait_for(lambda: _complete(db, f"{root}/c/%") == 2, timeout=60)
    _wait_alive(conf, d)
    # And new checkpoints after the lock are recorded too.
    corpus.copy("tf2", root / "e")
    wait_for(lambda: _complete(db, f"{root}/e/%") == 3, timeout=30)
    problems = audit(db, [root / r for r in "abce"], [], live=False)
    assert not problems, show(problems, "after the lock")
    assert d.stop() == 0
    _report("database_locked", faults=2, checkpoints=11, lost=11 - _complete(db, f"{root}/%"))


# ------------------------------------------------------------------ full disks


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tiny tmpfs at ``path`` (root only); skips the test when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Write a file until the filesystem is full (ENOSPC); returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return filler
    finally:
        os.close(fd)


def test_disk_full_during_export_publishes_nothing_partial(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    corpus.copy("tf1", root / "a")
    with _tmpfs(tmp_path / "export", "32k") as export_dir:
        # Failed exports back off (as evaluations): retried soon here, and never given up.
        retry = 'retry_backoff = "1s"\nmax_attempts = 100\n'
        conf = _config(
            tmp_path / "c.toml", db, [(root, BEST + _freeze(export_dir, every="2s") + retry)]
        )
        d = daemons(conf)
        failed = wait_for(
            lambda: query(db, "select path, error from exports where status = 'failed'"),
            timeout=120,
        )
        error = failed[0][1]
        assert "space" in error.lower(), error
        assert not list((export_dir / "a").glob("[0-9]*")), "a partial export was published"
        assert not query(db, "select * from exports where status = 'published'")
        kinds = [a["kind"] for a in json.loads(ckptd("events", "--json", config=conf).stdout)]
        assert "export_failed" in kinds
        # The daemon keeps running and recording.
        corpus.copy("tf2", root / "b")
        wait_for(lambda: _complete(db, f"{root}/b/%") == 3, timeout=30)
        _wait_alive(conf, d)
        # Space comes back: the next scheduled export publishes a complete, verified model.
        subprocess.run(["mount", "-o", "remount,size=64m", str(export_dir)], check=True)
        (published,) = wait_for(
            lambda: query(db, "select path, verified from exports where status = 'published'"),
            timeout=120,
        )
        assert published[1] == 1
        assert all((Path(published[0]) / f).is_file() for f in SAVED_MODEL_FILES)
        assert d.stop() == 0
        assert not _tmp_dirs(export_dir), "a temp export survived"
        problems = audit(db, [root / "a", root / "b"], [], export_dir, live=False)
        assert not problems, show(problems, "after the full disk")
        failures = query(db, "select count(*) from exports where status = 'failed'")[0][0]
    _report("disk_full_during_export", faults=failures, checkpoints=6, lost=0)


def test_database_disk_full_then_freed_loses_nothing(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf1", root / "a")
    with _tmpfs(tmp_path / "dbfs", "1m") as dbfs:
        db = dbfs / "ckptd.db"
        conf = _config(tmp_path / "c.toml", db, [(root, "")], rescan="1s")
        d = daemons(conf)
        wait_for(lambda: _complete(db, f"{root}/%") == 3, timeout=60)
        filler = _fill(dbfs)
        corpus.copy("tf2", root / "b")  # its reconcile cannot commit
        wait_for(lambda: f"reconciling {root}/b failed" in d.log(), timeout=60)
        assert d.alive()
        filler.unlink()
        wait_for(lambda: _complete(db, f"{root}/b/%") == 3, timeout=30)
        corpus.copy("sharded", root / "c")
        wait_for(lambda: _complete(db, f"{root}/c/%") == 2, timeout=30)
        problems = audit(db, [root / r for r in "abc"], [], live=False)
        assert not problems, show(problems, "after the database's disk was full")
        assert d.stop() == 0
    _report("database_disk_full", faults=1, checkpoints=8, lost=0)


# ------------------------------------------------------------------ worker crash


def test_crashing_evaluator_is_recorded_and_the_daemon_goes_on(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    evaluate = """
    [watch.evaluate]
    evaluator = "python"
    function = "tests.daemon_eval_fns:crash"
    every = "1s"
    max_attempts = 2
    retry_backoff = "1s"
    """
    conf = _config(tmp_path / "c.toml", db, [(root, evaluate)])
    run = corpus.copy("tf2", root / "a")
    for f in run.glob("ckpt-[12]0.*"):  # one checkpoint: each attempt costs a fresh worker
        f.unlink()
    d = daemons(conf)
    (_, attempts, error), *_ = wait_for(
        lambda: query(
            db, "select status, attempts, error from evaluations where status = 'failed'"
        ),
        timeout=120,
    )
    assert attempts == 2 and "worker died (signal SIGKILL)" in error, error
    failures = query(db, "select reason, detail from actions where kind = 'evaluation_failed'")
    assert len(failures) == 2 and json.loads(failures[-1][1])["final"] is True
    assert d.alive()
    corpus.copy("tf1", root / "b")
    wait_for(lambda: _complete(db, f"{root}/b/%") == 3, timeout=30)
    _wait_alive(conf, d)
    assert d.stop() == 0
    _report("crashing_evaluator", faults=2, checkpoints=4, lost=4 - _complete(db, f"{root}/%"))


# ------------------------------------------------------------------ SIGKILL in the publish window


def _write_eval_event(run: Path, step: int, **scalars: float) -> Path:
    """An ``eval/`` event file, as the trainer's eval FileWriter writes it."""
    path = run / "eval" / f"events.out.tfevents.{int(time.time())}.injected"
    with path.open("wb") as fh:
        writer = RecordWriter(fh)
        writer.write(
            event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
        )
        values = [summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in scalars.items()]
        event = event_pb2.Event(
            wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
        )
        writer.write(event.SerializeToString())
    return path


# The daemon, stopped (SIGSTOP) right after its first export's rename into place, inside the
# transaction that commits it as published (store/exports.published).
STOP_AFTER_FIRST_RENAME = textwrap.dedent(
    """
    import signal, sys, threading
    from ckptd.store import exports

    real, stopped = exports.published, []

    def published(*args, publish=None, **kwargs):
        def then_stop():
            publish()
            if not stopped:
                stopped.append(True)
                # To this thread: a stop sent to the process goes to its main thread first,
                # and this one could commit before the stop reached it.
                signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

        return real(*args, publish=then_stop if publish else None, **kwargs)

    exports.published = published
    from ckptd.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_between_export_rename_and_commit(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon]
) -> None:
    """The narrowest crash window of an export: the verified model was renamed to its numeric
    name, the ``published`` commit has not happened. Random kills rarely land there, so the
    daemon stops itself inside the window and is killed there. After the restart the
    directory must be accounted for (published, or removed), even once a better checkpoint is
    exported instead."""
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    export_dir = tmp_path / "export"
    run = corpus.copy("tf1", root / "a")
    # Steps by file name: the "better checkpoint" below is a copy of ckpt-30 named ckpt-40.
    by_name = 'step_variable = "none"\n'
    conf = _config(
        tmp_path / "c.toml", db, [(root, by_name + BEST + _freeze(export_dir, every="1s"))]
    )
    d = daemons(conf, argv=[PY, "-c", STOP_AFTER_FIRST_RENAME, "--config", str(conf), "run"])
    wait_for(lambda: psutil.Process(d.pid).status() == psutil.STATUS_STOPPED, timeout=120)
    ((path,),) = query(db, "select path from exports where status = 'exporting'")
    assert Path(path).is_dir()  # renamed: published on disk, its commit not done
    d.kill()
    # While the daemon is down, training goes on: a better checkpoint (step 40) is saved.
    for f in run.glob("model.ckpt-30.*"):
        shutil.copy2(f, run / f.name.replace("-30.", "-40."))
    _write_eval_event(run, 40, accuracy=1.0, loss=0.0)
    d = daemons(conf)
    best_sql = (
        "select count(*) from exports e join checkpoints c on c.id = e.checkpoint_id"
        " where e.status = 'published' and c.step = 40"
    )
    wait_for(lambda: query(db, best_sql)[0][0] == 1, timeout=120)
    problems = converge(lambda: audit(db, [run], [], export_dir, live=False), timeout=30)
    assert d.stop() == 0
    _report("sigkill_in_publish_window", faults=1, checkpoints=4, lost=0)
    assert not problems, show(problems, "after a SIGKILL between rename and commit")


# ------------------------------------------------------------------ bad input

TYPOS = """\
[daemon]
databse = "sqlite:////tmp/never.db"
rescan_intervall = "1s"

[[watch]]
pth = "/data/runs"
runs = "*"
obsever = "polling"

[watch.retian]
keep_lats = 3
"""


def test_bad_input_gets_a_reason_and_the_daemon_goes_on(
    tmp_path: Path, corpus: Corpus, daemons: Callable[..., Daemon]
) -> None:
    """All of it in one daemon run: each bad input is recorded with its reason (or ignored, when
    ignoring it is right), nothing outside the root is touched, and a good checkpoint saved
    afterwards is recorded."""
    root = tmp_path / "runs"
    root.mkdir()
    staging = tmp_path / "staging"
    outside = tmp_path / "outside"
    outside.mkdir()
    db = tmp_path / "ckptd.db"
    retain = '\n[watch.retain]\nkeep_last = 1\nmin_age = "0s"\nevery = "1s"\n'
    conf = _config(tmp_path / "c.toml", db, [(root, retain)], rescan="1s")
    good_config = conf.read_text()
    corpus.copy("tf1", root / "good")
    d = daemons(conf)
    wait_for(lambda: query(db, "select count(*) from checkpoints")[0][0] == 3, timeout=60)
    rng = random.Random(SEED)
    long_ago = time.time() - 3600
    # Each bad run is prepared aside, then renamed into the root (appears at once).
    staged: dict[str, Path] = {}

    def stage(name: str, kind: str) -> Path:
        staged[name] = corpus.copy(kind, staging / name)
        return staged[name]

    # A truncated .index, unchanged for an hour (not a save in progress): corrupt.
    run = stage("truncated", "tf2")
    index = run / "ckpt-30.index"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    for f in run.glob("ckpt-30.*"):
        os.utime(f, (long_ago, long_ago))
    # A data shard of garbage, of the wrong size: corrupt.
    run = stage("garbage", "tf2")
    (run / "ckpt-30.data-00000-of-00001").write_bytes(rng.randbytes(100))
    # An event file of random bytes: reported, skipped; the run's checkpoints still recorded.
    run = stage("events", "tf2")
    (run / "eval" / "events.out.tfevents.1.garbage").write_bytes(rng.randbytes(4096))
    # A state file pointing nowhere: checkpoints are found by listing the directory.
    run = stage("nowhere", "tf2")
    (run / "checkpoint").write_text(
        'model_checkpoint_path: "/nonexistent/ckpt-999"\n'
        'all_model_checkpoint_paths: "/nonexistent/ckpt-999"\n'
        'all_model_checkpoint_paths: "ckpt-12345"\n'
    )
    # Non-UTF-8 names: a checkpoint's files beside good ones, and a whole run directory.
    run = stage("badname", "tf1")
    bad_files = []
    for f in run.glob("model.ckpt-10.*"):
        bad = os.fsencode(run) + b"/ckpt-\xff" + os.fsencode(f.name[len("model.ckpt-10") :])
        with open(bad, "wb") as fh:
            fh.write(f.read_bytes())
        bad_files.append(os.fsencode(root / "badname") + bad[len(os.fsencode(run)) :])
    stage("badrun", "tf2")
    # A state-file entry escaping the root (../) to a real checkpoint outside it.
    for f in corpus.run_dir("tf1").glob("model.ckpt-10.*"):
        shutil.copy2(f, outside / f.name.replace("model.ckpt-10", "model.ckpt-1"))
    outside_before = {f.name: f.read_bytes() for f in outside.iterdir()}
    run = stage("escape", "tf2")
    entries = ["../../outside/model.ckpt-1", "ckpt-10", "ckpt-20", "ckpt-30"]
    (run / "checkpoint").write_text(
        'model_checkpoint_path: "../../outside/model.ckpt-1"\n'
        + "".join(f'all_model_checkpoint_paths: "{e}"\n' for e in entries)
    )
    state = staged["badname"] / "checkpoint"  # TF1 writes absolute paths: as if saved in place
    state.write_text(state.read_text().replace(str(staging), str(root)))
    for name, path in staged.items():
        dest = os.fsencode(root) + b"/run-\xfe" if name == "badrun" else os.fsencode(root / name)
        os.rename(path, dest)

    def row(prefix: Path) -> tuple[str, str | None] | None:
        rows = query(db, "select state, reason from checkpoints where prefix = ?", str(prefix))
        return rows[0] if rows else None

    truncated = wait_for(lambda: (r := row(root / "truncated/ckpt-30")) and r[0] == "corrupt" and r)
    assert "index truncated" in truncated[1], truncated
    garbage = wait_for(lambda: (r := row(root / "garbage/ckpt-30")) and r[0] == "corrupt" and r)
    assert "data shard 00000 has 100 bytes, the index needs" in garbage[1], garbage

    def actions(kind: str) -> list[tuple[str, str]]:
        return query(db, "select subject, reason from actions where kind = ?", kind)

    ((subject, reason),) = wait_for(lambda: actions("event_file_corrupt"))
    assert subject == str(root / "events/eval/events.out.tfevents.1.garbage")
    assert "corrupt record" in reason, reason
    # Reported once per name, with the undecodable byte shown escaped; never recorded, never
    # deleted. The same for a run directory whose name is not UTF-8.
    names = {"ckpt-\\xff.index", "ckpt-\\xff.data-00000-of-00001", "ckpt-\\xff.meta"}
    unsupported = wait_for(lambda: len(a := actions("unsupported_name")) >= 3 and a)
    assert names <= {s for s, _ in unsupported}, unsupported
    assert all("not valid UTF-8" in r for _, r in unsupported), unsupported
    wait_for(lambda: any("run-\\xfe" in s for s, _ in actions("unsupported_name")), timeout=10)
    for name in ("events", "nowhere", "escape", "badname"):
        wait_for(lambda n=name: query(db, "select count(*) from runs where name = ?", n)[0][0])
    # Retention ran over all of it (keep_last = 1) without deleting anything it did not record.
    wait_for(
        lambda: (
            query(
                db,
                "select count(*) from checkpoints where state = 'pruned' and prefix like ?",
                f"{root}/escape/%",
            )[0][0]
            == 2
        ),
        timeout=30,
    )
    assert {f.name: f.read_bytes() for f in outside.iterdir()} == outside_before
    assert not query(db, "select prefix from checkpoints where prefix not like ?", f"{root}/%")
    assert all(os.path.exists(b) for b in bad_files)
    # A config full of typos: refused before starting, one line for each bad key.
    typos = tmp_path / "typos.toml"
    typos.write_text(TYPOS)
    result = ckptd("run", config=typos)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert lines[0] == (
        f'ckptd: config error: {typos}: daemon.databse: unknown key (did you mean "database"?); '
        "known keys: database, rescan_interval, heartbeat_interval, log_level, metrics_address, "
        "debounce, name, lease_ttl, evaluate_on"
    )
    keys = [line.split(": ")[3] for line in lines]
    assert keys == [
        "daemon.databse",
        "daemon.rescan_intervall",
        "watch[0].pth",
        "watch[0].obsever",
        "watch[0].retian",
        "watch[0].path",
    ]
    # … and sent to the running daemon by SIGHUP: it keeps its config and keeps running.
    conf.write_text(TYPOS)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, keeping the running config" in d.log(), timeout=30)
    assert 'daemon.databse: unknown key (did you mean "database"?)' in d.log()
    conf.write_text(good_config)
    # After all that, a good checkpoint saved by a real trainer is still recorded.
    saves = train("tf2", root / "later", "--steps", "10", "--save-every", "5")
    corrupt = {str(root / "truncated/ckpt-30"), str(root / "garbage/ckpt-30")}
    runs = [root / n for n in ("good", "later", *staged) if n != "badrun"]
    problems = converge(lambda: audit(db, runs, saves, live=False, corrupt=corrupt), timeout=30)
    assert not problems, show(problems, "after the bad input")
    assert d.alive()
    _wait_alive(conf, d)
    assert d.stop() == 0
    assert "Traceback" not in d.log(), "bad input must be reported, not crash a scan"
    involved = query(db, "select count(*) from checkpoints")[0][0]
    _report("bad_input", faults=8, checkpoints=involved, lost=count_lost(db, saves))
