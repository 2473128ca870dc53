"""The ``ckptd`` command. Never imports TensorFlow; commands and heavy modules load on demand."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from ckptd import __version__
from ckptd.cli.output import EX_CONFIG, EX_FAIL, EX_USAGE, CliContext

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
    "worker": "work",
    "demo": "demo",
}
MODULES = ("admin", "query", "manage", "work", "demo")


def _config_after(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    obj = ctx.find_object(CliContext)  # set by the group, which parses first
    if value is not None and obj is not None:
        obj.config_arg = value


def _accept_config(command: click.Command) -> None:
    """Let ``--config FILE`` follow the command too (``ckptd run --config F``, as units and
    people write it), not only precede it; the later one wins."""
    if not any(p.name == "config_after" for p in command.params):
        command.params.append(
            click.Option(
                ["--config", "-c", "config_after"],
                metavar="FILE",
                expose_value=False,
                callback=_config_after,
                help="Config file (the same as `ckptd --config FILE …`).",
            )
        )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_config(sub)


class LazyGroup(click.Group):
    """A group whose commands are imported from ``ckptd.cli.<module>`` when first needed."""

    def _load(self, module: str) -> None:
        mod = importlib.import_module(f"ckptd.cli.{module}")
        for command in mod.COMMANDS:
            if command.name not in self.commands:
                _accept_config(command)
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
    ctx.call_on_close(ctx.obj.close_writable)


def _not_utf8(args: list[str]) -> str | None:
    """The first argument that is not UTF-8 text (Python hands it over surrogate-escaped)."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point and the one error boundary: every error a user can cause is one line on
    stderr and an exit status (1 failure, 2 usage, 78 config), never a traceback."""
    from ckptd.config import ConfigError
    from ckptd.core.errors import NotFound, StoreError

    args = sys.argv[1:] if argv is None else list(argv)
    if (bad := _not_utf8(args)) is not None:
        # Run and checkpoint names are UTF-8 (the database stores text): no such name exists.
        click.echo(f'ckptd: argument "{bad}" is not valid UTF-8 text', err=True)
        return EX_USAGE
    try:
        cli.main(args=args, prog_name="ckptd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EX_FAIL
    except click.exceptions.NoArgsIsHelpError as exc:  # `ckptd db`: the help is the answer
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
        return EX_USAGE
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "ckptd"
        click.echo(f"{where}: {_one_line(exc.format_message())} (see `{where} --help`)", err=True)
        return EX_USAGE
    except click.ClickException as exc:
        click.echo(f"ckptd: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"ckptd: config error: {_one_line(str(problem))}", err=True)
        return EX_CONFIG
    except (StoreError, NotFound) as exc:
        click.echo(f"ckptd: {_one_line(str(exc))}", err=True)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ckptd ls | head`: the reader left; nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the exit's flush cannot fail
        return EX_FAIL
    except Exception as exc:
        if isinstance(exc, OSError):
            what = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"ckptd: {what}{exc.strerror or exc}", err=True)
            return EX_FAIL
        if os.environ.get("CKPTD_DEBUG"):
            raise
        what = f"internal error: {type(exc).__name__}: {_one_line(str(exc))} (a bug in ckptd"
        if logging.getLogger().handlers:  # the daemon: its log folds the traceback into one line
            logging.getLogger("ckptd").error("%s; please report it)", what, exc_info=exc)
        else:
            click.echo(
                f"ckptd: {what}: please report it; CKPTD_DEBUG=1 shows the traceback)", err=True
            )
        return EX_FAIL
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


if __name__ == "__main__":
    sys.exit(main())
