"""Read commands: status, ls, best, show, events. Read-only database access; no TensorFlow."""

from __future__ import annotations

from typing import Any

import click

from ckptd.cli.output import (
    CHECKPOINT,
    COUNT,
    CliContext,
    checkpoint_json,
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

LS_TAIL = ("eval", "marks", "kept because", "recorded (UTC)")  # `ls` columns after the metrics


@click.command()
@click.option("-v", "--verbose", is_flag=True, help="Also list the runs each daemon holds.")
@output_options
@pass_ctx
def status(ctx: CliContext, verbose: bool, as_json: bool) -> None:
    """Which daemons and workers are alive, what they watch and do, how many checkpoints in
    which state.

    \b
    Examples:
      ckptd status
      ckptd status --json | jq .daemon.alive
      ckptd status --json | jq '.workers[] | {name, alive, jobs}'
    """
    from ckptd.api.status import status as read_status
    from ckptd.cli.status_view import echo_status, status_json

    st = read_status(ctx.store())
    if as_json:
        print_json(status_json(st))
        return
    echo_status(st, verbose=verbose)


def _short_time(dt: Any) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else ""


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
    TensorFlow; a checkpoint on S3 or GCS: its .index object, with one GET.

    \b
    Examples:
      ckptd show mnist@1000
      ckptd show /data/runs/mnist/model.ckpt-1000 --json
      ckptd show /data/runs/keras/model.03-0.23.keras
    """
    from ckptd.api.listing import Unreadable
    from ckptd.api.listing import show as variables

    try:
        shown = variables(checkpoint, ctx.store, ctx.config)
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
