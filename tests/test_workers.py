"""Issue 13 item 3: `ckptd worker` claims evaluations and exports from the one queue (the
``evaluations`` claims and the ``requests`` table) for daemons with ``evaluate_on = "workers"``,
on SQLite and on PostgreSQL; a worker killed mid-evaluation leaves a claim that expires and
another worker does the job, exactly once; a stale worker's result is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ckptd.api import handoff
from ckptd.core.errors import StoreError
from ckptd.store import evaluations, requests
from ckptd.store.handle import Store
from tests.conftest import (
    ENV,
    PY,
    Corpus,
    DaemonProcess,
    ckptd,
    load_golden,
    wait_for,
    write_config,
)

EVALUATE = """
[watch.best]
metric = "eval/score"
mode = "max"

[watch.evaluate]
evaluator = "python"
function = "{fn}"
every = "1h"
"""
FREEZE = """
[watch.freeze]
format = ["saved_model"]
export_dir = "{export}"
inputs = {{ "x" = "x:0" }}
outputs = {{ "y" = "y:0" }}
every = "2s"
keep = 3
"""


def _config(
    path: Path, root: Path, url: str, *, daemon: str = "", extra: str = "", worker: str = ""
) -> Path:
    """A config on database ``url`` (SQLite or PostgreSQL), with a [worker] table."""
    db = path.parent / "ckptd.db"
    conf = write_config(path, root, db=db, daemon=daemon, extra=extra, best=False, rescan="1s")
    body = conf.read_text().replace(f'"sqlite:///{db}"', json.dumps(url))
    conf.write_text(body + (f"\n[worker]\n{textwrap.dedent(worker)}" if worker else ""))
    return conf


def _sql(url: str, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows of ``statement``; none while the database (or its schema) does not exist yet."""
    try:
        store = Store.open(url, readonly=True)
    except StoreError:
        return []
    try:
        with store.session() as s:
            return [tuple(row) for row in s.execute(text(statement), params)]
    except StoreError:  # not migrated yet
        return []
    finally:
        store.close()


def _pid_of(holder: str) -> int:
    return int(holder.split(":")[1])


def _tf_workers(pid: int) -> list[int]:
    """The TensorFlow worker subprocesses (``python -m ckptd.worker``) of process ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"ckptd.worker" in cmdline:
            out.append(int(stat.parent.name))
    return out


class WorkerProcess(DaemonProcess):
    """A real `ckptd worker` subprocess."""

    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [PY, "-m", "ckptd", "worker", "--config", str(self.config)],  # as the unit runs it
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        return self


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[[Path], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(config: Path) -> WorkerProcess:
        w = WorkerProcess(config, tmp_path / f"worker{len(started)}.log").start()
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


# ------------------------------------------------------------------ config


def test_a_worker_naming_an_unknown_watch_is_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    conf = _config(
        tmp_path / "c.toml",
        root,
        f"sqlite:///{tmp_path / 'ckptd.db'}",
        worker=f'watches = ["{tmp_path / "elsewhere"}"]\nkinds = ["evaluate", "train"]\n',
    )
    result = ckptd("worker", config=conf, real=True)
    assert result.returncode == 78, result.stderr
    assert "worker.watches" in result.stderr and "is not the path of a [[watch]]" in result.stderr
    assert 'worker.kinds: expected a non-empty list of "evaluate", "export", got "train"' in (
        result.stderr
    )
    assert not (tmp_path / "ckptd.db").exists()  # refused before touching the database

    bad = _config(tmp_path / "d.toml", root, "sqlite:///x.db", daemon='evaluate_on = "gpu"')
    result = ckptd("config", "check", config=bad)
    assert result.returncode == 78
    assert 'daemon.evaluate_on: expected "local" or "workers", got "gpu"' in result.stderr

    good = _config(
        tmp_path / "e.toml",
        root,
        "sqlite:///x.db",
        daemon='evaluate_on = "workers"',
        worker=f'name = "gpu-1"\nwatches = ["{root}"]\nkinds = ["export"]\nconcurrency = 2\n',
    )
    result = ckptd("config", "check", "--json", config=good)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["config"]
    assert data["daemon"]["evaluate_on"] == "workers"
    assert data["worker"] == {
        "name": "gpu-1",
        "watches": [str(root)],
        "kinds": ["export"],
        "concurrency": 2,
        "claim_ttl": "1m",
    }


# ------------------------------------------------------------------ the queue, on both stores


@pytest.fixture
def recorded_url(tmp_path: Path, database_url: str) -> str:
    """The golden runs recorded (with pending evaluations) into a fresh database."""
    root = tmp_path / "runs"
    root.mkdir()
    load_golden(root)
    conf = _config(
        tmp_path / "c.toml",
        root,
        database_url,
        daemon='evaluate_on = "workers"',  # `run --once` then queues, evaluates nothing
        extra=EVALUATE.format(fn="tests.daemon_eval_fns:step_score"),
    )
    result = ckptd("run", "--once", config=conf)
    assert result.returncode == 0, result.stderr
    assert _sql(database_url, "select count(*) from evaluations where status = 'pending'")[0][0]
    return database_url


@pytest.mark.slow
def test_a_stale_workers_results_are_refused(recorded_url: str) -> None:
    a, b = Store.open(recorded_url), Store.open(recorded_url)
    try:
        (cand, *_) = evaluations.candidates(a, [w for (w,) in _sql(recorded_url, _WATCHES)])
        # Worker a claims the job, then stalls past its claim; worker b takes the job over.
        job_a = evaluations.claim(a, cand.evaluation_id, ttl=timedelta(seconds=-1))
        assert job_a is not None
        job_b = evaluations.claim(b, cand.evaluation_id, ttl=timedelta(minutes=1))
        assert job_b is not None and job_b.attempt == 2
        assert not evaluations.renew(a, job_a, ttl=timedelta(minutes=1))
        assert not evaluations.finish_done(a, job_a, {"eval/score": 9.0}, 1.0)  # refused
        assert evaluations.finish_done(b, job_b, {"eval/score": 0.5}, 1.0)
        rows = _sql(
            recorded_url,
            "select detail from actions where kind = 'evaluated' and checkpoint_id = :c",
            c=cand.checkpoint_id,
        )
        assert len(rows) == 1
        detail = rows[0][0] if isinstance(rows[0][0], dict) else json.loads(rows[0][0])
        assert detail["by"] == b.holder and detail["metrics"] == {"eval/score": 0.5}

        # The same for a request: a stale holder can neither renew nor finish it.
        run_id = _sql(recorded_url, "select min(id) from runs")[0][0]
        rid = requests.submit(a, requests.FREEZE, run_id, None, {})
        assert requests.claim_next(a, ttl=timedelta(seconds=-1)) is not None
        again = requests.claim_next(b, ttl=timedelta(minutes=1))
        assert again is not None and again.id == rid
        assert not requests.renew(a, rid, ttl=timedelta(minutes=1))
        assert not requests.finish(a, rid, result={"by": "a"})
        assert requests.finish(b, rid, result={"by": "b"})
        req = requests.get(a, rid)
        assert req is not None and req.status == requests.DONE and req.result == {"by": "b"}
    finally:
        a.close()
        b.close()


_WATCHES = "select distinct watch_path from runs"


@pytest.mark.slow
def test_claim_next_narrows_to_runs_and_kinds(recorded_url: str) -> None:
    store = Store.open(recorded_url)
    try:
        first, second = (r for (r,) in _sql(recorded_url, "select id from runs order by id")[:2])
        ev = requests.submit(store, requests.EVALUATE, first, None, {})
        fr = requests.submit(store, requests.FREEZE, second, None, {})
        ttl = timedelta(minutes=1)
        assert requests.claim_next(store, ttl=ttl, kinds=[requests.FREEZE], run_ids=[first]) is None
        assert not requests.any_claimable(store, kinds=["nothing"])
        got = requests.claim_next(store, ttl=ttl, kinds=[requests.FREEZE])
        assert got is not None and got.id == fr
        got = requests.claim_next(store, ttl=ttl, run_ids=[first, second])
        assert got is not None and got.id == ev
        # A scheduled export is queued once while one is open, again once it is done.
        assert requests.submit_unless_open(store, requests.FREEZE, second, {}) is None
        assert requests.finish(store, fr, result={})
        assert requests.submit_unless_open(store, requests.FREEZE, second, {}) is not None
    finally:
        store.close()


@pytest.mark.slow
def test_a_lapsed_request_is_abandoned_unless_another_process_took_it_over(
    recorded_url: str,
) -> None:
    a, b = Store.open(recorded_url), Store.open(recorded_url)
    server = handoff.Server("worker", "w1", 4242, "elsewhere")
    lapsed = timedelta(seconds=-30)  # (beyond the clock skew the CLI allows)
    try:
        run_id = _sql(recorded_url, "select min(id) from runs")[0][0]
        # Its holder's claim lapsed and no one took it over: the CLI gives up, and the request
        # is cancelled (no one does work the user no longer waits for).
        rid = requests.submit(a, requests.EVALUATE, run_id, None, {})
        assert requests.claim_next(a, ttl=lapsed) is not None
        with pytest.raises(handoff.HandoffFailed, match="worker 'w1' \\(pid 4242 on elsewhere\\)"):
            handoff.wait(a, a, rid, server, pickup_timeout=5)
        assert requests.get(a, rid).status == requests.CANCELLED  # type: ignore[union-attr]
        assert requests.claim_next(b, ttl=timedelta(minutes=1)) is None

        # Taken over by another worker after the lapse: the CLI waits for that one's result.
        rid = requests.submit(a, requests.EVALUATE, run_id, None, {})
        assert requests.claim_next(a, ttl=lapsed) is not None
        assert requests.claim_next(b, ttl=timedelta(minutes=1)) is not None
        finisher = threading.Timer(0.5, requests.finish, (b, rid), {"result": {"by": "b"}})
        finisher.start()
        try:
            assert handoff.wait(a, a, rid, server, pickup_timeout=5).result == {"by": "b"}
        finally:
            finisher.join()
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ real daemons and workers


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_evaluates_and_exports_for_a_daemon_that_leaves_it_the_work(
    tmp_path: Path,
    trained: Corpus,
    database_url: str,
    daemon_factory: Callable[..., DaemonProcess],
    worker_factory: Callable[[Path], WorkerProcess],
) -> None:
    root = tmp_path / "runs"
    trained.copy("tf1", root / "mnist")
    export = tmp_path / "export"
    extra = EVALUATE.format(fn="tests.daemon_eval_fns:step_score") + FREEZE.format(export=export)
    conf = _config(
        tmp_path / "d.toml", root, database_url, daemon='evaluate_on = "workers"', extra=extra
    )
    wconf = _config(tmp_path / "w.toml", root, database_url, extra=extra, worker='name = "gpu-1"\n')
    d = daemon_factory(conf)
    assert d.proc is not None
    # The daemon records and queues; it never evaluates (no TF worker process of its own).
    wait_for(
        lambda: (
            _sql(database_url, "select count(*) from evaluations where status = 'pending'")
            == [(3,)]
        ),
        timeout=60,
        interval=0.2,
    )
    wait_for(lambda: "queued the export of mnist for a worker" in d.log(), timeout=30)
    assert not _tf_workers(d.proc.pid)

    w = worker_factory(wconf)
    assert w.proc is not None
    wait_for(
        lambda: (
            _sql(database_url, "select count(*) from evaluations where status = 'done'") == [(3,)]
        ),
        timeout=180,
        interval=0.2,
    )
    by = {
        _pid_of(json.loads(detail)["by"] if isinstance(detail, str) else detail["by"])
        for (detail,) in _sql(database_url, "select detail from actions where kind = 'evaluated'")
    }
    assert by == {w.proc.pid}, by + w.log()
    (tf_pid,) = {
        int(v) for (v,) in _sql(database_url, "select value from metrics where name = 'eval/pid'")
    }
    assert tf_pid in _tf_workers(w.proc.pid)  # the worker's warm TF subprocess
    assert not _tf_workers(d.proc.pid)

    # The daemon's scheduled export is a job in the queue, done by the worker.
    wait_for(
        lambda: _sql(database_url, "select path from exports where status = 'published'"),
        timeout=180,
        interval=0.2,
    )
    ((path,),) = _sql(database_url, "select path from exports where status = 'published'")
    assert (Path(path) / "saved_model.pb").exists()
    assert "freeze of mnist queued by a daemon's schedule" in w.log()

    # Its status, as `ckptd status` renders it.
    ((status,),) = _sql(
        database_url, "select status from daemons where role = 'worker' and stopped_at is null"
    )
    status = json.loads(status) if isinstance(status, str) else status
    assert status["serves"] == {"watches": [str(root)], "kinds": ["evaluate", "export"]}
    assert status["concurrency"] == 1 and status["heartbeat_interval"] == 1.0
    assert isinstance(status["jobs"], list)

    # `ckptd evaluate` is handed to the live worker (the daemon leaves evaluation to workers).
    steps = sorted(s["step"] for s in trained.saves["tf1"])
    result = ckptd("evaluate", f"mnist@{steps[0]}", "--json", config=conf, timeout=180)
    assert result.returncode == 0, result.stderr + w.log()
    (outcome,) = json.loads(result.stdout)
    assert outcome["status"] == "done" and int(outcome["metrics"]["eval/pid"]) == tf_pid
    result = ckptd("freeze", f"mnist@{steps[0]}", "--force", config=conf, timeout=180)
    assert result.returncode == 0, result.stderr + w.log()
    assert "exported mnist@" in result.stdout
    assert "done by the running worker 'gpu-1'" in result.stderr
    assert f"freeze of mnist@{steps[0]} requested by `ckptd freeze`" in w.log()
    assert f"evaluate of mnist@{steps[0]} requested by `ckptd evaluate`" in w.log()

    assert w.stop() == 0, w.log()
    assert _sql(
        database_url, "select count(*) from daemons where role = 'worker' and stopped_at is null"
    ) == [(0,)]
    assert d.stop() == 0


def _holder_of(url: str, step: int) -> str | None:
    rows = _sql(
        url,
        "select e.claimed_by from evaluations e join checkpoints c on c.id = e.checkpoint_id "
        "where c.step = :s and e.status = 'running'",
        s=step,
    )
    return rows[0][0] if rows else None


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stopped_worker_releases_its_job_and_a_killed_ones_job_is_done_by_another_once(
    tmp_path: Path,
    trained: Corpus,
    daemon_factory: Callable[..., DaemonProcess],
    worker_factory: Callable[[Path], WorkerProcess],
) -> None:
    root = tmp_path / "runs"
    trained.copy("tf1", root / "mnist")
    steps = sorted(s["step"] for s in trained.saves["tf1"])
    stopped_step, killed_step = steps[1], steps[2]
    (root / "mnist" / ".slow").write_text(f"{stopped_step} {killed_step}")
    url = f"sqlite:///{tmp_path / 'ckptd.db'}"
    extra = EVALUATE.format(fn="tests.worker_eval_fns:slow_once")
    d = daemon_factory(
        _config(tmp_path / "d.toml", root, url, daemon='evaluate_on = "workers"', extra=extra)
    )
    wait_for(
        lambda: _sql(url, "select count(*) from evaluations") == [(3,)], timeout=60, interval=0.2
    )

    def worker(name: str) -> WorkerProcess:
        conf = _config(
            tmp_path / f"{name}.toml",
            root,
            url,
            extra=extra,
            worker=f'name = "{name}"\nclaim_ttl = "3s"\n',
        )
        return worker_factory(conf)

    # SIGTERM mid-evaluation: the job goes back to the queue at once (not at its expiry).
    first = worker("w1")
    wait_for((root / "mnist" / f".slow-{stopped_step}.started").exists, timeout=180)
    assert first.stop() == 0, first.log()
    assert _sql(
        url,
        "select e.status, e.claimed_by from evaluations e join checkpoints c on "
        "c.id = e.checkpoint_id where c.step = :s",
        s=stopped_step,
    ) == [("pending", None)]

    # Two workers: the one that takes the other slow job is killed (-9) mid-evaluation; the
    # other does that job once its claim has expired.
    workers = [worker("w2"), worker("w3")]
    started = root / "mnist" / f".slow-{killed_step}.started"
    wait_for(started.exists, timeout=180, interval=0.2)
    holder = wait_for(lambda: _holder_of(url, killed_step), timeout=30)
    killed = next(w for w in workers if w.proc and w.proc.pid == _pid_of(holder))
    survivor = next(w for w in workers if w is not killed)
    assert killed.proc is not None and survivor.proc is not None
    os.kill(killed.proc.pid, signal.SIGKILL)
    os.kill(int(started.read_text()), signal.SIGKILL)  # its TF worker (a session of its own)
    killed.proc.wait()

    wait_for(
        lambda: _sql(url, "select count(*) from evaluations where status = 'done'") == [(3,)],
        timeout=180,
        interval=0.2,
    )
    # Each checkpoint evaluated exactly once (the interrupted attempts never finished).
    done = sorted(int(s) for s in (root / "mnist" / ".evaluated").read_text().split())
    assert done == steps
    per_checkpoint = _sql(
        url,
        "select checkpoint_id, count(*) from actions where kind = 'evaluated' "
        "group by checkpoint_id",
    )
    assert sorted(n for _c, n in per_checkpoint) == [1, 1, 1]
    ((detail, attempts),) = _sql(
        url,
        "select a.detail, e.attempts from actions a join evaluations e on "
        "e.checkpoint_id = a.checkpoint_id join checkpoints c on c.id = a.checkpoint_id "
        "where a.kind = 'evaluated' and c.step = :s",
        s=killed_step,
    )
    assert _pid_of(json.loads(detail)["by"]) == survivor.proc.pid and attempts == 2
    assert survivor.stop() == 0
    assert d.stop() == 0
