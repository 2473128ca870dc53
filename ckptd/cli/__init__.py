"""The ``ckptd`` command. Never imports TensorFlow; heavy modules are imported per command."""

from __future__ import annotations

import sys

import click

from ckptd import __version__
from ckptd.cli.output import EX_CONFIG, EX_FAIL, CliContext


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "-c",
    "config_arg",
    metavar="FILE",
    envvar="CKPTD_CONFIG",
    help="Config file (default: $CKPTD_CONFIG, else /etc/ckptd/ckptd.toml).",
)
@click.version_option(__version__, prog_name="ckptd")
@click.pass_context
def cli(ctx: click.Context, config_arg: str | None) -> None:
    """ckptd — checkpoint lifecycle daemon for TensorFlow training.

    It watches training directories, records every checkpoint with its step and metrics,
    evaluates and exports the best, and prunes old ones by a retention policy.

    \b
    Examples:
      ckptd --config ckptd.toml run          # the daemon, in the foreground
      ckptd status                           # is it alive, what does it know
      ckptd ls mnist --json                  # every checkpoint of run "mnist", as JSON
      ckptd best mnist                       # the best checkpoint by the configured metric
      ckptd demo                             # a real training job, watched, in a temp dir
    """
    ctx.obj = CliContext(config_arg)


def _register() -> None:
    from ckptd.cli import admin, demo, manage, query, work

    for module in (admin, query, manage, work, demo):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps the project's errors to exit codes (1 failure, 2 usage, 78 config)."""
    from ckptd.config import ConfigError
    from ckptd.errors import NotFound, StoreError

    try:
        cli.main(args=argv, prog_name="ckptd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EX_FAIL
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except ConfigError as exc:
        click.echo(f"ckptd: config error: {exc}", err=True)
        return EX_CONFIG
    except (StoreError, NotFound) as exc:
        click.echo(f"ckptd: {exc}", err=True)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
