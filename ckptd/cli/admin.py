"""Operating commands: run the daemon, check the config, manage the database schema."""

from __future__ import annotations

import sys
import time

import click

from ckptd.cli.output import CliContext, _freeze_gc_at_exit, output_options, pass_ctx, print_json


@click.command()
@click.option("--once", is_flag=True, help="One full reconcile (and due work), then exit.")
@pass_ctx
def run(ctx: CliContext, once: bool) -> None:
    """Run the daemon in the foreground (systemd runs exactly this).

    Upgrades the database schema, records everything already on disk, then watches for new
    checkpoints until SIGTERM/SIGINT. SIGHUP re-reads the config.

    \b
    Examples:
      ckptd --config /etc/ckptd/ckptd.toml run
      ckptd -c ckptd.toml run --once     # backfill and exit (cron-friendly)
    """
    from ckptd import logs
    from ckptd.config import check_object_stores, warn_missing_paths
    from ckptd.daemon import prefetch
    from ckptd.io import observe

    config = ctx.config(required=True)
    check_object_stores(config)  # wrong credentials, no bucket: exit 78 before starting
    logs.setup(config.daemon.log_level)
    warn_missing_paths(config)
    # Started before the imports below, so they overlap them: the fork server the backfill's
    # workers come from and, on a database that knows no run yet, the backfill's observations.
    workers = observe.default_workers()
    prefetched = None
    if workers > 1:
        try:
            observe.start_fork_server()
            prefetched = prefetch.start(config, workers)
        except OSError:
            pass  # the backfill then observes in this process
    from ckptd.daemon.main import Daemon

    daemon = Daemon(config, prefetched=prefetched)
    if once:
        t0 = time.monotonic()
        n = daemon.run_once()
        click.echo(f"recorded {n} new checkpoint(s) in {time.monotonic() - t0:.2f} s", err=True)
        daemon.store.close()  # connections closed (WAL checkpointed) before the exit below
        _freeze_gc_at_exit()
        return
    sys.exit(daemon.run())


@click.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("check")
@output_options
@pass_ctx
def config_check(ctx: CliContext, as_json: bool) -> None:
    """Validate the config file and show what it means, with every default filled in.

    Exit status 78 and a one-line error naming the key when it is wrong.

    \b
    Examples:
      ckptd --config ckptd.toml config check
      ckptd -c ckptd.toml config check --json
    """
    import dataclasses

    from ckptd.config import check_object_stores, missing_paths
    from ckptd.core.durations import format_duration

    cfg = ctx.config(required=True)
    check_object_stores(cfg)  # each bucket exists and the credentials work, or exit 78
    warnings = missing_paths(cfg)

    def plain(value: object) -> object:
        import datetime
        from pathlib import Path

        if isinstance(value, datetime.timedelta):
            return format_duration(value)
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    data = plain(dataclasses.asdict(cfg))
    if as_json:
        print_json({"ok": True, "warnings": warnings, "config": data})
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{cfg.source}: OK — database {cfg.daemon.database}, {len(cfg.watches)} watch(es)")
    for i, w in enumerate(cfg.watches):
        parts = [f"runs={w.runs}" if w.runs else "single run", f"observer={w.observer}"]
        if w.is_object_store:
            parts[1] = f"polled every {format_duration(w.poll_interval)}"
            parts += [f"endpoint={w.endpoint_url}"] if w.endpoint_url else []
        if w.best.metric:
            parts.append(f"best={w.best.metric} ({w.best.mode})")
        for name in ("evaluate", "freeze", "retain"):
            if getattr(w, name) is not None:
                parts.append(name)
        click.echo(f"  watch[{i}] {w.path}: " + ", ".join(parts))


@click.group()
def db() -> None:
    """Manage the database schema (Alembic migrations shipped with ckptd)."""


@db.command("upgrade")
@pass_ctx
def db_upgrade(ctx: CliContext) -> None:
    """Create or upgrade the database schema to this version of ckptd.

    \b
    Example:
      ckptd -c /etc/ckptd/ckptd.toml db upgrade
    """
    from ckptd.api import database

    url = ctx.config().daemon.database
    done = database.upgrade(ctx.store(readonly=False), url)
    if done.before == done.after:
        click.echo(f"{done.database}: already at revision {done.after}")
    else:
        click.echo(f"{done.database}: upgraded {done.before or 'empty database'} → {done.after}")


@db.command("current")
@output_options
@pass_ctx
def db_current(ctx: CliContext, as_json: bool) -> None:
    """Show the database's schema revision and whether it is up to date.

    \b
    Example:
      ckptd db current --json
    """
    from ckptd.api import database

    rev = database.current(ctx.store(readonly=True), ctx.config().daemon.database)
    if as_json:
        print_json(
            {
                "database": rev.database,
                "current": rev.current,
                "head": rev.head,
                "up_to_date": rev.up_to_date,
            }
        )
    else:
        state = "up to date" if rev.up_to_date else "needs `ckptd db upgrade`"
        click.echo(f"{rev.database}: revision {rev.current or 'none'} (head {rev.head}) — {state}")


COMMANDS = [run, config, db]
