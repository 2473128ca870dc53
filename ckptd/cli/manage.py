"""Commands that change things: prune, pin, unpin."""

from __future__ import annotations

from typing import Any

import click

from ckptd.cli.output import (
    CHECKPOINT,
    CliContext,
    fmt_size,
    fmt_value,
    output_options,
    pass_ctx,
    print_json,
    table,
)
from ckptd.core.model import iso

MAX_DELETE_ROWS = 20


def _plan_rows(result: Any, metric: str | None, times: bool = True) -> list[dict[str, Any]]:
    """Every complete or deleted checkpoint of the run; ``times``: with ``recorded_at`` (JSON)."""
    rows = []
    deleting = {c.id for c in result.plan.delete}
    for c in sorted(result.history, key=lambda c: (c.step is None, c.step, c.id)):
        if c.state != "complete" and c.id not in deleting:
            continue
        rows.append(
            {
                "run": c.run,
                "step": c.step,
                "path": c.prefix,
                "action": "delete" if c.id in deleting else "keep",
                "reasons": list(result.plan.reasons(c)),
                "metric": c.metrics.get(metric) if metric else None,
                "size": c.size,
                "recorded_at": iso(c.recorded_at) if times else None,
            }
        )
    return rows


@click.command()
@click.argument("run", required=False)
@click.option(
    "--dry-run", is_flag=True, help="Show the plan (what is kept and why); delete nothing."
)
@output_options
@pass_ctx
def prune(ctx: CliContext, run: str | None, dry_run: bool, as_json: bool) -> None:
    """Apply the retention policy ([watch.retain]) to RUN, or to every run.

    Only checkpoints ckptd recorded are deleted, only their recorded files, never through a
    symlink; the newest, the best, pinned and exported checkpoints are always kept. The run's
    `checkpoint` state file is rewritten so TensorFlow keeps working. Runs whose watch has no
    [watch.retain] section are never pruned; with `dry_run = true` there, only the plan is shown.
    TensorFlow's own temporary files of recorded checkpoints, untouched for a day
    (`PREFIX_temp/` of part files, `*.tempstate*`, `PREFIX.meta.tmp*`), are in the plan too.

    \b
    Examples:
      ckptd prune --dry-run              # the plan for every run, with reasons
      ckptd prune mnist --dry-run --json
      ckptd prune mnist                  # do it now
    """
    from ckptd.api import prune as pruning

    cfg = ctx.config(required=True)
    store = ctx.store(readonly=dry_run)  # a dry run only reads: it takes no claim
    todo: list[tuple[Any, Any]] = []
    for r in pruning.runs(store, run):
        watch = ctx.watch_for(r.watch_path)
        if watch is None:
            if run:
                raise click.ClickException(f"run {r.name} is not under any watch in {cfg.source}")
            continue
        if watch.retain is None:
            if run:
                raise click.ClickException(
                    f"run {r.name} has no retention policy: add a [watch.retain] section "
                    f"(e.g. keep_last = 5) to {cfg.source}"
                )
            continue
        todo.append((r, watch))
    # All the runs at once: each phase (intent, deletion, result) is batched across them.
    done = pruning.prune(store, todo, dry_run=dry_run)
    results = [(res, watch.best.metric) for res, (_, watch) in zip(done, todo, strict=True)]
    if as_json:
        print_json(
            [
                {
                    "run": res.run,
                    "dry_run": res.dry_run,
                    "dry_run_config": res.dry_run_config,
                    "plan": _plan_rows(res, metric),
                    "leftovers": [
                        {"name": f.name, "prefix": f.prefix, "files": f.parts}
                        for f in res.leftovers
                    ],
                    "leftovers_removed": res.leftovers_removed,
                    "pruned": res.pruned,
                    "failed": res.failed,
                    "bytes_freed": res.bytes_freed,
                    "skipped": res.skipped,
                }
                for res, metric in results
            ]
        )
        return
    if not results:
        click.echo("no run has a retention policy ([watch.retain]); nothing to do")
    if any(res.dry_run_config for res, _ in results):
        click.echo(
            f"dry-run mode: [watch.retain] dry_run = true in {cfg.source}; those runs show their "
            "plan and nothing is deleted (set dry_run = false to prune)"
        )
    for res, metric in results:
        if res.skipped:
            click.echo(f"{res.run}: skipped: {res.skipped}; try again when it is done", err=True)
            continue
        rows = _plan_rows(res, metric, times=False)
        deleting = [r for r in rows if r["action"] == "delete"]
        if len(deleting) > MAX_DELETE_ROWS:
            # Thousands of rows help nobody: every kept one (with its reasons), a few deleted.
            shown = {
                id(r) for r in deleting[: MAX_DELETE_ROWS // 2] + deleting[-MAX_DELETE_ROWS // 2 :]
            }
            steps = [r["step"] for r in deleting if r["step"] is not None]
            hidden = len(deleting) - len(shown)
            rows = [r for r in rows if r["action"] == "keep" or id(r) in shown]
            click.echo(
                f"{res.run}: {hidden} more checkpoints to delete are not listed "
                f"(steps {min(steps)}–{max(steps)} overall); use --json for all"
                if steps
                else f"{res.run}: {hidden} more not listed; use --json for all"
            )
        title = f"{res.run}: " + (
            f"would delete {len(res.plan.delete)}, keep {len(rows) - len(res.plan.delete)}"
            + (" (dry_run = true in the config)" if res.dry_run_config else "")
            if res.dry_run
            else f"deleted {len(res.pruned)} ({fmt_size(res.bytes_freed)} freed)"
        )
        table(
            title,
            ["step", "action", "why", metric or "metric", "size"],
            [
                [
                    r["step"],
                    r["action"],
                    ", ".join(r["reasons"]) or "not kept by any rule",
                    fmt_value(r["metric"]),
                    fmt_size(r["size"]),
                ]
                for r in rows
            ],
            empty=f"{res.run}: no complete checkpoints",
        )
        if res.leftovers and res.dry_run:
            names = ", ".join(f.label for f in res.leftovers)
            click.echo(f"{res.run}: would remove TensorFlow's stale temporary files: {names}")
        elif res.leftovers_removed:
            names = ", ".join(res.leftovers_removed)
            click.echo(f"{res.run}: removed TensorFlow's stale temporary files: {names}")
        for f in res.failed:
            click.echo(f"failed: {f}", err=True)
    if any(res.failed for res, _ in results):
        raise SystemExit(1)


@click.command()
@click.argument("checkpoint", type=CHECKPOINT)
@click.option("--reason", help="Why it must be kept (shown in ls and events).")
@pass_ctx
def pin(ctx: CliContext, checkpoint: str, reason: str | None) -> None:
    """Keep CHECKPOINT forever, whatever the retention policy says.

    \b
    Examples:
      ckptd pin mnist@12000 --reason "paper results"
      ckptd pin /data/runs/mnist/model.ckpt-12000
    """
    _set_pin(ctx, checkpoint, True, reason)


@click.command()
@click.argument("checkpoint", type=CHECKPOINT)
@pass_ctx
def unpin(ctx: CliContext, checkpoint: str) -> None:
    """Let the retention policy decide about CHECKPOINT again.

    \b
    Example:
      ckptd unpin mnist@12000
    """
    _set_pin(ctx, checkpoint, False, None)


def _set_pin(ctx: CliContext, checkpoint: str, on: bool, reason: str | None) -> None:
    from ckptd.api import pins

    store = ctx.store(readonly=False)
    change = pins.pin(store, checkpoint, reason) if on else pins.unpin(store, checkpoint)
    label = change.checkpoint.label
    if not change.changed:
        click.echo(f"{label} is already {'pinned' if on else 'not pinned'}")
        return
    click.echo(f"{'pinned' if on else 'unpinned'} {label}")


COMMANDS = [prune, pin, unpin]
