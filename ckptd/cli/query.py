"""Read commands: status, ls, best, show, events. Read-only database access; no TensorFlow."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import click

from ckptd.cli.output import (
    CHECKPOINT,
    COUNT,
    CliContext,
    fmt_size,
    fmt_value,
    output_options,
    pass_ctx,
    print_json,
    table,
)
from ckptd.core.model import Checkpoint, iso, utcnow


def _best_ids(ctx: CliContext, session: Any, checkpoints: Sequence[Checkpoint]) -> set[int]:
    """The best checkpoint of each run among ``checkpoints``, by its watch's configured metric."""
    from ckptd.core.ranking import select_best
    from ckptd.store import queries

    by_run: dict[int, list[Checkpoint]] = {}
    for c in checkpoints:
        by_run.setdefault(c.run_id, []).append(c)
    best = set()
    runs = {r.id: r for r in queries.runs(session)}
    for run_id, items in by_run.items():
        watch = ctx.watch_for(runs[run_id].watch_path) if run_id in runs else None
        if watch is None or not watch.best.metric:
            continue
        b = select_best(items, watch.best.metric, watch.best.mode)
        if b is not None:
            best.add(b.id)
    return best


def _retention_reasons(
    ctx: CliContext, session: Any, checkpoints: Sequence[Checkpoint]
) -> dict[int, list[str]]:
    """Why each checkpoint survives its run's [watch.retain] policy (runs with one only)."""
    from ckptd.api.prune import rules_for
    from ckptd.core.model import utcnow
    from ckptd.core.retention import plan as plan_prune
    from ckptd.store import queries

    runs = {r.id: r for r in queries.runs(session)}
    out: dict[int, list[str]] = {}
    for run_id in {c.run_id for c in checkpoints}:
        watch = ctx.watch_for(runs[run_id].watch_path) if run_id in runs else None
        rules = rules_for(watch) if watch else None
        if rules is None:
            continue
        plan = plan_prune(queries.checkpoints(session, run_id=run_id), rules, utcnow())
        out.update({c.id: [] for c in plan.delete})  # the next prune deletes these
        out.update({cid: list(reasons) for cid, reasons in plan.keep.items()})
    return out


def checkpoint_json(c: Checkpoint, best: bool) -> dict[str, Any]:
    """The ``ls --json`` contract: run, step, path, state, metrics, best, exported, recorded_at."""
    return {
        "run": c.run,
        "step": c.step,
        "path": c.prefix,
        "state": c.state,
        "metrics": c.metrics,
        "best": best,
        "exported": c.exported,
        "recorded_at": iso(c.recorded_at),
        "format": c.format,
        "size": c.size,
        "files": list(c.files),
        "has_meta": c.has_meta,
        "reason": c.reason,
        "pinned": c.pinned,
        "evaluation": c.evaluation,
        "created_at": iso(c.created_at),
    }


@click.command()
@output_options
@pass_ctx
def status(ctx: CliContext, as_json: bool) -> None:
    """Is the daemon alive, what does it watch, how many checkpoints in which state.

    \b
    Examples:
      ckptd status
      ckptd status --json | jq .daemon.alive
    """
    import socket

    from ckptd.core.model import heartbeat_grace
    from ckptd.store import queries
    from ckptd.store.daemons import ckptd_alive

    with ctx.session() as s:
        d = queries.latest_daemon(s)
        runs = queries.run_summaries(s)
        newest = queries.checkpoints(s, states=["complete"], limit=5, newest_first=True)
        work = queries.work_counts(s)
        recent = queries.actions(
            s,
            limit=5,
            kinds=[
                "corrupt",
                "gone",
                "event_file_corrupt",
                "pruned",
                "exported",
                "evaluation_failed",
            ],
        )
    # The totals by state are the per-run counts summed (every checkpoint belongs to a run): one
    # pass over the checkpoints index instead of two.
    counts: dict[str, int] = {}
    for r in runs:
        for state, n in r["counts"].items():
            counts[state] = counts.get(state, 0) + n
    counts = dict(sorted(counts.items()))  # as GROUP BY state ordered them
    daemon: dict[str, Any] = {"alive": False}
    if d is not None:
        interval = timedelta(seconds=float(str((d.status or {}).get("heartbeat_interval", 10))))
        alive = d.stopped_at is None and utcnow() - d.heartbeat_at <= heartbeat_grace(interval)
        # A stale heartbeat from a process that still runs here: stuck (e.g. on a lock), not gone.
        unresponsive = (
            not alive
            and d.stopped_at is None
            and d.host == socket.gethostname()
            and ckptd_alive(d.pid)
        )
        daemon = {
            "alive": alive,
            "unresponsive": unresponsive,
            "host": d.host,
            "pid": d.pid,
            "version": d.version,
            "config": d.config,
            "started_at": iso(d.started_at),
            "heartbeat_at": iso(d.heartbeat_at),
            "stopped_at": iso(d.stopped_at),
            "watches": (d.status or {}).get("watches", []),
            "jobs": (d.status or {}).get("jobs", {}),
            "healthy": alive and bool((d.status or {}).get("healthy")),
            "stuck": (d.status or {}).get("stuck", []),
            "reload_error": (d.status or {}).get("reload_error"),
        }
    data = {
        "daemon": daemon,
        "counts": counts,
        "evaluations": work["evaluations"],
        "exports": work["exports"],
        "runs": runs,
        "newest": [checkpoint_json(c, False) for c in newest],
        "problems": [
            {
                "at": iso(a.at),
                "kind": a.kind,
                "run": a.run,
                "subject": a.subject,
                "reason": a.reason,
            }
            for a in recent
        ],
    }
    if as_json:
        print_json(data)
        return
    # click, not rich: plain text into a pipe, colours on a terminal, and nothing to import.
    echo, style = click.echo, click.style
    if d is None:
        echo(
            f"daemon: {style('never started', fg='yellow')} on this database "
            "(start it with `ckptd run`)"
        )
    elif daemon["alive"]:
        echo(
            f"daemon: {style('alive', fg='green')} — pid {d.pid} on {d.host}, since "
            f"{iso(d.started_at)}, last heartbeat {iso(d.heartbeat_at)}"
        )
    elif daemon["unresponsive"]:
        echo(
            f"daemon: {style('unhealthy', fg='red')} — pid {d.pid} on {d.host} runs but wrote "
            f"no heartbeat since {iso(d.heartbeat_at)} (stuck; its log and `systemctl status "
            "ckptd` say on what)"
        )
    else:
        why = "stopped" if d.stopped_at else "no heartbeat"
        echo(f"daemon: {style('not running', fg='red')} ({why}; last seen {iso(d.heartbeat_at)})")
    if daemon.get("alive"):
        health = (
            style("healthy", fg="green") if daemon.get("healthy") else style("unhealthy", fg="red")
        )
        jobs = daemon.get("jobs") or {}
        now = time.time()
        ago = ", ".join(f"{k} {now - float(v):.0f}s ago" for k, v in sorted(jobs.items()))
        echo(
            f"  {health} (observers, scheduler, database, progress); last runs: {ago or 'none yet'}"
        )
        for item in daemon.get("stuck") or []:
            busy = f"{item.get('what')} for {item.get('seconds', 0):.0f} s"
            echo(f"  {style('stuck:', fg='red')} {busy}")
        if daemon.get("reload_error"):
            echo(
                f"  {style('last reload failed, running the previous config:', fg='yellow')} "
                f"{daemon['reload_error']}"
            )
    for w in daemon.get("watches", []):
        if isinstance(w, dict):
            echo(f"  watching {w.get('path')} ({w.get('observer')})")
        else:
            echo(f"  watching {w}")
    total = sum(counts.values())
    echo(
        f"checkpoints: {total} — "
        + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none yet")
    )
    if work["evaluations"] or work["exports"]:
        echo(
            "evaluations: "
            + (", ".join(f"{n} {k}" for k, n in sorted(work["evaluations"].items())) or "none")
            + " — exports: "
            + (", ".join(f"{n} {k}" for k, n in sorted(work["exports"].items())) or "none")
        )
    table(
        "runs",
        ["run", "complete", "corrupt", "gone", "pruned", "newest step", "path"],
        [
            [
                r["run"],
                r["counts"].get("complete", 0),
                r["counts"].get("corrupt", 0),
                r["counts"].get("gone", 0),
                r["counts"].get("pruned", 0),
                r["newest_step"],
                r["path"],
            ]
            for r in runs
        ],
        empty="no runs recorded yet",
    )
    if newest:
        table(
            "newest",
            ["checkpoint", "recorded", "metrics"],
            [[c.label, iso(c.recorded_at), _metrics_text(c.metrics)] for c in newest],
        )
    if recent:
        table(
            "recent problems and actions",
            ["at", "kind", "subject", "reason"],
            [[iso(a.at), a.kind, a.subject, a.reason] for a in recent],
        )


def _short_time(dt: Any) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else ""


def _metrics_text(metrics: dict[str, float], limit: int = 4) -> str:
    items = list(metrics.items())
    text = ", ".join(f"{k}={fmt_value(v)}" for k, v in items[:limit])
    return text + (f", +{len(items) - limit}" if len(items) > limit else "")


@click.command("ls")
@click.argument("run", required=False)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["complete", "corrupt", "gone", "pruning", "pruned"]),
    help="Only checkpoints in this state (repeatable).",
)
@click.option("--all", "show_all", is_flag=True, help="Include gone and pruned checkpoints.")
@output_options
@pass_ctx
def ls(
    ctx: CliContext, run: str | None, states: tuple[str, ...], show_all: bool, as_json: bool
) -> None:
    """List checkpoints: step, state, metrics, best, exported, when recorded.

    RUN is a run name (its path relative to the watched directory) or an absolute path.

    \b
    Examples:
      ckptd ls                      # every run
      ckptd ls mnist
      ckptd ls mnist --json | jq '.[] | select(.best)'
      ckptd ls --state corrupt      # what is wrong, and why
    """
    from ckptd.store import queries

    with ctx.session() as s:
        run_id = queries.resolve_run(s, run).id if run else None
        wanted = list(states) or (None if show_all else ["complete", "corrupt", "pruning"])
        items = queries.checkpoints(s, run_id=run_id, states=wanted)
        best = _best_ids(ctx, s, items)
        kept = _retention_reasons(ctx, s, items)
    if as_json:
        print_json(
            [{**checkpoint_json(c, c.id in best), "kept_because": kept.get(c.id)} for c in items]
        )
        return
    names = sorted({k for c in items for k in c.metrics})[:4]
    rows = []
    for c in items:
        flags = (
            ("★ best " if c.id in best else "")
            + ("exported " if c.exported else "")
            + ("pinned" if c.pinned else "")
        )
        state = c.state if c.state != "corrupt" else f"corrupt: {c.reason}"
        rows.append(
            [
                c.run,
                c.step,
                c.format + ("" if c.has_meta or c.format != "tf1" else " (no meta)"),
                state,
                fmt_size(c.size),
                *[fmt_value(c.metrics.get(n)) for n in names],
                c.evaluation or "",
                flags.strip(),
                (", ".join(kept[c.id]) or "prunable") if c.id in kept else "",
                _short_time(c.recorded_at),
            ]
        )
    table(
        None,
        [
            "run",
            "step",
            "format",
            "state",
            "size",
            *names,
            "eval",
            "",
            "kept because",
            "recorded (UTC)",
        ],
        rows,
        empty="no checkpoints recorded"
        + (f" for {run}" if run else "")
        + " (is the daemon running? see `ckptd status`)",
    )


@click.command()
@click.argument("run")
@click.option("--metric", help="Rank by this metric instead of the configured one.")
@click.option("--mode", type=click.Choice(["max", "min"]), help="Larger or smaller is better.")
@click.option("--top", default=1, show_default=True, type=COUNT, help="Show the best N.")
@output_options
@pass_ctx
def best(
    ctx: CliContext, run: str, metric: str | None, mode: str | None, top: int, as_json: bool
) -> None:
    """The best checkpoint of RUN by the configured metric (ties go to the newer step).

    NaN and missing values never win; corrupt or deleted checkpoints never count.

    \b
    Examples:
      ckptd best mnist
      ckptd best mnist --metric eval/loss --mode min --top 3 --json
    """
    from ckptd.core.ranking import ranked
    from ckptd.store import queries

    with ctx.session() as s:
        r = queries.resolve_run(s, run)
        watch = ctx.watch_for(r.watch_path)
        metric = metric or (watch.best.metric if watch else None)
        mode = mode or (watch.best.mode if watch else "max")
        if not metric:
            raise click.UsageError(
                f"no metric configured for run {r.name!r}: set [watch.best] metric in the config "
                "or pass --metric NAME"
            )
        items = queries.checkpoints(s, run_id=r.id, states=["complete"])
    top_items = ranked(items, metric, mode)[:top]
    if as_json:
        print_json(
            {
                "run": r.name,
                "metric": metric,
                "mode": mode,
                "best": [checkpoint_json(c, i == 0) for i, c in enumerate(top_items)],
            }
        )
        return
    if not top_items:
        known = sorted({k for c in items for k in c.metrics})
        click.echo(
            f"no checkpoint of {r.name} has a value for {metric!r} yet"
            + (f"; metrics seen: {', '.join(known)}" if known else "")
        )
        raise SystemExit(1)
    table(
        f"best of {r.name} by {metric} ({mode})",
        ["rank", "step", metric, "path", "exported"],
        [
            [i + 1, c.step, fmt_value(c.metrics.get(metric)), c.prefix, "yes" if c.exported else ""]
            for i, c in enumerate(top_items)
        ],
    )


@click.command()
@click.argument("checkpoint", type=CHECKPOINT)
@output_options
@pass_ctx
def show(ctx: CliContext, checkpoint: str, as_json: bool) -> None:
    """The variables saved in CHECKPOINT: name, dtype, shape (what inspect_checkpoint prints).

    CHECKPOINT is a prefix path (model.ckpt-1000) or RUN@STEP. Read straight from the .index
    file, without TensorFlow.

    \b
    Examples:
      ckptd show mnist@1000
      ckptd show /data/runs/mnist/model.ckpt-1000 --json
    """
    import os

    from ckptd.io import safeio
    from ckptd.io.formats import INDEX_MAX_BYTES
    from ckptd.io.formats.tensorbundle import BundleError, list_tensors

    prefix = checkpoint
    # A path the user typed is read where it is; a recorded checkpoint is reached from its
    # watch root, never through a symlink below it.
    root = os.path.dirname(os.path.abspath(checkpoint + ".index"))
    if not os.path.exists(checkpoint + ".index"):
        from sqlalchemy import select

        from ckptd.store import queries
        from ckptd.store.tables import RunRow

        with ctx.session() as s:
            record = queries.resolve_checkpoint(s, checkpoint)
            root = s.scalar(select(RunRow.watch_path).where(RunRow.id == record.run_id)) or root
        prefix = record.prefix
    try:
        tensors = list_tensors(safeio.read_under(root, prefix + ".index", INDEX_MAX_BYTES))
    except FileNotFoundError:
        raise click.ClickException(
            f"{prefix}.index does not exist (was it pruned or deleted? see `ckptd events`)"
        ) from None
    except safeio.TooLarge:
        raise click.ClickException(
            f"{prefix}.index is larger than {INDEX_MAX_BYTES >> 20} MiB, which no real "
            "checkpoint index is; not read"
        ) from None
    except OSError as exc:  # a FIFO or a symlink, a symlinked directory, permissions …
        raise click.ClickException(
            f"{prefix}.index cannot be read: {exc.strerror or exc}"
        ) from None
    except BundleError as exc:
        raise click.ClickException(f"{prefix}.index cannot be read: {exc}") from None
    if as_json:
        print_json(
            {
                "checkpoint": prefix,
                "variables": [
                    {
                        "name": t.name,
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "shard": t.shard,
                        "bytes": t.size,
                    }
                    for t in tensors
                ],
            }
        )
        return
    table(
        f"{prefix}: {len(tensors)} tensors",
        ["name", "dtype", "shape", "bytes"],
        [[t.name, t.dtype, list(t.shape), t.size] for t in tensors],
    )


@click.command()
@click.option("--run", help="Only this run.")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    help="Only these kinds (recorded, corrupt, gone, pruned, exported, …).",
)
@click.option("--limit", default=50, show_default=True, type=COUNT, help="How many, newest last.")
@output_options
@pass_ctx
def events(
    ctx: CliContext, run: str | None, kinds: tuple[str, ...], limit: int, as_json: bool
) -> None:
    """The audit log: what ckptd did or noticed, to what, why, when.

    \b
    Examples:
      ckptd events --limit 20
      ckptd events --run mnist --kind gone --kind corrupt --json
    """
    from ckptd.store import queries

    with ctx.session() as s:
        run_id = queries.resolve_run(s, run).id if run else None
        items = queries.actions(s, limit=limit, run_id=run_id, kinds=kinds or None)
    if as_json:
        print_json(
            [
                {
                    "id": a.id,
                    "at": iso(a.at),
                    "kind": a.kind,
                    "run": a.run,
                    "subject": a.subject,
                    "reason": a.reason,
                    "detail": a.detail,
                }
                for a in items
            ]
        )
        return
    table(
        None,
        ["at", "kind", "run", "subject", "reason"],
        [[iso(a.at), a.kind, a.run, a.subject, a.reason] for a in items],
        empty="no events yet",
    )


COMMANDS = [status, ls, best, show, events]
