"""Shared fixtures: real TensorFlow checkpoints (checked in, or trained once a session)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# Evaluators, builders and Keras models named "tests.<module>:<function>" are imported by
# worker processes (started by the daemon, the CLI, or in this process): the repository must be
# on their path, whatever the working directory or the order the tests run in.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
ENV.pop("NOTIFY_SOCKET", None)

# kind -> trainer arguments. Small: each job is ~4 s, mostly `import tensorflow`.
CORPUS = {
    "tf1": ["--steps", "30", "--save-every", "10"],
    "tf2": ["--steps", "30", "--save-every", "10"],
    "sharded": ["--steps", "20", "--save-every", "10"],
    "keras": ["--steps", "3"],
}
# The same runs written once by real TensorFlow and checked in (see golden/README.md).
GOLDEN = Path(__file__).resolve().parent / "golden"

# Lists every checkpoint's variables with TensorFlow itself: the oracle for our index reader.
LIST_VARIABLES = textwrap.dedent(
    """
    import json, sys, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    out = {}
    for prefix in sys.argv[1:]:
        out[prefix] = {
            "variables": [[n, list(s)] for n, s in tf.train.list_variables(prefix)],
            "dtypes": {
                n: tf.dtypes.as_dtype(d).name
                for n, d in tf.train.load_checkpoint(prefix).get_variable_to_dtype_map().items()
            },
        }
    json.dump(out, sys.stdout)
    """
)

Saves = dict[str, list[dict[str, Any]]]  # kind -> the trainer's "saved" lines
Variables = dict[str, dict[str, Any]]  # prefix -> TF's list_variables / dtypes


@dataclass
class Corpus:
    root: Path
    saves: Saves
    variables: Variables

    def run_dir(self, kind: str) -> Path:
        return self.root / kind

    def copy(self, kind: str, dest: Path) -> Path:
        """A private copy of one run (tests may mutate it), as if the trainer had written it there.

        TF1 state files hold absolute paths; they are rewritten to the copy's location.
        """
        shutil.copytree(self.root / kind, dest, symlinks=True)
        state = dest / "checkpoint"
        if state.exists():
            state.write_text(state.read_text().replace(str(self.root / kind), str(dest)))
        return dest


def train(kind: str, out: Path, *args: str, timeout: float = 300) -> list[dict[str, Any]]:
    """Run the real TF trainer in a subprocess; returns its "saved" records."""
    proc = subprocess.run(
        [PY, "-m", "ckptd.worker.train", kind, "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"trainer {kind} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return [rec for rec in lines if rec.get("event") == "saved"]


def train_corpus(root: Path, *extra: str) -> tuple[Saves, Variables]:
    """Every CORPUS run trained under ``root``, and TF's own listing of each checkpoint."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            kind: pool.submit(train, kind, root / kind, *args, *extra)
            for kind, args in CORPUS.items()
        }
        saves = {kind: f.result() for kind, f in futures.items()}
    prefixes = [rec["prefix"] for kind in ("tf1", "tf2", "sharded") for rec in saves[kind]]
    proc = subprocess.run(
        [PY, "-c", LIST_VARIABLES, *prefixes], capture_output=True, text=True, env=ENV, check=True
    )
    return saves, json.loads(proc.stdout)


def load_golden(dest: Path) -> Corpus:
    """The checked-in runs copied to ``dest``, each file with the mtime TensorFlow gave it (the
    write order, matching the times inside state and event files).

    Paths the trainer reported (and TF1 state files) name the directory it wrote to, recorded
    in the manifest; they are moved to ``dest``.
    """
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    old = manifest["root"]

    def moved(path: str) -> str:
        assert path.startswith(old + "/"), path
        return str(dest) + path[len(old) :]

    for kind in manifest["saves"]:
        shutil.copytree(GOLDEN / kind, dest / kind)
        state = dest / kind / "checkpoint"
        if state.exists():
            state.write_text(state.read_text().replace(old + "/", f"{dest}/"))
    for rel, mtime in sorted(manifest["mtimes"].items(), key=lambda item: -item[0].count("/")):
        os.utime(dest / rel, ns=(mtime, mtime))  # files before the directories holding them
    saves = {
        kind: [
            {
                **rec,
                "prefix": moved(rec["prefix"]),
                **({"files": [moved(f) for f in rec["files"]]} if "files" in rec else {}),
            }
            for rec in records
        ]
        for kind, records in manifest["saves"].items()
    }
    variables = {moved(prefix): v for prefix, v in manifest["variables"].items()}
    return Corpus(dest, saves, variables)


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Checkpoints and event files real TensorFlow wrote, checked in: no TensorFlow needed."""
    return load_golden(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The same runs trained now by this environment's TensorFlow (~30 s, once a session)."""
    root = tmp_path_factory.mktemp("corpus")
    return Corpus(root, *train_corpus(root))


@pytest.fixture
def corpus(request: pytest.FixtureRequest) -> Corpus:
    """The golden runs; a test marked ``tf`` (it runs TensorFlow anyway) gets freshly trained
    ones, with the held-out data (``heldout.npz``) that evaluation reads."""
    return request.getfixturevalue("trained" if request.node.get_closest_marker("tf") else "golden")


# ------------------------------------------------------------------ config / daemon helpers


def write_config(
    path: Path,
    watch: Path,
    *,
    db: Path,
    runs: str | None = "*",
    extra: str = "",
    daemon: str = "",
    rescan: str = "2s",
    best: bool = True,
) -> Path:
    runs_line = f'runs = "{runs}"' if runs else ""
    path.write_text(
        textwrap.dedent(
            f"""\
            [daemon]
            database = "sqlite:///{db}"
            rescan_interval = "{rescan}"
            heartbeat_interval = "1s"
            {daemon}

            [[watch]]
            path = "{watch}"
            {runs_line}
            keras_template = "model.{{epoch:02d}}-{{val_loss:.2f}}.keras"
            """
        )
        + ('\n[watch.best]\nmetric = "eval/accuracy"\nmode = "max"\n' if best else "")
        + extra
    )
    return path


# Commands a test runs in this process (through ``ckptd.cli.main``, the same error boundary as
# the real command): a subprocess costs half a second of Python start and imports each. ``run``,
# ``demo``, ``evaluate`` and ``freeze`` start daemons, signal handlers or TensorFlow workers, so
# they always run as real processes, as does any call with ``real=True``.
_SUBPROCESS_ONLY = {"run", "demo", "evaluate", "freeze"}


def ckptd(
    *args: str, config: Path | None = None, timeout: float = 60, real: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = (["--config", str(config)] if config is not None else []) + list(args)
    if real or not args or args[0] in _SUBPROCESS_ONLY:
        return subprocess.run(
            [PY, "-m", "ckptd", *argv], capture_output=True, text=True, env=ENV, timeout=timeout
        )
    return _ckptd_in_process(argv)


def _ckptd_in_process(argv: list[str]) -> subprocess.CompletedProcess[str]:
    from click.testing import CliRunner

    from ckptd.cli import main

    # The environment a real command would see (CKPTD_CONFIG etc. come from ENV, as there).
    env = {k: v for k, v in ENV.items() if os.environ.get(k) != v}
    env.update({k: None for k in os.environ if k not in ENV})
    with CliRunner().isolation(env=env) as (out, err, _):
        code = main(argv)
        sys.stdout.flush()  # the isolation's text wrappers buffer what print/write gave them
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["ckptd", *argv], code, stdout, stderr)


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; every wait in the suite is bounded."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except sqlite3.Error:
            last = None
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last value: {last!r})")


class DaemonProcess:
    """A real `ckptd run` subprocess (``wrapper``: argv it runs under, e.g. setpriv …)."""

    def __init__(self, config: Path, log: Path, wrapper: tuple[str, ...] = ()) -> None:
        self.config, self.log_path, self.wrapper = config, log, wrapper
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, PY, "-m", "ckptd", "--config", str(self.config), "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: Path, wrapper: tuple[str, ...] = ()) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path / f"daemon{len(started)}.log", wrapper).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def _lives_for_the_process(thread: threading.Thread) -> bool:
    """fsspec's one IO thread, and its event loop's executor threads (getaddrinfo), are started
    on first use and serve every later S3/GCS call of the process: not a test's leak."""
    return thread.name == "fsspecIO" or (
        thread.name.startswith("asyncio_")
        and any(t.name == "fsspecIO" for t in threading.enumerate())
    )


def leaked_threads(before: set[threading.Thread], wait: float = 5) -> list[threading.Thread]:
    """Threads started since ``before`` that are still alive, daemon threads included, after up
    to ``wait`` seconds for those being stopped to finish."""
    deadline = time.monotonic() + wait
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not _lives_for_the_process(t)
        ]
        if not leaked or time.monotonic() > deadline:
            return leaked
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    """Every thread a test starts must be stopped by it: ckptd's own (named ``ckptd-…``, all
    daemon threads) and those its libraries start for it (observers, schedulers, pools)."""
    before = set(threading.enumerate())
    yield
    leaked = leaked_threads(before)
    assert not leaked, f"threads leaked: {leaked}"


# ------------------------------------------------------------------ databases: SQLite and PostgreSQL


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """One throwaway PostgreSQL cluster for the session (see tests/pg.py)."""
    from tests import pg

    yield from pg.started_or_skip()


def new_database_url(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> str:
    """An empty database of ``kind``: a file under ``tmp_path``, or a new PostgreSQL database
    (dropped after the test)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ckptd.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.new_database()
    request.addfinalizer(lambda: cluster.drop_database(url))
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on SQLite and on a real PostgreSQL."""
    return new_database_url(request, request.param, tmp_path)


# ------------------------------------------------------------------ object stores: S3 and GCS

from tests.objfixtures import (  # noqa: E402, F401 (fixtures; after ENV, which objstore_env extends)
    bucket,
    gcs_server,
    mark_objstore,
    objstore_env,
    objstore_server,
    s3_server,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_objstore(items)
