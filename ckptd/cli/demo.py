"""``ckptd demo``: real TensorFlow training, watched by a real daemon, in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from ckptd.cli.output import CliContext, console, pass_ctx

DEMO_CONFIG = """\
[daemon]
database = "sqlite:///{db}"
rescan_interval = "30s"
heartbeat_interval = "2s"

# The TF1 run: evaluated by restoring its meta graph with the ExponentialMovingAverage shadow
# values (the classic MNIST eval), the best exported as a SavedModel and a frozen graph.
[[watch]]
path = "{runs}/mnist-tf1"

[watch.best]
metric = "eval/accuracy"
mode = "max"

[watch.evaluate]
evaluator = "meta_graph"
data = "{runs}/mnist-tf1/heldout.npz"
feed = {{ "x:0" = "x", "y_:0" = "y" }}
fetch = {{ "eval/accuracy" = "accuracy:0", "eval/loss" = "loss:0" }}
use_ema = true
every = "5s"

[watch.freeze]
format = ["saved_model", "frozen_graph"]
export_dir = "{base}/export/mnist"
inputs = {{ "x" = "x:0" }}
outputs = {{ "y" = "y:0" }}
every = "3s"
keep = 2

[watch.retain]
keep_last = 3
keep_best = 2
min_age = "0s"
every = "1h"   # the demo prunes at the end, to show the plan

# The TF2 CheckpointManager run: ranked by its own eval summaries (tensor summaries).
[[watch]]
path = "{runs}/mnist-tf2"

[watch.best]
metric = "eval/accuracy"
mode = "max"

[watch.retain]
keep_last = 3
keep_best = 2
min_age = "0s"
every = "1h"
"""

JOBS = [
    # (run name, trainer kind, steps, save every)
    ("mnist-tf1", "tf1", 200, 20),
    ("mnist-tf2", "tf2", 120, 20),
]


def _python() -> str:
    return sys.executable


@click.command()
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write runs, config and database (default: a new temp directory).",
)
@click.option(
    "--keep/--no-keep",
    default=True,
    show_default=True,
    help="Keep the demo directory afterwards so you can query it.",
)
@pass_ctx
def demo(ctx: CliContext, workdir: str | None, keep: bool) -> None:
    """Train two small real TensorFlow models while the daemon watches, then show what it recorded.

    A TF1-style model (Saver with global_step and meta graphs, eval summaries in eval/, as in the
    classic MNIST example) and a TF2 CheckpointManager model train on synthetic data in a temp
    directory; `ckptd run` watches it on its own SQLite database. Needs TensorFlow
    (pip install 'ckptd[tf-cpu]'); the daemon itself never imports it.

    \b
    Examples:
      ckptd demo
      ckptd demo --dir /tmp/ckptd-demo
    """
    del ctx
    from rich.markup import escape  # paths are text, not markup

    out = console()
    base = Path(workdir or tempfile.mkdtemp(prefix="ckptd-demo-")).resolve()
    runs = base / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    db = base / "ckptd.db"
    config = base / "ckptd.toml"
    config.write_text(DEMO_CONFIG.format(db=db, runs=runs, base=base))
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    out.print(f"[bold]ckptd demo[/bold] in {escape(str(base))}")
    daemon_log = (base / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [_python(), "-m", "ckptd", "--config", str(config), "run"],
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    expected: dict[str, int] = {}
    try:
        _wait_ready(db)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} saves"),
            TimeElapsedColumn(),
            console=out,
            transient=False,
        ) as progress:
            procs = []
            for name, kind, steps, every in JOBS:
                task = progress.add_task(f"training {name} ({kind})", total=steps // every)
                p = subprocess.Popen(
                    [
                        _python(),
                        "-m",
                        "ckptd.worker.train",
                        kind,
                        "--out",
                        str(runs / name),
                        "--steps",
                        str(steps),
                        "--save-every",
                        str(every),
                        "--interval",
                        "0.3",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    env=env,
                )
                procs.append((name, task, p))
            for name, task, p in procs:
                assert p.stdout is not None
                for line in p.stdout:
                    msg = json.loads(line)
                    if msg.get("event") == "saved":
                        expected[name] = expected.get(name, 0) + 1
                        progress.advance(task)
                if p.wait() != 0:
                    raise click.ClickException(
                        f"training {name} failed (is TensorFlow installed? "
                        "pip install 'ckptd[tf-cpu]')"
                    )
        _wait_recorded(db, sum(expected.values()))
        out.print("waiting for the daemon to evaluate every TF1 checkpoint and export the best …")
        export = _wait_exported(db, timeout=90)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        daemon_log.close()
    cli = [_python(), "-m", "ckptd", "--config", str(config)]
    width = {"COLUMNS": str(max(shutil.get_terminal_size().columns, 160))}
    show = {**env, **width}
    out.print()
    out.print(
        f"[bold]1. The daemon recorded all {sum(expected.values())} checkpoints, with step and "
        "metrics (ckptd ls):[/bold]"
    )
    subprocess.run([*cli, "ls"], check=False, env=show)
    out.print()
    out.print("[bold]2. The best of each run (ckptd best):[/bold]")
    for name, *_ in JOBS:
        subprocess.run([*cli, "best", name], check=False, env=show)
    out.print()
    out.print(
        "[bold]3. Retention keep_last = 3, keep_best = 2 (ckptd prune): what was kept and "
        "why[/bold]"
    )
    subprocess.run([*cli, "prune"], check=False, env=show)
    out.print()
    if export:
        out.print(
            "[bold]4. The best TF1 checkpoint, exported (SavedModel + frozen graph) and "
            "verified:[/bold]"
        )
        click.echo(f"   {export}")
        click.echo(f"   serve:    tensorflow_model_server --model_base_path={Path(export).parent}")
        click.echo(f"   inspect:  saved_model_cli show --all --dir {export}")
        click.echo(f"   load:     tf.saved_model.load('{export}').signatures['serving_default']")
        click.echo(
            f"   frozen:   tf.compat.v1.GraphDef.FromString("
            f"open('{export}/frozen.pb', 'rb').read())"
        )
    else:
        log_path = escape(str(base / "daemon.log"))
        out.print(f"[yellow]no export was published; see {log_path}[/yellow]")
    click.echo()
    click.echo(f"database:   {db}\nconfig:     {config}\ndaemon log: {base / 'daemon.log'}")
    click.echo(
        f"try:        ckptd --config {config} status   (or: events, ls --json, show mnist-tf1@200)"
    )
    if not keep:
        shutil.rmtree(base, ignore_errors=True)


def _wait_exported(db: Path, timeout: float) -> str | None:
    """The path of the published export once evaluations are done and the best is exported."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                pending = con.execute(
                    "select count(*) from evaluations where status in ('pending', 'running')"
                ).fetchone()[0]
                best = con.execute(
                    "select c.id from checkpoints c join runs r on r.id = c.run_id "
                    "join metrics m on m.checkpoint_id = c.id "
                    "where r.name = 'mnist-tf1' and c.state = 'complete' "
                    "and m.name = 'eval/accuracy' and m.source = 'evaluator' "
                    "order by m.value desc, c.step desc limit 1"
                ).fetchone()
                row = con.execute(
                    "select path from exports where status = 'published' and checkpoint_id = ?",
                    (best[0] if best else -1,),
                ).fetchone()
            finally:
                con.close()
            if not pending and row:
                return str(row[0])
        except sqlite3.Error:
            pass
        time.sleep(0.2)
    return None


def _count(db: Path) -> int:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(
                con.execute("select count(*) from checkpoints where state='complete'").fetchone()[0]
            )
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def _wait_ready(db: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _count(db) >= 0:
            return
        time.sleep(0.1)
    raise click.ClickException(
        f"the daemon did not start within {timeout:.0f} s; see {db.parent / 'daemon.log'}"
    )


def _wait_recorded(db: Path, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _count(db) < n:
        time.sleep(0.1)


COMMANDS = [demo]
