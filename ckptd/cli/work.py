"""On-demand work: evaluate and freeze now, in a TensorFlow worker (never in this process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # imported by the commands, not by --help
    from ckptd.api.targets import Target
    from ckptd.store.handle import Store


def _store(ctx: CliContext) -> Store:
    """The database, for writing (evaluations and exports record their results)."""
    return ctx.store(readonly=False)


def _target(ctx: CliContext, text: str) -> Target:
    """What RUN or CHECKPOINT names (read-only: a missing database is an error, not created)."""
    from ckptd.api.targets import resolve

    target = resolve(ctx.store(readonly=True), ctx.config(), text)
    ctx.config(required=True)
    return target


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
    from rich.markup import escape  # a run name is text, not markup
    from rich.progress import Progress

    from ckptd.api import evaluate as api_evaluate
    from ckptd.api.targets import NotConfigured
    from ckptd.cli.output import console

    try:
        target_ = _target(ctx, target)
        total, results = api_evaluate.evaluate(_store(ctx), ctx.config(), target_, again=again)
    except NotConfigured as exc:
        raise click.ClickException(str(exc)) from None
    outcomes = []
    with Progress(console=console(), transient=True, disable=as_json) as progress:
        task = progress.add_task(f"evaluating {escape(target_.run.name)}", total=total)
        for outcome in results:
            outcomes.append(outcome)
            progress.advance(task)
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
    renames it to export_dir/<version>, the next version number: TensorFlow Serving serves
    the highest, so it serves this export. A failed export is tried at once (the daemon's
    backoff is for the daemon).

    \b
    Examples:
      ckptd freeze mnist              # the current best, unless it is the version served
      ckptd freeze mnist@1200 --force
    """
    from ckptd.api import freeze as api_freeze
    from ckptd.api.targets import NotConfigured

    try:
        outcome = api_freeze.freeze(_store(ctx), _target(ctx, target), force=force)
    except NotConfigured as exc:
        raise click.ClickException(str(exc)) from None
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
