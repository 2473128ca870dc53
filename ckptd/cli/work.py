"""On-demand work: evaluate and freeze now, in a TensorFlow worker (never in this process)."""

from __future__ import annotations

from typing import Any

import click

from ckptd.cli.output import (
    CHECKPOINT,
    CliContext,
    fmt_value,
    output_options,
    pass_ctx,
    print_json,
    table,
)


def _targets(ctx: CliContext, target: str) -> tuple[Any, Any, Any]:
    """(run, watch, checkpoint or None) for a RUN or CHECKPOINT argument."""
    from ckptd.store import queries

    with ctx.store().session() as s:
        try:
            run = queries.resolve_run(s, target)
            checkpoint = None
        except queries.NotFound:
            checkpoint = queries.resolve_checkpoint(s, target)
            run = next(r for r in queries.runs(s) if r.id == checkpoint.run_id)
    watch = ctx.watch_for(run.watch_path)
    if watch is None:
        raise click.ClickException(
            f"run {run.name} is not under any watch in {ctx.config().source}"
        )
    return run, watch, checkpoint


@click.command()
@click.argument("target", metavar="CHECKPOINT|RUN", type=CHECKPOINT)
@click.option("--again", is_flag=True, help="Re-evaluate checkpoints that were already evaluated.")
@output_options
@pass_ctx
def evaluate(ctx: CliContext, target: str, again: bool, as_json: bool) -> None:
    """Evaluate a checkpoint, or every not-yet-evaluated checkpoint of a run, now.

    Uses the run's [watch.evaluate] evaluator in a warm TensorFlow worker process and records
    the metrics (they count for `best` and retention at once).

    \b
    Examples:
      ckptd evaluate mnist@1200
      ckptd evaluate mnist            # the whole backlog, with progress
      ckptd evaluate mnist --again --json
    """
    from sqlalchemy import delete, select

    from ckptd.daemon.evaluate import Evaluator
    from ckptd.store.tables import CheckpointRow, EvaluationRow

    run, watch, checkpoint = _targets(ctx, target)
    if watch.evaluate is None or watch.evaluate.evaluator == "tfevents":
        raise click.ClickException(
            f"run {run.name} has no evaluator: add [watch.evaluate] with evaluator = "
            '"meta_graph", "keras", "python" or "command" to the config'
        )
    cfg = ctx.config(required=True)
    engine = ctx.store(readonly=False).engine
    evaluator = Evaluator(engine, cfg)
    with ctx.store(readonly=False).session() as s:
        ids = (
            [checkpoint.id]
            if checkpoint
            else list(s.scalars(select(CheckpointRow.id).where(CheckpointRow.run_id == run.id)))
        )
        if again or checkpoint:
            s.execute(delete(EvaluationRow).where(EvaluationRow.checkpoint_id.in_(ids)))
    evaluator.enqueue(ids)
    total = evaluator.pending_count()
    from rich.markup import escape  # a run name is text, not markup
    from rich.progress import Progress

    from ckptd.cli.output import console

    outcomes = []
    try:
        with Progress(console=console(), transient=True, disable=as_json) as progress:
            task = progress.add_task(f"evaluating {escape(run.name)}", total=total)
            while batch := evaluator.run_pending(limit=1):
                outcomes += batch
                progress.advance(task)
    finally:
        evaluator.close()
    rows = [
        {
            "checkpoint": o.checkpoint,
            "status": o.status,
            "metrics": o.metrics,
            "error": o.error,
            "seconds": o.seconds,
        }
        for o in outcomes
    ]
    if as_json:
        print_json(rows)
    else:
        names = sorted({k for o in outcomes for k in o.metrics})[:4]
        table(
            None,
            ["checkpoint", "status", *names, "seconds", "error"],
            [
                [
                    o.checkpoint,
                    o.status,
                    *[fmt_value(o.metrics.get(n)) for n in names],
                    f"{o.seconds:.3f}",
                    o.error,
                ]
                for o in outcomes
            ],
            empty="nothing to evaluate (use --again to re-evaluate)",
        )
    if any(o.status == "failed" for o in outcomes):
        raise SystemExit(1)


@click.command()
@click.argument("target", metavar="CHECKPOINT|RUN", type=CHECKPOINT)
@click.option("--force", is_flag=True, help="Export again even if it is already exported.")
@output_options
@pass_ctx
def freeze(ctx: CliContext, target: str, force: bool, as_json: bool) -> None:
    """Export a checkpoint, or the best of a run, as configured in [watch.freeze], now.

    Writes a hidden temp directory, verifies it against the checkpoint's own outputs, then
    renames it to export_dir/<step> (the TensorFlow Serving layout).

    \b
    Examples:
      ckptd freeze mnist              # the current best, if not exported yet
      ckptd freeze mnist@1200 --force
    """
    from ckptd.daemon.freeze import Freezer

    run, watch, checkpoint = _targets(ctx, target)
    if watch.freeze is None:
        raise click.ClickException(
            f"run {run.name} has no [watch.freeze] section: "
            "add one with export_dir and format to the config"
        )
    ctx.config(required=True)
    freezer = Freezer(ctx.store(readonly=False).engine)
    try:
        outcome = freezer.freeze_run(run, watch, checkpoint, force=force)
    finally:
        freezer.close()
    data = outcome.__dict__
    if as_json:
        print_json(data)
    elif outcome.status == "published":
        click.echo(
            f"exported {outcome.checkpoint} to {outcome.path} (verified) in {outcome.seconds:.2f} s"
        )
    else:
        click.echo(
            f"{outcome.run}: {outcome.status}"
            + (f" — {outcome.message}" if outcome.message else "")
        )
    if outcome.status == "failed":
        raise SystemExit(1)


COMMANDS = [evaluate, freeze]
