"""Running as a service: sd_notify on a real socket, reload, stop, journald levels, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ENV, PY, REPO, Corpus, query, wait_for, write_config


class NotifySocket:
    """What systemd does: a datagram socket the daemon writes READY=1 etc. to."""

    def __init__(self, path: Path | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:  # abstract namespace: NOTIFY_SOCKET=@name
            name = f"ckptd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                return self.messages

    def wait_for(self, text: str, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.drain()):
                return self.messages
        raise AssertionError(f"no {text!r} from the daemon within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def _start(conf: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "ckptd", "--config", str(conf), "run"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**ENV, **env},
        start_new_session=True,
        cwd=REPO,
    )


@pytest.mark.parametrize("abstract", [False, True])
@pytest.mark.slow
def test_sd_notify_ready_status_watchdog_reload_stopping(
    tmp_path: Path, corpus: Corpus, abstract: bool
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf1", root / "a")
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db)
    notify = NotifySocket(None if abstract else tmp_path / "notify.sock")
    proc = _start(conf, tmp_path / "d.log", NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="1000000")
    try:
        notify.wait_for("READY=1")
        # READY comes after migrations and the first full scan: everything is recorded by then.
        assert query(db, "select count(*) from checkpoints where state = 'complete'") == [(3,)]
        notify.wait_for("STATUS=watching 1 path(s); 3 complete")
        n = len(notify.drain())
        notify.wait_for("WATCHDOG=1")  # every WATCHDOG_USEC / 2 while healthy
        time.sleep(1.2)
        assert sum("WATCHDOG=1" in m for m in notify.drain()[n:]) >= 2
        # A reload with a valid config …
        proc.send_signal(signal.SIGHUP)
        msgs = notify.wait_for("configuration reloaded")
        reload_msg = next(m for m in msgs if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reload_msg
        # … and with an invalid one: the old config stays, and STATUS says so.
        good = conf.read_text()
        conf.write_text(good.replace('mode = "max"', 'mode = "maximum"'))
        proc.send_signal(signal.SIGHUP)
        msgs = notify.wait_for("STATUS=reload failed")
        failed = next(m for m in msgs if "STATUS=reload failed" in m)
        assert 'expected "min" or "max", got "maximum"' in failed
        # The live STATUS keeps saying so until a reload succeeds.
        notify.wait_for("reload failed, running the previous config")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        notify.wait_for("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    log = (tmp_path / "d.log").read_text()
    assert "reload failed, keeping the running config" in log


@pytest.mark.slow
def test_reload_applies_added_watch_without_restart(tmp_path: Path, corpus: Corpus) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", first, db=db)
    proc = _start(conf, tmp_path / "d.log")
    try:
        wait_for(lambda: query(db, "select count(*) from daemons")[0][0] == 1)
        text = conf.read_text() + f'\n[[watch]]\npath = "{second}"\nruns = "*"\n'
        conf.write_text(text)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in (tmp_path / "d.log").read_text())
        corpus.copy("tf2", second / "new")
        wait_for(
            lambda: (
                query(db, "select count(*) from checkpoints where prefix like ?", f"{second}/%")[0][
                    0
                ]
                == 3
            )
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_journald_levels_and_one_event_per_line(tmp_path: Path, corpus: Corpus) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    (root / "bad").mkdir()
    (root / "bad" / "ckpt-1.index").write_bytes(os.urandom(4096))  # corrupt: a warning
    (root / "bad" / "ckpt-1.data-00000-of-00001").write_bytes(b"x")
    conf = write_config(tmp_path / "c.toml", root, db=tmp_path / "ckptd.db")
    result = subprocess.run(
        [PY, "-m", "ckptd", "--config", str(conf), "run", "--once"],
        capture_output=True,
        text=True,
        env={**ENV, "JOURNAL_STREAM": "8:12345"},
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("<")]
    assert any(
        ln.startswith("<4>ckptd.daemon.reconcile: corrupt checkpoint bad@1") for ln in lines
    ), lines
    assert any(ln.startswith("<6>") for ln in lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_prometheus_metrics_endpoint(tmp_path: Path, corpus: Corpus) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    port = _free_port()
    db = tmp_path / "ckptd.db"
    conf = write_config(
        tmp_path / "c.toml", root, db=db, daemon=f'metrics_address = "127.0.0.1:{port}"'
    )
    proc = _start(conf, tmp_path / "d.log")
    try:
        wait_for(lambda: query(db, "select count(*) from daemons")[0][0] == 1)
        corpus.copy("tf2", root / "live")  # recorded through a watch event: latency observed

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    return str(r.read().decode())
            except OSError:
                return ""  # not listening yet

        # The heartbeat sets the counts, then its success time once it returns: both, in turn.
        heartbeat = 'ckptd_job_last_success_timestamp_seconds{job="heartbeat"}'
        complete = 'ckptd_checkpoints{state="complete"} 3.0'
        text = wait_for(lambda: t if complete in (t := scrape()) and heartbeat in t else None)
        assert "ckptd_detection_latency_seconds_count 3.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.tf
def test_sigterm_stops_promptly_even_with_a_hung_worker(tmp_path: Path, corpus: Corpus) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    corpus.copy("tf2", root / "a")
    db = tmp_path / "ckptd.db"
    extra = '\n[watch.evaluate]\nevaluator = "python"\nfunction = "tests.daemon_eval_fns:hang"\ntimeout = "1h"\n'
    conf = write_config(tmp_path / "c.toml", root, db=db, extra=extra)
    proc = _start(conf, tmp_path / "d.log", PYTHONPATH=str(REPO))
    try:
        wait_for(
            lambda: (
                query(db, "select count(*) from evaluations where status = 'running'")[0][0] == 1
            ),
            timeout=60,
        )
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    # No worker left behind (it ran in its own session, killed as a group).
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert not [ln for ln in ps.splitlines() if "ckptd.worker serve" in ln and str(tmp_path) in ln]
    # The interrupted evaluation is queued again at the next start, not lost.
    result = subprocess.run(
        [
            PY,
            "-c",
            f"import sqlite3; print(sqlite3.connect('{db}').execute('select status from evaluations').fetchall())",
        ],
        capture_output=True,
        text=True,
    )
    statuses = json.loads(result.stdout.replace("(", "[").replace(",)", "]").replace("'", '"'))
    assert all(s[0] in ("running", "pending", "failed") for s in statuses)
