"""The ``ckptd`` command. Never imports TensorFlow; commands and heavy modules load on demand."""

from __future__ import annotations

import importlib
import sys

import click

from ckptd import __version__
from ckptd.cli.output import EX_CONFIG, EX_FAIL, CliContext

# Which module defines each command, so `ckptd status` imports the read commands only (not the
# daemon, the evaluator, the demo …). A command missing here is still found: an unknown name
# loads every module (tests/test_cli.py checks this table against the modules' COMMANDS).
COMMAND_MODULES = {
    "run": "admin",
    "config": "admin",
    "db": "admin",
    "status": "query",
    "ls": "query",
    "best": "query",
    "show": "query",
    "events": "query",
    "prune": "manage",
    "pin": "manage",
    "unpin": "manage",
    "evaluate": "work",
    "freeze": "work",
    "demo": "demo",
}
MODULES = ("admin", "query", "manage", "work", "demo")


class LazyGroup(click.Group):
    """A group whose commands are imported from ``ckptd.cli.<module>`` when first needed."""

    def _load(self, module: str) -> None:
        mod = importlib.import_module(f"ckptd.cli.{module}")
        for command in mod.COMMANDS:
            if command.name not in self.commands:
                self.add_command(command)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            module = COMMAND_MODULES.get(cmd_name)
            for m in [module] if module else MODULES:
                self._load(m)
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        for m in MODULES:
            self._load(m)
        return super().list_commands(ctx)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
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
