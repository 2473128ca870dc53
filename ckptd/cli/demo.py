"""``ckptd demo``: real TensorFlow training, watched by a real daemon, in a temporary directory."""

from __future__ import annotations

import json
import os
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

[[watch]]
path = "{runs}"
runs = "*"
keras_template = "model.{{epoch:02d}}-{{val_loss:.2f}}.keras"

[watch.best]
metric = "eval/accuracy"
mode = "max"
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
    out = console()
    base = Path(workdir or tempfile.mkdtemp(prefix="ckptd-demo-")).resolve()
    runs = base / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    db = base / "ckptd.db"
    config = base / "ckptd.toml"
    config.write_text(DEMO_CONFIG.format(db=db, runs=runs))
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    out.print(f"[bold]ckptd demo[/bold] in {base}")
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
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        daemon_log.close()
    env_cmd = [_python(), "-m", "ckptd", "--config", str(config)]
    out.print()
    out.print(f"[bold]The daemon recorded {sum(expected.values())} checkpoints (ckptd ls):[/bold]")
    subprocess.run([*env_cmd, "ls"], check=False)
    out.print()
    for name, *_ in JOBS:
        subprocess.run([*env_cmd, "best", name], check=False)
    out.print()
    out.print(f"database: {db}\nconfig:   {config}\ndaemon log: {base / 'daemon.log'}")
    out.print(f"try:      ckptd --config {config} status")
    if not keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


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
