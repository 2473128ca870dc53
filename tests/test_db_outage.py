"""Issue 13, "PostgreSQL unreachable / restarted", on a real `ckptd run` daemon and a real
PostgreSQL cluster of the test's own (stopping the session-wide one would break other tests).

While the database is down the daemon keeps running, reports itself unhealthy (sd_notify
STATUS, ``ckptd_database_up 0``), prunes nothing, and records what was written meanwhile once it
answers again; a restart while a real TensorFlow trainer saves loses and doubles nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ENV, GOLDEN, PY, REPO, ckptd, load_golden, wait_for, write_config

TRAIN = ("--steps", "300", "--save-every", "10", "--interval", "0.3")  # 30 saves, 0.3 s apart


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[Any]:
    """A PostgreSQL cluster these tests stop and start."""
    from tests import pg

    yield from pg.started_or_skip()


class Notify:
    """systemd's side of sd_notify: a thread reads every datagram the daemon sends (as systemd
    does; an unread socket would fill and block the sender)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.address = str(path)
        self.messages: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def _config(tmp_path: Path, root: Path, url: str, *, daemon: str = "", extra: str = "") -> Path:
    conf = write_config(
        tmp_path / "c.toml",
        root,
        db=tmp_path / "unused.db",
        rescan="1s",
        daemon=f'lease_ttl = "3s"\n{daemon}',
        extra=extra,
    )
    conf.write_text(conf.read_text().replace(f"sqlite:///{tmp_path / 'unused.db'}", url))
    return conf


def _start(conf: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "ckptd", "--config", str(conf), "run"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**ENV, **env},
        start_new_session=True,
        cwd=REPO,
    )


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql).fetchall())


def _started(url: str) -> bool:
    """Whether the daemon has migrated the database and registered itself."""
    import psycopg

    try:
        return bool(_rows(url, "select count(*) from daemons where stopped_at is null")[0][0])
    except psycopg.Error:
        return False


def _recorded(url: str) -> list[str]:
    """The prefixes of complete and pruned checkpoints, one entry per row."""
    return [
        r[0]
        for r in _rows(url, "select prefix from checkpoints where state in ('complete', 'pruned')")
    ]


def _recorded_events(url: str) -> list[str]:
    return [r[0] for r in _rows(url, "select subject from actions where kind = 'recorded'")]


@pytest.mark.parametrize(
    ("message", "invalidated", "unreachable"),
    [
        ('connection to server on socket "/s/.s.PGSQL.5432" failed: No such file', False, True),
        ("connection timeout expired", False, True),
        ("the database system is starting up", False, True),
        ("terminating connection due to administrator command", True, True),
        ('relation "runs" does not exist', False, False),
        ("database is locked", False, False),
    ],
)
def test_which_driver_errors_mean_the_database_is_unreachable(
    message: str, invalidated: bool, unreachable: bool
) -> None:
    from sqlalchemy.exc import OperationalError

    from ckptd.core.errors import StoreError
    from ckptd.store.db import DatabaseUnreachable, store_error

    exc = OperationalError("select 1", {}, Exception(message), connection_invalidated=invalidated)
    error = store_error(exc)
    assert isinstance(error, StoreError)
    assert isinstance(error, DatabaseUnreachable) is unreachable
    assert message in str(error)


@pytest.mark.pg
@pytest.mark.slow
def test_database_unreachable_daemon_waits_reports_and_catches_up(
    tmp_path: Path, own_cluster: Any
) -> None:
    url = own_cluster.new_database()
    root = tmp_path / "runs"
    root.mkdir()
    load_golden(root)
    port = _free_port()
    conf = _config(
        tmp_path,
        root,
        url,
        daemon=f'metrics_address = "127.0.0.1:{port}"',
        extra='\n[watch.retain]\nkeep_last = 1\nmin_age = "0s"\nevery = "1s"\n',
    )
    notify = Notify(tmp_path / "notify.sock")
    log = tmp_path / "d.log"
    proc = _start(conf, log, NOTIFY_SOCKET=notify.address)
    keras = root / "keras"
    source = sorted((GOLDEN / "keras").glob("model.*.keras"))[0]
    try:
        # Up: the golden runs are recorded, then pruned down to their newest checkpoint (of
        # the Keras run: its weights file).
        wait_for(lambda: not list(keras.glob("*.keras")), timeout=90, interval=0.3)
        assert "ckptd_database_up 1.0" in _scrape(port)

        own_cluster.halt()
        try:
            written = []
            for epoch in range(10, 14):  # real Keras files, saved while the database is down
                dest = keras / f"model.{epoch:02d}-0.10.keras"
                shutil.copyfile(source, dest)
                written.append(str(dest))
                time.sleep(0.5)
            # Unhealthy, says why and what to check, and keeps running past its lease TTL.
            wait_for(lambda: any("database unreachable" in m for m in notify.messages), timeout=20)
            line = [m for m in notify.messages if "database unreachable" in m][-1]
            assert "STATUS=" in line and "check that the database server runs" in line
            wait_for(lambda: "ckptd_database_up 0.0" in _scrape(port), timeout=20)
            time.sleep(5)  # past the lease TTL and several prune intervals
            assert proc.poll() is None, log.read_text()
            assert sorted(str(p) for p in keras.glob("*.keras")) == sorted(written)  # none pruned
            down = ckptd("status", config=conf)
            assert down.returncode == 1 and "cannot connect to the database" in down.stderr
        finally:
            own_cluster.restart()

        # Back: everything written meanwhile is recorded once, then pruned as configured.
        wait_for(lambda: set(written) <= set(_recorded(url)), timeout=30, interval=0.3)
        wait_for(lambda: len(list(keras.glob("*.keras"))) == 1, timeout=30, interval=0.3)
        assert sorted(keras.glob("*.keras")) == [Path(written[-1])]
        wait_for(lambda: "ckptd_database_up 1.0" in _scrape(port), timeout=20)
        status = wait_for(
            lambda: (
                (s := json.loads(ckptd("status", "--json", config=conf).stdout))["daemon"][
                    "healthy"
                ]
                and s
            ),
            timeout=20,
            interval=0.5,
        )
        assert status["daemon"]["runs_held"] == 4
        recorded = _recorded(url)
        assert len(recorded) == len(set(recorded))
        events = _recorded_events(url)
        assert len(events) == len(set(events))
        text = log.read_text()
        assert text.count("database unreachable:") == 1, text  # said once, not per statement
        assert "database reachable again" in text
        assert "Traceback" not in text
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        notify.close()
        own_cluster.drop_database(url)


@pytest.mark.pg
@pytest.mark.slow
def test_restart_under_load_loses_and_doubles_nothing(tmp_path: Path, own_cluster: Any) -> None:
    url = own_cluster.new_database()
    root = tmp_path / "runs"
    root.mkdir()
    conf = _config(tmp_path, root, url)
    log = tmp_path / "d.log"
    proc = _start(conf, log)
    trainer = None
    try:
        wait_for(lambda: _started(url), timeout=60, interval=0.2)
        # A real TensorFlow trainer saving every 0.3 s while PostgreSQL restarts twice.
        trainer = subprocess.Popen(
            [PY, "-m", "ckptd.worker.train", "tf2", "--out", str(root / "live"), *TRAIN],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=ENV,
            text=True,
        )
        wait_for(lambda: _recorded(url), timeout=120, interval=0.2)  # saving has begun
        for pause in (2.0, 0.5):
            own_cluster.halt()
            time.sleep(pause)
            own_cluster.restart()
            time.sleep(2.0)
        out, _ = trainer.communicate(timeout=180)
        assert trainer.returncode == 0
        saves = [r["prefix"] for r in map(json.loads, out.splitlines()) if "prefix" in r]
        assert len(saves) == 30
        wait_for(lambda: set(saves) <= set(_recorded(url)), timeout=30, interval=0.3)
        time.sleep(2)  # a rescan more: nothing is recorded again
        recorded = _recorded(url)
        assert sorted(recorded) == sorted(saves)  # nothing lost, nothing twice
        events = _recorded_events(url)
        assert sorted(events) == sorted(set(events)) and len(events) == len(saves)
        assert proc.poll() is None, log.read_text()
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
        proc.terminate()
        proc.wait(timeout=30)
        own_cluster.drop_database(url)


@pytest.mark.pg
def test_pg_helper_halts_and_restarts_keeping_data(own_cluster: Any) -> None:
    url = own_cluster.new_database()
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("create table t (x int)")
        conn.execute("insert into t values (1)")
    own_cluster.halt()
    assert not os.path.exists(own_cluster.socket_dir / ".s.PGSQL.5432")
    own_cluster.restart()
    assert _rows(url, "select x from t") == [(1,)]
    own_cluster.drop_database(url)
