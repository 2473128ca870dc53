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
from ckptd.store.leases import Held
from ckptd.store.runs import RunSummary

NEWEST = 5  # complete checkpoints shown, newest first
PROBLEMS = 5  # newest events of PROBLEM_KINDS shown
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
    """The newest daemon of the database, as its row and heartbeat tell."""

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


def status(store: Store) -> Status:
    rows = reads.status_rows(store, newest=NEWEST, problems=PROBLEMS, kinds=PROBLEM_KINDS)
    # The totals by state are the per-run counts summed (every checkpoint belongs to a run): one
    # pass over the checkpoints index instead of two.
    counts: dict[str, int] = {}
    for r in rows.runs:
        for state, n in r.counts.items():
            counts[state] = counts.get(state, 0) + n
    now = utcnow()
    return Status(
        daemon=daemon_status(rows.daemon, now, rows.leases) if rows.daemon else None,
        counts=dict(sorted(counts.items())),  # as GROUP BY state orders them
        evaluations=rows.work["evaluations"],
        exports=rows.work["exports"],
        runs=rows.runs,
        newest=rows.newest,
        problems=rows.problems,
        warnings=[RunWarning(m.run, steps.KIND, m.message) for m in steps.mismatches(store)],
        export_retries=retries(store) if rows.work["exports"].get("failed") else [],
        other_daemons=[daemon_status(d, now, rows.leases) for d in rows.others],
    )


def daemon_status(
    d: daemons.DaemonRecord, now: datetime, held: dict[str, Held] | None = None
) -> DaemonStatus:
    s = d.status
    interval = timedelta(seconds=float(str(s.get("heartbeat_interval", 10))))
    alive = d.stopped_at is None and now - d.heartbeat_at <= heartbeat_grace(interval)
    # A stale heartbeat from a process that still runs here: stuck (e.g. on a lock), not gone.
    unresponsive = (
        not alive
        and d.stopped_at is None
        and d.host == socket.gethostname()
        and daemons.ckptd_alive(d.pid)
    )
    leases = (held or {}).get(d.name) if d.stopped_at is None else None
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
        runs_held=leases.runs if leases else 0,
        lease_expires_at=leases.expires_at if leases else None,
    )
