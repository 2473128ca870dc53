"""What `ckptd status` shows: is the daemon alive, and what the database knows."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ckptd.api import steps
from ckptd.core.model import Action, Checkpoint, heartbeat_grace, utcnow
from ckptd.store import daemons, reads
from ckptd.store.exports import Retry, retries
from ckptd.store.handle import Store
from ckptd.store.runs import RunSummary

NEWEST = 5  # complete checkpoints shown, newest first
PROBLEMS = 5  # newest events of PROBLEM_KINDS shown
# A daemon or worker with no heartbeat for this long is no longer listed (killed long ago and
# never marked stopped; its row stays until one of its name starts again).
FORGET_AFTER = timedelta(hours=6)
PROBLEM_KINDS = (
    "corrupt",
    "gone",
    "event_file_corrupt",
    "pruned",
    "exported",
    "evaluation_failed",
    "unrecognized_files",
)


@dataclass(frozen=True)
class DaemonStatus:
    """A daemon of the database, as its row, heartbeat and leases tell."""

    alive: bool  # its heartbeat is fresh and it has not stopped
    unresponsive: bool  # not alive, yet its process runs on this host: stuck, not gone
    host: str
    pid: int
    version: str
    config: str
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    watches: list[Any]
    jobs: dict[str, float]  # job name -> when it last succeeded (epoch seconds)
    healthy: bool
    stuck: list[dict[str, Any]]
    reload_error: str | None
    name: str = ""  # [daemon] name
    runs_held: int = 0  # runs whose live lease it holds
    lease_expires_at: datetime | None = None  # the soonest of them
    held_runs: list[str] = field(default_factory=list)  # their names
    heartbeat_age: float = 0.0  # seconds since its last heartbeat
    stale: bool = False  # not stopped, yet no heartbeat within its grace (dead, stuck, cut off)


@dataclass(frozen=True)
class WorkerJob:
    """A job a worker has in flight, as its heartbeat tells."""

    kind: str  # evaluate | export
    run: str
    checkpoint: str | None
    since: str | None  # ISO time


@dataclass(frozen=True)
class WorkerStatus:
    """A `ckptd worker` of the database: who, how fresh, what it serves and is doing."""

    name: str
    host: str
    pid: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float
    alive: bool
    stale: bool
    unresponsive: bool
    serves: dict[str, list[str]]  # watches, kinds (empty: all)
    concurrency: int | None
    jobs: list[WorkerJob]


@dataclass(frozen=True)
class RunWarning:
    """Something about a run that keeps ckptd from doing what the user likely expects."""

    run: str
    kind: str  # steps_unmatched
    message: str


@dataclass(frozen=True)
class Status:
    daemon: DaemonStatus | None  # None: no daemon ever ran on this database
    counts: dict[str, int]  # checkpoints by state
    evaluations: dict[str, int]  # by status
    exports: dict[str, int]  # by status
    runs: list[RunSummary]
    newest: list[Checkpoint]
    problems: list[Action]
    warnings: list[RunWarning]
    # Runs whose newest export failed: when the daemon tries again (or that it gave up).
    export_retries: list[Retry] = field(default_factory=list)
    # The other daemons sharing the database (each with a name of its own), newest first.
    other_daemons: list[DaemonStatus] = field(default_factory=list)
    workers: list[WorkerStatus] = field(default_factory=list)  # newest first


@dataclass(frozen=True)
class Cluster:
    """Every daemon and worker on the database (the Prometheus endpoint's view)."""

    daemons: list[DaemonStatus]
    workers: list[WorkerStatus]


def status(store: Store) -> Status:
    now = utcnow()
    rows = reads.status_rows(
        store, newest=NEWEST, problems=PROBLEMS, kinds=PROBLEM_KINDS, seen_since=now - FORGET_AFTER
    )
    # The totals by state are the per-run counts summed (every checkpoint belongs to a run): one
    # pass over the checkpoints index instead of two.
    counts: dict[str, int] = {}
    for r in rows.runs:
        for state, n in r.counts.items():
            counts[state] = counts.get(state, 0) + n
    return Status(
        daemon=daemon_status(rows.daemon, now, rows.held) if rows.daemon else None,
        counts=dict(sorted(counts.items())),  # as GROUP BY state orders them
        evaluations=rows.work["evaluations"],
        exports=rows.work["exports"],
        runs=rows.runs,
        newest=rows.newest,
        problems=rows.problems,
        warnings=[RunWarning(m.run, steps.KIND, m.message) for m in steps.mismatches(store)],
        export_retries=retries(store) if rows.work["exports"].get("failed") else [],
        other_daemons=[
            daemon_status(d, now, rows.held) for d in rows.others if d.role == daemons.DAEMON
        ],
        workers=[worker_status(w, now) for w in rows.others if w.role == daemons.WORKER],
    )


def cluster(store: Store) -> Cluster:
    """Every daemon and worker seen within FORGET_AFTER, with their leases (two SELECTs)."""
    now = utcnow()
    members, held = reads.cluster_rows(store, seen_since=now - FORGET_AFTER)
    return Cluster(
        [daemon_status(d, now, held) for d in members if d.role == daemons.DAEMON],
        [worker_status(w, now) for w in members if w.role == daemons.WORKER],
    )


def _liveness(d: daemons.DaemonRecord, now: datetime) -> tuple[bool, bool, float]:
    """(alive, unresponsive, heartbeat age in seconds) of a daemon's or worker's row."""
    try:
        seconds = float(d.status.get("heartbeat_interval", 10))
    except (TypeError, ValueError):
        seconds = 10.0
    age = now - d.heartbeat_at
    alive = d.stopped_at is None and age <= heartbeat_grace(timedelta(seconds=seconds))
    # A stale heartbeat from a process that still runs here: stuck (e.g. on a lock), not gone.
    unresponsive = (
        not alive
        and d.stopped_at is None
        and d.host == socket.gethostname()
        and daemons.ckptd_alive(d.pid)
    )
    return alive, unresponsive, max(age.total_seconds(), 0.0)


def daemon_status(
    d: daemons.DaemonRecord,
    now: datetime,
    held: dict[str, list[tuple[str, datetime]]] | None = None,
) -> DaemonStatus:
    s = d.status
    alive, unresponsive, age = _liveness(d, now)
    leases = (held or {}).get(d.name, []) if d.stopped_at is None else []
    return DaemonStatus(
        alive=alive,
        unresponsive=unresponsive,
        name=d.name,
        host=d.host,
        pid=d.pid,
        version=d.version,
        config=d.config,
        started_at=d.started_at,
        heartbeat_at=d.heartbeat_at,
        stopped_at=d.stopped_at,
        watches=s.get("watches", []),
        jobs=s.get("jobs", {}),
        healthy=alive and bool(s.get("healthy")),
        stuck=s.get("stuck", []),
        reload_error=s.get("reload_error"),
        runs_held=len(leases),
        lease_expires_at=min((e for _r, e in leases), default=None),
        held_runs=[r for r, _e in leases],
        heartbeat_age=age,
        stale=d.stopped_at is None and not alive,
    )


def worker_status(w: daemons.DaemonRecord, now: datetime) -> WorkerStatus:
    """A worker's row; its heartbeat's status is read defensively (written by another version,
    perhaps): what does not have the expected shape is left out."""
    s = w.status
    alive, unresponsive, age = _liveness(w, now)
    serves, jobs, concurrency = s.get("serves"), s.get("jobs"), s.get("concurrency")
    serves = serves if isinstance(serves, dict) else {}
    jobs = jobs if isinstance(jobs, list) else []
    return WorkerStatus(
        name=w.name,
        host=w.host,
        pid=w.pid,
        version=w.version,
        started_at=w.started_at,
        heartbeat_at=w.heartbeat_at,
        heartbeat_age=age,
        alive=alive,
        stale=w.stopped_at is None and not alive,
        unresponsive=unresponsive,
        serves={k: [str(x) for x in v] for k, v in serves.items() if isinstance(v, list)},
        concurrency=concurrency if isinstance(concurrency, int) else None,
        jobs=[
            WorkerJob(
                str(j.get("kind", "")),
                str(j.get("run", "")),
                None if j.get("checkpoint") is None else str(j["checkpoint"]),
                None if j.get("since") is None else str(j["since"]),
            )
            for j in jobs
            if isinstance(j, dict)
        ],
    )
