"""On-demand work: evaluate and freeze now, in a TensorFlow worker (never in this process); and
``ckptd worker``, the process that does such work for daemons on other hosts.

While a daemon or a ``ckptd worker`` serving the run runs on the database, the work is handed to
it (``api/handoff.py``): its worker is warm, so the call takes the evaluation's time instead of
seconds of ``import tensorflow``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from ckptd.cli.output import (
    CHECKPOINT,
    CliContext,
    fmt_value,
    metric_columns,
    output_options,
    pass_ctx,
    print_json,
    table,
)
from ckptd.core.model import iso

if TYPE_CHECKING:  # imported by the commands, not by --help
    from ckptd.api.evaluate import EvalOutcome
    from ckptd.api.handoff import Server
    from ckptd.api.targets import Target
    from ckptd.store.evaluation_reads import Waiting
    from ckptd.store.handle import Store

NO_DAEMON = click.option(
    "--no-daemon",
    "here",
    is_flag=True,
    help="Do the work in a worker of this process even while a daemon or `ckptd worker` runs "
    "(by default the running one does it in its warm worker).",
)


def _store(ctx: CliContext) -> Store:
    """The database, for writing (evaluations and exports record their results)."""
    return ctx.store(readonly=False)


def _target(ctx: CliContext, text: str) -> Target:
    """What RUN or CHECKPOINT names (read-only: a missing database is an error, not created)."""
    from ckptd.api.targets import resolve

    target = resolve(ctx.store(readonly=True), ctx.config(), text)
    ctx.config(required=True)
    return target


def _server(ctx: CliContext, here: bool, kind: str, target: Target) -> Server | None:
    """The running daemon or worker to hand the work to, unless asked not to."""
    from ckptd.api.handoff import live_server

    return None if here else live_server(ctx.store(readonly=True), kind, target)


def _handed(
    ctx: CliContext,
    kind: str,
    target: Target,
    daemon: Server,
    on_progress: Callable[[dict[str, Any]], None],
    **options: Any,
) -> dict[str, Any]:
    """Hand the work over and wait for its result (Ctrl-C withdraws it if not begun)."""
    from ckptd.api import handoff

    request_id = handoff.submit(_store(ctx), kind, target, **options)
    try:
        req = handoff.wait(ctx.store(readonly=True), _store(ctx), request_id, daemon, on_progress)
    except handoff.HandoffFailed as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        if not handoff.withdraw(_store(ctx), request_id):
            going_on = f"{handoff.who(daemon)} goes on with the {kind}"
            click.echo(f"{going_on}; see `ckptd events`", err=True)
        raise
    return req.result


def _by_daemon(server: Server) -> str:
    from ckptd.api.handoff import who

    running = who(server).replace("the ", "the running ", 1)
    return f"done by {running} in its warm worker"


def _status_text(status: str, retry_at: Any) -> str:
    if retry_at is None:
        return status
    status = "failed" if status == "pending" else status
    return f"{status}, retry at {retry_at:%Y-%m-%d %H:%M:%S} UTC"


@click.command()
@click.argument("target", metavar="CHECKPOINT|RUN", type=CHECKPOINT)
@click.option("--again", is_flag=True, help="Re-evaluate checkpoints that were already evaluated.")
@NO_DAEMON
@output_options
@pass_ctx
def evaluate(ctx: CliContext, target: str, again: bool, here: bool, as_json: bool) -> None:
    """Evaluate a checkpoint, or every not-yet-evaluated checkpoint of a run, now.

    Uses the run's [watch.evaluate] evaluator in a warm TensorFlow worker process (the running
    daemon's, when there is one) and records the metrics (they count for `best` and retention
    at once). A checkpoint named by RUN@STEP is evaluated now even while it waits out the retry
    backoff of a failed attempt; for a RUN, those that wait are listed with their retry time.
    Exits 1 when an evaluation failed.

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
        api_evaluate.check(target_)
    except (NotConfigured, api_evaluate.NotEvaluable) as exc:
        raise click.ClickException(str(exc)) from None
    daemon = _server(ctx, here, "evaluate", target_)
    outcomes: list[EvalOutcome] = []
    with Progress(console=console(), transient=True, disable=as_json) as progress:
        what = escape(target_.checkpoint.label if target_.checkpoint else target_.run.name)
        task = progress.add_task(f"evaluating {what}", total=None)
        if daemon is not None:
            from ckptd.api.handoff import who

            progress.update(task, description=f"evaluating {what} in {escape(who(daemon))}")

            def on_progress(result: dict[str, Any]) -> None:
                progress.update(
                    task, total=result.get("total"), completed=len(result.get("outcomes", []))
                )

            result = _handed(ctx, "evaluate", target_, daemon, on_progress, again=again)
            outcomes = [api_evaluate.EvalOutcome.from_json(o) for o in result["outcomes"]]
            waiting = [api_evaluate.waiting_from_json(w) for w in result["waiting"]]
        else:
            evaluation = api_evaluate.evaluate(_store(ctx), ctx.config(), target_, again=again)
            progress.update(task, total=evaluation.total)
            for outcome in evaluation.outcomes:
                outcomes.append(outcome)
                progress.advance(task)
            waiting = evaluation.waiting
    _show_evaluations(outcomes, waiting, target_, as_json)
    if daemon is not None and not as_json and outcomes:
        click.echo(click.style(_by_daemon(daemon), dim=True), err=True)
    if any(o.failed for o in outcomes):
        raise SystemExit(1)


def _show_evaluations(
    outcomes: list[EvalOutcome], waiting: list[Waiting], target: Target, as_json: bool
) -> None:
    rows = [o.to_json() for o in outcomes] + [
        {
            "checkpoint": w.checkpoint,
            "status": "waiting",
            "metrics": {},
            "error": w.error,
            "seconds": 0.0,
            "retry_at": iso(w.retry_at),
        }
        for w in waiting
    ]
    if as_json:
        print_json(rows)
        return
    names = metric_columns([o.metrics for o in outcomes], [target.watch.best.metric])
    table(
        None,
        ["checkpoint", "status", *names, "seconds", "error"],
        [
            [
                o.checkpoint,
                _status_text(o.status, o.retry_at),
                *[fmt_value(o.metrics.get(n)) for n in names],
                f"{o.seconds:.3f}",
                o.error,
            ]
            for o in outcomes
        ]
        + [
            [
                w.checkpoint,
                _status_text("waiting", w.retry_at),
                *["" for _ in names],
                "",
                f"attempt {w.attempts} failed: {w.error}",
            ]
            for w in waiting
        ],
        empty="nothing to evaluate (use --again to re-evaluate)",
    )
    if waiting:
        click.echo(
            f"{len(waiting)} checkpoint(s) wait to retry after a failed evaluation; "
            f"`ckptd evaluate {waiting[0].checkpoint}` evaluates one now"
        )


@click.command()
@click.argument("target", metavar="CHECKPOINT|RUN", type=CHECKPOINT)
@click.option("--force", is_flag=True, help="Export again even if it is already exported.")
@NO_DAEMON
@output_options
@pass_ctx
def freeze(ctx: CliContext, target: str, force: bool, here: bool, as_json: bool) -> None:
    """Export a checkpoint, or the best of a run, as configured in [watch.freeze], now.

    Writes a hidden temp directory, verifies it against the checkpoint's own outputs, then
    renames it to export_dir/<version>, the next version number: TensorFlow Serving serves
    the highest, so it serves this export. A failed export is tried at once (the daemon's
    backoff is for the daemon). While a daemon runs, it does the export in its warm worker.

    \b
    Examples:
      ckptd freeze mnist              # the current best, unless it is the version served
      ckptd freeze mnist@1200 --force
    """
    from ckptd.api import freeze as api_freeze
    from ckptd.api.targets import NotConfigured

    try:
        target_ = _target(ctx, target)
        daemon = _server(ctx, here, "freeze", target_) if target_.watch.freeze is not None else None
        if daemon is not None:
            outcome = api_freeze.ExportOutcome(
                **_handed(ctx, "freeze", target_, daemon, lambda _result: None, force=force)
            )
        else:
            outcome = api_freeze.freeze(_store(ctx), target_, force=force)
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
    if daemon is not None and not as_json:
        click.echo(click.style(_by_daemon(daemon), dim=True), err=True)
    if outcome.status == "failed":
        raise SystemExit(1)


@click.command()
@pass_ctx
def worker(ctx: CliContext) -> None:
    """Do evaluations and exports for the daemons sharing the database (no watching).

    Claims jobs from the database — checkpoints the daemons queued for evaluation, exports of
    daemons with [daemon] evaluate_on = "workers", and `ckptd evaluate`/`freeze` handed over —
    and does them in warm TensorFlow workers, [worker] concurrency of them. Evaluates as the
    watches' [watch.evaluate] say; [worker] watches and kinds narrow what it serves. A job of a
    worker that dies returns to the queue when its claim expires ([worker] claim_ttl).
    SIGTERM/SIGINT stop it; a job in hand goes back to the queue.

    \b
    Examples:
      ckptd worker --config /etc/ckptd/ckptd.toml
      ckptd -c gpu.toml worker            # on a GPU host, next to daemons elsewhere
    """
    import sys

    from ckptd import logs

    config = ctx.config(required=True)
    logs.setup(config.daemon.log_level)
    from ckptd.daemon.workerproc import WorkerProcess

    sys.exit(WorkerProcess(config).run())


COMMANDS = [evaluate, freeze, worker]
