"""Read commands: status, ls, best, show, events. Read-only database access; no TensorFlow."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import click

from ckptd.cli.output import (
    CHECKPOINT,
    COUNT,
    CliContext,
    checkpoint_json,
    daemon_json,
    event_json,
    export_text,
    fmt_size,
    fmt_value,
    metric_columns,
    output_options,
    pass_ctx,
    print_json,
    table,
)
from ckptd.core.model import Checkpoint, iso

if TYPE_CHECKING:
    from ckptd.api.status import DaemonStatus

RUN_STATES = ("complete", "corrupt", "gone", "pruned")  # the counts `status` shows per run
LS_TAIL = ("eval", "marks", "kept because", "recorded (UTC)")  # `ls` columns after the metrics


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
    from ckptd.api.status import status as read_status

    st = read_status(ctx.store())
    d = st.daemon
    data = {
        "daemon": daemon_json(d),
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
    }
    if as_json:
        print_json(data)
        return
    # click, not rich: plain text into a pipe, colours on a terminal, and nothing to import.
    echo = click.echo
    _echo_daemon(d)
    for other in st.other_daemons:
        _echo_daemon(other)
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
            [[c.label, iso(c.recorded_at), _metrics_text(c.metrics)] for c in st.newest],
        )
    if st.problems:
        table(
            "recent problems and actions",
            ["at", "kind", "subject", "reason"],
            [[iso(a.at), a.kind, a.subject, a.reason] for a in st.problems],
        )


def _echo_daemon(d: DaemonStatus | None) -> None:
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
    else:
        why = "stopped" if d.stopped_at else "no heartbeat"
        echo(f"daemon: {style('not running', fg='red')} ({why}; last seen {iso(d.heartbeat_at)})")
    leases = f", lease expires {iso(d.lease_expires_at)}" if d.lease_expires_at else ""
    echo(f"  name {d.name}, holds {d.runs_held} run(s){leases}")
    for w in d.watches:
        if isinstance(w, dict) and w.get("observer") == "waiting for path":
            instead = f" (watching {w['watching']})" if w.get("watching") else ""
            echo(f"  waiting for {w.get('path')}{instead}")
        elif isinstance(w, dict):
            echo(f"  watching {w.get('path')} ({w.get('observer')})")
        else:
            echo(f"  watching {w}")


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
    type=click.Choice(["complete", "corrupt", "gone", "pruning", "pruned", "replaced"]),
    help="Only checkpoints in this state (repeatable).",
)
@click.option(
    "--all", "show_all", is_flag=True, help="Include gone, pruned and replaced checkpoints."
)
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
    from ckptd.api.listing import LISTED_STATES, listing

    wanted = list(states) or (None if show_all else LISTED_STATES)
    found = listing(ctx.store(), ctx.config(), run, wanted)
    items, best, kept = found.checkpoints, found.best, found.kept_because
    if as_json:
        print_json(
            [{**checkpoint_json(c, c.id in best), "kept_because": kept.get(c.id)} for c in items]
        )
        return
    names = metric_columns([c.metrics for c in items], found.best_metrics)
    rows = []
    for c in items:
        flags = (
            ("★ best " if c.id in best else "")
            + (f"exported {export_text(c)} " if c.exported else "")
            + ("pinned" if c.pinned else "")
        )
        state = c.state if c.state != "corrupt" else f"corrupt: {c.reason}"
        rows.append(
            [
                c.run,
                _step(c),
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
        ["run", "step", "format", "state", "size", *names, *LS_TAIL],
        rows,
        empty="no checkpoints recorded"
        + (f" for {run}" if run else "")
        + " (is the daemon running? see `ckptd status`)",
    )


def _step(c: Checkpoint) -> int | str | None:
    """The step, marked ``↻N`` when a later incarnation of the run wrote it (the trainer was
    restarted from scratch N - 1 times before)."""
    return c.step if c.incarnation == 1 else f"{c.step} ↻{c.incarnation}"


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
    from ckptd.api.listing import NoMetric
    from ckptd.api.listing import best as rank

    try:
        ranking = rank(ctx.store(), ctx.config(), run, metric, mode, top)
    except NoMetric as exc:
        raise click.UsageError(str(exc)) from None
    r, metric, mode, top_items = ranking.run, ranking.metric, ranking.mode, ranking.best
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
        known = sorted({k for c in ranking.complete for k in c.metrics})
        click.echo(
            f"no checkpoint of {r.name} has a value for {metric!r} yet"
            + (f"; metrics seen: {', '.join(known)}" if known else "")
        )
        raise SystemExit(1)
    table(
        f"best of {r.name} by {metric} ({mode})",
        ["rank", "step", metric, "path", "exported"],
        [
            [i + 1, c.step, fmt_value(c.metrics.get(metric)), c.prefix, export_text(c)]
            for i, c in enumerate(top_items)
        ],
    )


@click.command()
@click.argument("checkpoint", type=CHECKPOINT)
@output_options
@pass_ctx
def show(ctx: CliContext, checkpoint: str, as_json: bool) -> None:
    """The variables saved in CHECKPOINT: name, dtype, shape (what inspect_checkpoint prints).

    CHECKPOINT is a prefix path (model.ckpt-1000), a Keras file or RUN@STEP. Read straight from
    the .index file (a .keras or .weights.h5 file: its HDF5 weights, with h5py), without
    TensorFlow.

    \b
    Examples:
      ckptd show mnist@1000
      ckptd show /data/runs/mnist/model.ckpt-1000 --json
      ckptd show /data/runs/keras/model.03-0.23.keras
    """
    from ckptd.api.listing import Unreadable
    from ckptd.api.listing import show as variables

    try:
        shown = variables(checkpoint, ctx.store)
    except Unreadable as exc:
        raise click.ClickException(str(exc)) from None
    prefix, tensors = shown.prefix, shown.tensors
    if as_json:
        print_json(
            {
                "checkpoint": prefix,
                "note": shown.note,
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
    if shown.note:
        click.echo(shown.note)


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
    from ckptd.api.events import events as read_events

    items = read_events(ctx.store(), run=run, kinds=kinds, limit=limit)
    if as_json:
        print_json([event_json(a) for a in items])
        return
    table(
        None,
        ["at", "kind", "run", "subject", "reason"],
        [[iso(a.at), a.kind, a.run, a.subject, a.reason] for a in items],
        empty="no events yet",
    )


COMMANDS = [status, ls, best, show, events]
