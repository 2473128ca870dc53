"""Issue 10, items 9, 10, 11, 14: the live daemon's health means progress, it notices its database
file vanishing, refuses a second daemon on its database, and survives a reload that fails.

Every test runs real ``ckptd run`` processes on real files and a real SQLite database; systemd's
side of sd_notify is a real AF_UNIX datagram socket bound by the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ENV, PY, Corpus, ckptd, query, wait_for, write_config

pytestmark = pytest.mark.tf


class Notify:
    """What systemd would receive on ``$NOTIFY_SOCKET``: every datagram, in order."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 108 bytes: a short directory, not pytest's tmp_path.
        self.dir = tempfile.mkdtemp(prefix="ckptd-notify-", dir="/tmp")
        self.path = os.path.join(self.dir, "sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def receive(self, seconds: float) -> list[str]:
        """Every datagram that arrives within ``seconds``."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recv(65536).decode())
            except TimeoutError:
                break
        self.messages += got
        return got

    def wait(self, predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.receive(min(0.5, max(deadline - time.monotonic(), 0.01))):
                if predicate(message):
                    return message
        raise AssertionError(f"no such sd_notify message within {timeout} s: {self.messages[-5:]}")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Proc:
    """A real ``ckptd run`` in its own session; its output goes to a log file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [PY, "-m", "ckptd", "--config", str(config), "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**ENV, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: its workers too
        self.proc.wait()


@pytest.fixture
def notify() -> Iterator[Notify]:
    n = Notify()
    yield n
    n.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(config: Path, **env: str) -> Proc:
        p = Proc(config, tmp_path / f"daemon{len(started)}.log", env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        p._log.close()


def status(conf: Path) -> dict[str, Any] | None:
    result = ckptd("status", "--json", config=conf)
    return json.loads(result.stdout) if result.returncode == 0 else None


def wait_alive(conf: Path, p: Proc, timeout: float = 120) -> dict[str, Any]:
    def alive() -> dict[str, Any] | None:
        data = status(conf)
        return data if data and data["daemon"]["alive"] and data["daemon"]["pid"] == p.pid else None

    try:
        result: dict[str, Any] = wait_for(alive, timeout=timeout, interval=0.3)
    except AssertionError as exc:  # say why: exited (and how), or running but never alive
        raise AssertionError(
            f"{exc}; the daemon's exit status: {p.proc.poll()}; status: {status(conf)}; "
            f"its log:\n{p.log()[-4000:]}"
        ) from None
    return result


def recorded(db: Path) -> list[tuple[str, int]]:
    return sorted(
        query(
            db,
            "select r.name, c.step from checkpoints c join runs r on r.id = c.run_id "
            "where c.state = 'complete'",
        )
    )


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold the database's write lock from another process's point of view (a CLI, a backup)."""
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        yield con
    finally:
        con.execute("ROLLBACK")
        con.close()


# ------------------------------------------------------------------ item 9: health is progress


def test_stuck_reconcile_stops_the_watchdog_and_sigterm_still_stops(
    tmp_path: Path, corpus: Corpus, start: Callable[..., Proc], notify: Notify
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf1", root / "a")
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, rescan="1s")
    # WatchdogSec=2: pings every second; an item busy for over 3 s (3 heartbeats) is stuck.
    d = start(conf, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="2000000")
    notify.wait(lambda m: "READY=1" in m, timeout=120)
    notify.wait(lambda m: m == "WATCHDOG=1", timeout=30)

    with write_lock(db):
        corpus.copy("tf2", root / "b")  # a new run: recording it waits for the lock
        stuck = notify.wait(lambda m: "stuck" in m, timeout=30)
        assert "unhealthy" in stuck and "reconcile of" in stuck, stuck
        # From now on systemd gets no WATCHDOG=1 (it would restart the daemon).
        later = notify.receive(2.5)
        assert "WATCHDOG=1" not in later, later
        assert "stuck: reconcile of" in d.log()
        # No heartbeat can be written either: `ckptd status` (a reader) says so.
        data = wait_for(
            lambda: (s := status(conf)) and not s["daemon"]["alive"] and s, timeout=30, interval=0.5
        )
        assert data["daemon"]["unresponsive"] is True
        assert data["daemon"]["healthy"] is False
        text = ckptd("status", config=conf).stdout
        assert "unhealthy" in text and f"pid {d.pid}" in text, text

        # SIGTERM with the lock still held: the daemon still stops, within a bound.
        t0 = time.monotonic()
        os.kill(d.pid, signal.SIGTERM)
        assert d.wait(timeout=60) == 0
        stop_took = time.monotonic() - t0
    assert stop_took < 60

    # What was stuck is done at the next start.
    again = start(conf)
    wait_for(lambda: {n for n, _ in recorded(db)} == {"a", "b"}, timeout=120)
    os.kill(again.pid, signal.SIGTERM)
    assert again.wait(timeout=60) == 0


def test_heartbeat_reports_what_is_stuck(tmp_path: Path, corpus: Corpus) -> None:
    """`ckptd status` names the stuck item when the database still takes the heartbeat (a thread
    stuck outside it). The live test above cannot show this: its stall holds the database."""
    import threading

    from ckptd.config import load_config
    from ckptd.daemon.main import Daemon

    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db)
    daemon = Daemon(load_config(str(conf)))
    daemon.prepare()
    daemon.progress.bound = 0.1
    release = threading.Event()

    def export() -> None:
        with daemon.progress.busy("export of /srv/run"):
            release.wait(30)

    thread = threading.Thread(target=export)
    thread.start()
    try:
        wait_for(lambda: daemon.progress.stuck(), timeout=10)
        daemon.jobs.heartbeat()
        data = status(conf)
        assert data is not None
        assert data["daemon"]["healthy"] is False
        assert [s["what"] for s in data["daemon"]["stuck"]] == ["export of /srv/run"]
        assert "stuck: export of /srv/run" in ckptd("status", config=conf).stdout
    finally:
        release.set()
        thread.join()
    assert daemon.progress.stuck() == []
    daemon.shutdown()


STUCK_FOREVER = """
import sys, threading
from ckptd import logs
from ckptd.config import load_config
from ckptd.daemon.main import Daemon

logs.setup("info")
daemon = Daemon(load_config(sys.argv[1]))
entered = threading.Event()


def export_on_a_dead_mount():  # a job thread that never returns (a hung NFS read, say)
    with daemon.progress.busy("export of /mnt/hung/run"):
        entered.set()
        threading.Event().wait()


threading.Thread(target=export_on_a_dead_mount, name="job").start()  # not a daemon thread
entered.wait()
sys.exit(daemon.run())
"""


def test_sigterm_exits_even_with_a_thread_stuck_forever(tmp_path: Path, corpus: Corpus) -> None:
    """A non-daemon thread that never returns would hold the interpreter's exit forever (as
    APScheduler's pool threads are): the stop waits its grace, marks the daemon stopped, exits."""
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf1", root / "a")
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db)
    log = tmp_path / "d.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PY, "-c", STUCK_FOREVER, str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        try:
            wait_for(lambda: "stuck: export of /mnt/hung/run" in log.read_text(), timeout=120)
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert "exiting now; still busy with: export of /mnt/hung/run" in text
    assert query(db, "select count(*) from daemons where stopped_at is null") == [(0,)]


def test_start_up_that_cannot_finish_exits_1(
    tmp_path: Path, start: Callable[..., Proc], notify: Notify
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db)
    assert ckptd("db", "upgrade", config=conf).returncode == 0
    with write_lock(db):
        d = start(conf, NOTIFY_SOCKET=notify.path, CKPTD_START_TIMEOUT="2")
        code = d.wait(timeout=60)
    assert code == 1
    assert "READY=1" not in notify.receive(0.1) + notify.messages
    assert "start-up did not finish within 2 s (busy with: migrating the database" in d.log()


# ------------------------------------------------------------------ item 10: the database file


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_database_file_gone_exits_and_restart_records_everything(
    tmp_path: Path, corpus: Corpus, start: Callable[..., Proc], how: str
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf1", root / "a")
    corpus.copy("tf2", root / "b")
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, rescan="1h")
    d = start(conf)
    wait_alive(conf, d)  # (alive from its claim on, before its backfill has committed)
    # Each run is recorded in one transaction: once both are there, all of them are.
    before = wait_for(lambda: (r := recorded(db)) and {n for n, _ in r} == {"a", "b"} and r)

    if how == "deleted":
        db.unlink()
    else:  # a restore from an older backup: an empty database of the same schema
        fresh = tmp_path / "fresh.db"
        other = write_config(tmp_path / "o.toml", root, db=fresh)
        assert ckptd("db", "upgrade", config=other).returncode == 0
        os.replace(fresh, db)
    assert d.wait(timeout=30) == 1
    assert f"the database file {db} was {how} while ckptd was running" in d.log(), d.log()

    # The restart (systemd's Restart=on-failure) records everything on disk again.
    again = start(conf)
    wait_alive(conf, again)  # (alive from its claim on, before its backfill has committed)
    wait_for(lambda: recorded(db) == before, timeout=30)
    os.kill(again.pid, signal.SIGTERM)
    assert again.wait(timeout=60) == 0


# ------------------------------------------------------------------ item 11: one daemon


def test_second_daemon_is_refused_and_a_killed_one_does_not_block(
    tmp_path: Path, corpus: Corpus, start: Callable[..., Proc]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf1", root / "a")
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db)
    first = start(conf)
    data = wait_alive(conf, first)

    second = start(conf)
    assert second.wait(timeout=60) == 1
    lines = [ln for ln in second.log().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("ckptd: refusing to start: another ckptd already uses this database")
    assert f"pid {first.pid} on {socket.gethostname()}" in lines[0]
    assert f"running since {data['daemon']['started_at']}" in lines[0]
    assert wait_alive(conf, first)["daemon"]["pid"] == first.pid  # the first is unaffected

    # kill -9 leaves its row unstopped: the next daemon still starts.
    first.kill()
    third = start(conf)
    wait_alive(conf, third)
    assert "IntegrityError" not in first.log() + third.log()
    os.kill(third.pid, signal.SIGTERM)
    assert third.wait(timeout=60) == 0


def test_two_daemons_starting_at_once_exactly_one_wins(
    tmp_path: Path, corpus: Corpus, start: Callable[..., Proc]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf1", root / "a")
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db)
    assert ckptd("db", "upgrade", config=conf).returncode == 0
    for _ in range(3):
        pair = [start(conf), start(conf)]
        loser = wait_for(
            lambda pair=pair: next((p for p in pair if p.proc.poll() is not None), None),
            timeout=120,
        )
        winner = pair[1 - pair.index(loser)]
        assert loser.proc.returncode == 1
        assert f"pid {winner.pid}" in loser.log()
        assert wait_alive(conf, winner)["daemon"]["pid"] == winner.pid
        assert winner.proc.poll() is None
        os.kill(winner.pid, signal.SIGTERM)
        assert winner.wait(timeout=60) == 0
    rows = query(db, "select count(*) from daemons where stopped_at is null")
    assert rows == [(0,)]


# ------------------------------------------------------------------ item 14: reload


TWO_WATCHES = """\
[daemon]
database = "sqlite:///{db}"
rescan_interval = "1s"
heartbeat_interval = "1s"
{watches}
"""
WATCH = """
[[watch]]
path = "{path}"
runs = "*"
{extra}
"""


def two_watch_config(conf: Path, db: Path, watches: list[tuple[Path, str]]) -> Path:
    body = "".join(WATCH.format(path=p, extra=extra) for p, extra in watches)
    conf.write_text(TWO_WATCHES.format(db=db, watches=body))
    return conf


def test_reload_that_fails_to_apply_keeps_the_running_config(
    tmp_path: Path, corpus: Corpus, start: Callable[..., Proc], notify: Notify
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf1", root / "a")
    db = tmp_path / "ckptd.db"
    exports = tmp_path / "exports"
    conf = two_watch_config(tmp_path / "c.toml", db, [(root, "")])
    d = start(conf, NOTIFY_SOCKET=notify.path)
    notify.wait(lambda m: "READY=1" in m, timeout=120)

    # A 5-field crontab that no scheduler accepts (minute 61).
    bad = (
        '[watch.best]\nmetric = "eval/accuracy"\n'
        f'[watch.freeze]\nexport_dir = "{exports}"\ncron = "61 * * * *"\n'
    )
    two_watch_config(conf, db, [(root, bad)])
    os.kill(d.pid, signal.SIGHUP)
    # The reload's own READY=1 carries the failure (later STATUS-only updates repeat it).
    failed = notify.wait(lambda m: "reload failed" in m and "READY=1" in m, timeout=30)
    assert "61" in failed
    assert d.proc.poll() is None
    assert "reload failed, keeping the running config" in d.log()

    # Still running the old config: new checkpoints are recorded, and status says why.
    corpus.copy("tf2", root / "b")
    wait_for(lambda: {n for n, _ in recorded(db)} == {"a", "b"}, timeout=60)
    # `ckptd status` with the file on disk names the mistake itself (exit 78) ...
    bad_status = ckptd("status", config=conf)
    assert bad_status.returncode == 78 and "61" in bad_status.stderr, bad_status
    # ... and, asked with the config the daemon runs, shows the daemon's reload error.
    running = two_watch_config(tmp_path / "running.toml", db, [(root, "")])
    data = wait_for(
        lambda: (s := status(running)) and s["daemon"]["reload_error"] and s, timeout=30
    )
    assert "61" in data["daemon"]["reload_error"]
    assert "reload failed" in ckptd("status", config=running).stdout
    os.kill(d.pid, signal.SIGTERM)
    assert d.wait(timeout=60) == 0


def test_removing_a_watch_that_is_not_the_last(
    tmp_path: Path, corpus: Corpus, start: Callable[..., Proc]
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    corpus.copy("tf1", first / "a")
    corpus.copy("tf1", second / "b")
    db = tmp_path / "ckptd.db"
    keep = '[watch.retain]\nkeep_last = 100\nevery = "1s"\n'
    conf = two_watch_config(tmp_path / "c.toml", db, [(first, ""), (second, keep)])
    d = start(conf)
    wait_alive(conf, d)
    wait_for(lambda: {n for n, _ in recorded(db)} == {"a", "b"}, timeout=60)

    two_watch_config(conf, db, [(second, keep)])
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in d.log(), timeout=30)
    reloaded = time.time()
    # Rescans and the remaining watch's jobs run after the reload, and succeed.
    wait_for(
        lambda: (
            (s := status(conf))
            and all(
                float(s["daemon"]["jobs"].get(job, 0)) > reloaded
                for job in ("rescan", f"prune[{second}]")
            )
        ),
        timeout=60,
        interval=0.3,
    )
    corpus.copy("tf2", second / "c")  # the remaining watch still records
    wait_for(lambda: "c" in {n for n, _ in recorded(db)}, timeout=60)
    log = d.log()
    assert "IndexError" not in log and "failed" not in log, log
    os.kill(d.pid, signal.SIGTERM)
    assert d.wait(timeout=60) == 0
