"""Issue 13 item 4, one view of the cluster: `ckptd status` (text, -v, --json) and the
Prometheus endpoint show every daemon and worker on the database, with the runs each daemon
holds and each worker's jobs in flight; stale ones are shown as such and long-dead ones are
forgotten. Workers' rows are written as `ckptd worker` writes them (claim + heartbeat)."""

from __future__ import annotations

import json
import socket
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from ckptd.api import status as api_status
from ckptd.core.model import utcnow
from ckptd.core.recording import RunDir
from ckptd.store import daemons, leases, migrate, recording, tables
from ckptd.store.daemons import WORKER
from ckptd.store.handle import Store
from tests.conftest import Corpus, ckptd, load_golden, wait_for, write_config


def _worker(store: Store, name: str, jobs: list[dict[str, Any]], **extra: Any) -> int:
    status = {
        "heartbeat_interval": 1.0,
        "serves": {"watches": [], "kinds": ["evaluate"]},
        "concurrency": 2,
        "jobs": jobs,
        **extra,
    }
    worker_id = daemons.claim(
        store, name=name, version="9.9", config="w.toml", status=status, role=WORKER
    )
    daemons.heartbeat(store, worker_id, status)
    _elsewhere(store, worker_id, f"host-{name}")
    return worker_id


def _elsewhere(store: Store, member_id: int, host: str) -> None:
    """Its row as if written on ``host`` (rows of this process would count as dead ones of an
    earlier process with its pid, and be marked stopped by the next claim)."""
    with store.session() as s:
        s.execute(update(tables.daemons).where(tables.daemons.c.id == member_id).values(host=host))


def _age(store: Store, member_id: int, age: timedelta) -> None:
    """Its last heartbeat ``age`` ago (a process that died without marking itself stopped)."""
    with store.session() as s:
        s.execute(
            update(tables.daemons)
            .where(tables.daemons.c.id == member_id)
            .values(heartbeat_at=utcnow() - age)
        )


def _run_ids(store: Store, corpus: Corpus, names: tuple[str, ...]) -> list[int]:
    runs = [RunDir(k, corpus.root / k, corpus.root) for k in names]
    return sorted(s.run_id for s in recording.load_states(store, runs).values())


def test_every_member_with_leases_jobs_and_staleness(database_url: str, golden: Corpus) -> None:
    store = Store.open(database_url)
    migrate.ensure_store_schema(store)
    job = {"kind": "evaluate", "run": "tf2", "checkpoint": "/x/ckpt-20", "since": "2026-01-01"}
    a = daemons.claim(store, name="a", version="1", config="a.toml", status={})
    _elsewhere(store, a, "host-a")
    leases.claim(store, "a", _run_ids(store, golden, ("tf2", "tf1")), 30)
    b = daemons.claim(store, name="b", version="1", config="b.toml", status={})
    leases.claim(store, "b", _run_ids(store, golden, ("keras",)), 30)
    gpu2, gone = _worker(store, "gpu2", []), _worker(store, "gone", [])
    _worker(store, "gpu1", [job])
    # (After every claim: a claim marks stopped the dead rows of its role.)
    _age(store, gpu2, timedelta(minutes=2))
    _age(store, gone, api_status.FORGET_AFTER + timedelta(minutes=1))
    _age(store, a, timedelta(minutes=2))
    daemons.heartbeat(store, b, {"heartbeat_interval": 1.0, "healthy": True})

    st = api_status.status(store)
    assert st.daemon is not None and st.daemon.name == "b" and st.daemon.held_runs == ["keras"]
    (other,) = st.other_daemons
    assert (other.name, other.runs_held, other.held_runs) == ("a", 2, ["tf1", "tf2"])
    assert other.stale and not other.alive and other.heartbeat_age >= 120
    assert [w.name for w in st.workers] == ["gpu1", "gpu2"]  # newest first; "gone" forgotten
    gpu1, gpu2 = st.workers
    assert gpu1.alive and not gpu1.stale and gpu1.concurrency == 2
    assert gpu1.serves == {"watches": [], "kinds": ["evaluate"]}
    assert [(j.kind, j.run, j.checkpoint) for j in gpu1.jobs] == [("evaluate", "tf2", "/x/ckpt-20")]
    assert gpu2.stale and not gpu2.alive and gpu2.heartbeat_age >= 120

    view = api_status.cluster(store)
    assert {d.name for d in view.daemons} == {"a", "b"}
    assert {w.name for w in view.workers} == {"gpu1", "gpu2"}
    store.close()


def test_a_worker_status_of_another_shape_is_shown_without_failing(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path}/ckptd.db")
    migrate.ensure_store_schema(store)
    _worker(store, "odd", "not a list", serves=["x"], concurrency="many")  # type: ignore[arg-type]
    (w,) = api_status.status(store).workers
    assert (w.jobs, w.serves, w.concurrency) == ([], {}, None)
    store.close()


@pytest.fixture
def cluster_db(tmp_path: Path, golden: Corpus) -> Path:
    """A database with runs recorded by `ckptd run --once` from real TF and Keras output."""
    root = tmp_path / "runs"
    root.mkdir()
    load_golden(root)
    conf = write_config(tmp_path / "c.toml", root, db=tmp_path / "ckptd.db")
    assert ckptd("run", "--once", config=conf).returncode == 0
    return conf


def test_status_alone_on_a_database_is_unchanged(cluster_db: Path) -> None:
    text = ckptd("status", config=cluster_db).stdout
    assert "daemon: not running (stopped; last seen" in text
    assert "worker" not in text and "version" not in text and " ago" not in text.split("\n")[1]
    data = json.loads(ckptd("status", "--json", config=cluster_db).stdout)
    assert data["workers"] == [] and data["other_daemons"] == []


@pytest.mark.slow
def test_status_and_metrics_of_a_live_daemon_and_workers(
    tmp_path: Path, cluster_db: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "runs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = write_config(
        tmp_path / "live.toml",
        root,
        db=tmp_path / "ckptd.db",
        daemon=f'name = "a"\nmetrics_address = "127.0.0.1:{port}"',
    )
    daemon_factory(conf)
    store = Store.open(f"sqlite:///{tmp_path}/ckptd.db")
    prefix = str(root / "tf2" / "ckpt-30")
    job = {"kind": "evaluate", "run": "tf2", "checkpoint": prefix, "since": "2026-12-01T00:00:00Z"}
    _worker(store, "gpu1", [job])
    stale = _worker(store, "gpu2", [])
    _age(store, stale, timedelta(minutes=3))

    def status() -> dict[str, Any] | None:
        data = json.loads(ckptd("status", "--json", config=conf).stdout)
        return data if data["daemon"]["alive"] and data["daemon"]["runs_held"] == 4 else None

    data = wait_for(status, timeout=60, interval=0.3)
    assert data["daemon"]["held_runs"] == ["keras", "sharded", "tf1", "tf2"]
    assert data["daemon"]["stale"] is False and data["daemon"]["heartbeat_age"] < 10
    workers = {w["name"]: w for w in data["workers"]}
    assert workers["gpu1"]["alive"] and workers["gpu1"]["jobs"] == [
        {"kind": "evaluate", "run": "tf2", "checkpoint": prefix, "since": job["since"]}
    ]
    assert workers["gpu2"]["stale"] and not workers["gpu2"]["alive"]

    text = ckptd("status", "-v", config=conf).stdout
    assert "  runs: keras, sharded, tf1, tf2" in text
    assert "name a, holds 4 run(s), lease expires" in text and "; version " in text
    assert "worker: alive — pid" in text and f"  evaluate {prefix} (run tf2)" in text
    assert "name gpu1, 1 of 2 job(s) in flight; serves evaluate of every watch" in text
    assert "worker: stale — pid" in text and "no heartbeat for 3m" in text
    assert "  runs:" not in ckptd("status", config=conf).stdout  # only with -v

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    metrics = wait_for(lambda: t if "ckptd_worker_jobs" in (t := scrape()) else None)
    assert (
        'ckptd_cluster_members{host="host-gpu1",name="gpu1",role="worker",state="alive"} 1.0'
        in (metrics)
    )
    assert (
        'ckptd_cluster_members{host="host-gpu2",name="gpu2",role="worker",state="stale"} 1.0'
        in (metrics)
    )
    assert 'ckptd_runs_held{daemon="a"} 4.0' in metrics
    assert 'ckptd_worker_jobs{name="gpu1"} 1.0' in metrics
    assert "ckptd_database_up 1.0" in metrics
    store.close()
