"""What `ckptd status` prints: the daemons and workers on the database, then what it knows.

Text for people (click, not rich: plain text into a pipe, colours on a terminal, nothing to
import) and the ``--json`` contract for scripts.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from ckptd.cli.output import checkpoint_json, daemon_json, fmt_value, table
from ckptd.core.model import iso

if TYPE_CHECKING:
    from ckptd.api.status import DaemonStatus, Status, WorkerStatus

RUN_STATES = ("complete", "corrupt", "gone", "pruned")  # the counts `status` shows per run


def status_json(st: Status) -> dict[str, Any]:
    """The ``status --json`` contract."""
    return {
        "daemon": daemon_json(st.daemon),
        "counts": st.counts,
        "evaluations": st.evaluations,
        "exports": st.exports,
        "runs": [dataclasses.asdict(r) for r in st.runs],
        "newest": [checkpoint_json(c, False) for c in st.newest],
        "export_retries": [
            {
                "run": r.run,
                "step": r.step,
                "checkpoint": r.checkpoint,
                "attempt": r.attempt,
                "next_attempt_at": iso(r.next_attempt_at),
                "error": r.error,
            }
            for r in st.export_retries
        ],
        "problems": [
            {
                "at": iso(a.at),
                "kind": a.kind,
                "run": a.run,
                "subject": a.subject,
                "reason": a.reason,
            }
            for a in st.problems
        ],
        "warnings": [dataclasses.asdict(w) for w in st.warnings],
        "other_daemons": [daemon_json(o) for o in st.other_daemons],
        "workers": [worker_json(w) for w in st.workers],
    }


def worker_json(w: WorkerStatus) -> dict[str, Any]:
    """One object of the ``status --json`` contract's ``workers`` list."""
    data = dataclasses.asdict(w)
    for key in ("started_at", "heartbeat_at"):
        data[key] = iso(data[key])
    return data


def echo_status(st: Status, *, verbose: bool = False) -> None:
    echo = click.echo
    # With other daemons or workers, each line says its version and heartbeat age; alone, the
    # daemon's lines are what they always were.
    cluster = bool(st.other_daemons or st.workers)
    echo_daemon(st.daemon, cluster=cluster, verbose=verbose)
    for other in st.other_daemons:
        echo_daemon(other, cluster=cluster, verbose=verbose)
    for worker in st.workers:
        echo_worker(worker)
    total = sum(st.counts.values())
    echo(
        f"checkpoints: {total} — "
        + (", ".join(f"{n} {k}" for k, n in sorted(st.counts.items())) or "none yet")
    )
    if st.evaluations or st.exports:
        echo(
            "evaluations: "
            + (", ".join(f"{n} {k}" for k, n in sorted(st.evaluations.items())) or "none")
            + " — exports: "
            + (", ".join(f"{n} {k}" for k, n in sorted(st.exports.items())) or "none")
        )
    for r in st.export_retries:
        label = f"{r.run}@{r.step}" if r.step is not None else r.checkpoint
        when = (
            f"next attempt at {iso(r.next_attempt_at)}"
            if r.next_attempt_at
            else f"gave up; `ckptd freeze {label}` tries again"
        )
        echo(f"  export of {label} failed (attempt {r.attempt or 1}; {when}): {r.error}")
    table(
        "runs",
        ["run", *RUN_STATES, "newest step", "path"],
        [
            [r.run, *(r.counts.get(k, 0) for k in RUN_STATES), r.newest_step, r.path]
            for r in st.runs
        ],
        empty="no runs recorded yet",
    )
    for w in st.warnings:
        echo(f"{click.style('warning:', fg='yellow')} run {w.run}: {w.message}")
    if st.newest:
        table(
            "newest",
            ["checkpoint", "recorded", "metrics"],
            [[c.label, iso(c.recorded_at), metrics_text(c.metrics)] for c in st.newest],
        )
    if st.problems:
        table(
            "recent problems and actions",
            ["at", "kind", "subject", "reason"],
            [[iso(a.at), a.kind, a.subject, a.reason] for a in st.problems],
        )


def age_text(seconds: float) -> str:
    """``4s``, ``3m 05s``, ``2h 10m``: how long ago, to the unit that matters."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _stale_text(role: str, pid: int, host: str, age: float, heartbeat: str | None) -> str:
    style = click.style
    return (
        f"{role}: {style('stale', fg='red')} — pid {pid} on {host} wrote no heartbeat for "
        f"{age_text(age)} (last {heartbeat}): stopped without saying so, stuck, or cut off "
        "from the database (its host's log and `systemctl status` say which)"
    )


def echo_daemon(d: DaemonStatus | None, *, cluster: bool = False, verbose: bool = False) -> None:
    echo, style = click.echo, click.style
    if d is None:
        echo(
            f"daemon: {style('never started', fg='yellow')} on this database "
            "(start it with `ckptd run`)"
        )
        return
    if d.alive:
        echo(
            f"daemon: {style('alive', fg='green')} — pid {d.pid} on {d.host}, since "
            f"{iso(d.started_at)}, last heartbeat {iso(d.heartbeat_at)}"
        )
        health = style("healthy", fg="green") if d.healthy else style("unhealthy", fg="red")
        now = time.time()
        ago = ", ".join(f"{k} {now - float(v):.0f}s ago" for k, v in sorted((d.jobs or {}).items()))
        echo(
            f"  {health} (observers, scheduler, database, progress); last runs: {ago or 'none yet'}"
        )
        for item in d.stuck or []:
            busy = f"{item.get('what')} for {item.get('seconds', 0):.0f} s"
            echo(f"  {style('stuck:', fg='red')} {busy}")
        if d.reload_error:
            echo(
                f"  {style('last reload failed, running the previous config:', fg='yellow')} "
                f"{d.reload_error}"
            )
    elif d.unresponsive:
        echo(
            f"daemon: {style('unhealthy', fg='red')} — pid {d.pid} on {d.host} runs but wrote "
            f"no heartbeat since {iso(d.heartbeat_at)} (stuck; its log and `systemctl status "
            "ckptd` say on what)"
        )
    elif d.stale and cluster:
        echo(_stale_text("daemon", d.pid, d.host, d.heartbeat_age, iso(d.heartbeat_at)))
    else:
        why = "stopped" if d.stopped_at else "no heartbeat"
        echo(f"daemon: {style('not running', fg='red')} ({why}; last seen {iso(d.heartbeat_at)})")
    leases = f", lease expires {iso(d.lease_expires_at)}" if d.lease_expires_at else ""
    about = f"; version {d.version}, heartbeat {age_text(d.heartbeat_age)} ago" if cluster else ""
    echo(f"  name {d.name}, holds {d.runs_held} run(s){leases}{about}")
    if verbose and d.held_runs:
        echo(f"  runs: {', '.join(d.held_runs)}")
    for w in d.watches:
        if isinstance(w, dict) and w.get("observer") == "waiting for path":
            instead = f" (watching {w['watching']})" if w.get("watching") else ""
            echo(f"  waiting for {w.get('path')}{instead}")
        elif isinstance(w, dict):
            echo(f"  watching {w.get('path')} ({w.get('observer')}{_requests_text(w)})")
            if w.get("last_error"):
                since = w.get("failing_since")
                when = f" since {iso(datetime.fromtimestamp(since, UTC))}" if since else ""
                echo("    " + style(f"failing{when}: {w['last_error']}", fg="red"))
        else:
            echo(f"  watching {w}")


def _requests_text(w: dict[str, Any]) -> str:
    """An object store watch's request rate (what listing the bucket costs)."""
    if "requests" not in w:
        return ""
    rate = w.get("requests_per_minute")
    shown = "measuring" if rate is None else f"{rate:g}/min"
    return f", {w['requests']} requests, {shown}"


def echo_worker(w: WorkerStatus) -> None:
    echo, style = click.echo, click.style
    if w.alive:
        echo(
            f"worker: {style('alive', fg='green')} — pid {w.pid} on {w.host}, since "
            f"{iso(w.started_at)}, last heartbeat {iso(w.heartbeat_at)}"
        )
    elif w.unresponsive:
        echo(
            f"worker: {style('unhealthy', fg='red')} — pid {w.pid} on {w.host} runs but wrote "
            f"no heartbeat since {iso(w.heartbeat_at)} (stuck; its log says on what)"
        )
    else:
        echo(_stale_text("worker", w.pid, w.host, w.heartbeat_age, iso(w.heartbeat_at)))
    watches = ", ".join(w.serves.get("watches", [])) or "every watch"
    kinds = ", ".join(w.serves.get("kinds", [])) or "evaluate, export"
    slots = f" of {w.concurrency}" if w.concurrency else ""
    echo(
        f"  name {w.name}, {len(w.jobs)}{slots} job(s) in flight; serves {kinds} of {watches}; "
        f"version {w.version}, heartbeat {age_text(w.heartbeat_age)} ago"
    )
    for j in w.jobs:
        what = j.checkpoint or j.run
        since = f" since {j.since}" if j.since else ""
        echo(f"  {j.kind} {what} (run {j.run}){since}")


def metrics_text(metrics: dict[str, float], limit: int = 4) -> str:
    items = list(metrics.items())
    text = ", ".join(f"{k}={fmt_value(v)}" for k, v in items[:limit])
    return text + (f", +{len(items) - limit}" if len(items) > limit else "")
