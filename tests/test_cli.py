"""The CLI contract: --help with examples everywhere, --json shapes, exit codes, no TensorFlow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import click
import pytest

from ckptd.cli import cli
from tests.conftest import ENV, PY, REPO, Corpus, ckptd, write_config

READ_COMMANDS = ["status", "ls", "best", "show", "events"]


def _all_commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # the top-level group loads its commands lazily
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        out.append(((*prefix, name), cmd))
        if isinstance(cmd, click.Group):
            out += _all_commands(cmd, (*prefix, name))
    return out


def test_every_command_has_help_with_an_example() -> None:
    for path, cmd in _all_commands(cli):
        if isinstance(cmd, click.Group):
            assert cmd.help, f"{' '.join(path)} has no help"
            continue
        assert cmd.help and "Example" in cmd.help, (
            f"`ckptd {' '.join(path)} --help` shows no example"
        )


def test_lazy_command_table_matches_the_modules() -> None:
    import importlib

    from ckptd.cli import COMMAND_MODULES, MODULES

    defined = {
        c.name: m for m in MODULES for c in importlib.import_module(f"ckptd.cli.{m}").COMMANDS
    }
    assert defined == COMMAND_MODULES


def test_status_imports_only_what_it_needs(recorded: Path) -> None:
    probe = (
        "import sys\n"
        "from ckptd.cli import main\n"
        f"assert main(['--config', {str(recorded)!r}, 'status']) == 0\n"
        "unneeded = ('ckptd.cli.admin', 'ckptd.cli.demo', 'ckptd.cli.manage', 'ckptd.cli.work',\n"
        "            'ckptd.daemon', 'alembic', 'rich', 'tensorflow', 'sqlalchemy.orm')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(unneeded))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([PY, "-c", probe], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_every_read_command_takes_json() -> None:
    commands = dict(_all_commands(cli))
    for name in READ_COMMANDS:
        assert any(p.name == "as_json" for p in commands[(name,)].params), name
    assert any(p.name == "as_json" for p in commands[("db", "current")].params)
    assert any(p.name == "as_json" for p in commands[("config", "check")].params)


@pytest.fixture
def recorded(tmp_path: Path, corpus: Corpus) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    conf = write_config(tmp_path / "c.toml", root, db=tmp_path / "ckptd.db")
    corpus.copy("tf1", root / "mnist")
    corpus.copy("tf2", root / "team-a" / "exp3")  # not matched by runs = "*": nested
    result = ckptd("run", "--once", config=conf)
    assert result.returncode == 0, result.stderr
    return conf


@pytest.mark.slow
def test_ls_json_contract(recorded: Path, corpus: Corpus) -> None:
    result = ckptd("ls", "--json", config=recorded)
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)
    assert [i["step"] for i in items] == [10, 20, 30]
    best_step = max(corpus.saves["tf1"], key=lambda s: (s["metrics"]["eval/accuracy"], s["step"]))[
        "step"
    ]
    for item in items:
        assert {
            "run",
            "step",
            "path",
            "state",
            "metrics",
            "best",
            "exported",
            "recorded_at",
        } <= set(item)
        assert item["run"] == "mnist" and item["state"] == "complete" and item["exported"] is False
        assert item["best"] is (item["step"] == best_step)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", item["recorded_at"])
        assert datetime.fromisoformat(item["recorded_at"]).tzinfo is not None
        assert set(item["metrics"]) >= {"eval/accuracy", "eval/loss", "loss"}
    # A run by absolute path is the same run.
    by_path = json.loads(
        ckptd("ls", str(recorded.parent / "runs" / "mnist"), "--json", config=recorded).stdout
    )
    assert by_path == items


@pytest.mark.slow
def test_best_and_events_and_status(recorded: Path, corpus: Corpus) -> None:
    best = json.loads(ckptd("best", "mnist", "--json", config=recorded).stdout)
    expected = max(corpus.saves["tf1"], key=lambda s: (s["metrics"]["eval/accuracy"], s["step"]))
    assert best["metric"] == "eval/accuracy" and best["best"][0]["step"] == expected["step"]
    by_loss = json.loads(
        ckptd(
            "best", "mnist", "--metric", "eval/loss", "--mode", "min", "--json", config=recorded
        ).stdout
    )
    assert (
        by_loss["best"][0]["step"]
        == min(corpus.saves["tf1"], key=lambda s: s["metrics"]["eval/loss"])["step"]
    )
    events = json.loads(ckptd("events", "--json", config=recorded).stdout)
    assert [e["kind"] for e in events].count("recorded") == 3
    status = json.loads(ckptd("status", "--json", config=recorded).stdout)
    assert status["counts"] == {"complete": 3}
    assert status["daemon"]["alive"] is False  # --once has exited
    human = ckptd("status", config=recorded)
    assert human.returncode == 0 and "mnist" in human.stdout and "3 complete" in human.stdout


def test_show_matches_tensorflow(recorded: Path, corpus: Corpus) -> None:
    result = ckptd("show", "mnist@20", "--json", config=recorded)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    prefix = corpus.saves["tf1"][1]["prefix"]
    oracle = corpus.variables[prefix]
    assert [[v["name"], v["shape"]] for v in data["variables"]] == oracle["variables"]
    assert {v["name"]: v["dtype"] for v in data["variables"]} == oracle["dtypes"]


@pytest.mark.slow
def test_errors_and_exit_codes(recorded: Path, tmp_path: Path) -> None:
    missing = ckptd("ls", "nosuchrun", config=recorded)
    assert missing.returncode == 1 and "no run 'nosuchrun'; known runs: mnist" in missing.stderr
    assert ckptd("ls", "--bogus", config=recorded).returncode == 2
    no_db = tmp_path / "nodb.toml"
    no_db.write_text(f'[daemon]\ndatabase = "sqlite:///{tmp_path}/absent.db"\n')
    result = ckptd("status", config=no_db)
    assert result.returncode == 1 and "ckptd db upgrade" in result.stderr
    assert ckptd("show", "mnist@999", config=recorded).returncode == 1


def test_daemon_and_cli_never_import_tensorflow(recorded: Path) -> None:
    probe = (
        "import sys\n"
        "import ckptd.daemon.main, ckptd.daemon.reconcile, ckptd.daemon.watch, ckptd.daemon.scheduler\n"
        "from ckptd.cli import main\n"
        f"for args in (['status'], ['ls', '--json'], ['best', 'mnist'], ['show', 'mnist@10']):\n"
        f"    assert main(['--config', {str(recorded)!r}, *args]) == 0, args\n"
        "heavy = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith(('tensorflow.', 'keras')))\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([PY, "-c", probe], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_daemon_cli_and_status_never_import_the_orm() -> None:
    """The store uses Core tables and connections only: ``sqlalchemy.orm`` costs every process
    ~0.1 s to import, for nothing."""
    probe = (
        "import sys\n"
        "import ckptd.cli, ckptd.api.status, ckptd.daemon.main\n"
        "print('sqlalchemy' in sys.modules, 'sqlalchemy.orm' in sys.modules)\n"
    )
    result = subprocess.run([PY, "-c", probe], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


def test_only_the_worker_imports_tensorflow() -> None:
    pattern = re.compile(r"^\s*(import tensorflow|from tensorflow|import keras|from keras)", re.M)
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "ckptd").rglob("*.py")
        if "worker" not in p.parts and pattern.search(p.read_text())
    ]
    assert offenders == []


@pytest.mark.slow
def test_evaluate_progress_shows_a_run_name_with_brackets_as_text(
    tmp_path: Path, corpus: Corpus
) -> None:
    """`ckptd evaluate` draws a progress bar on a terminal; a run name like `exp[red]` is text,
    not rich markup (it used to lose its brackets; `[/…]` raised MarkupError). A command
    evaluator: no TensorFlow."""
    script = tmp_path / "eval.py"
    script.write_text(
        "import json, sys\nprint(json.dumps({'eval/score': int(sys.argv[1]) / 100}))\n"
    )
    root = tmp_path / "runs"
    corpus.copy("tf1", root / "exp[red]")
    evaluate = (
        '\n[watch.evaluate]\nevaluator = "command"\n'
        f'command = ["{sys.executable}", "{script}", "{{step}}"]\n'
    )
    conf = write_config(tmp_path / "c.toml", root, db=tmp_path / "ckptd.db", extra=evaluate)
    assert ckptd("run", "--once", config=conf).returncode == 0
    result = subprocess.run(
        [PY, "-m", "ckptd", "--config", str(conf), "evaluate", "exp[red]", "--again"],
        capture_output=True,
        text=True,
        env={**ENV, "FORCE_COLOR": "1", "COLUMNS": "120"},  # rich draws as on a terminal
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "evaluating exp[red]" in result.stdout  # the progress bar's frames
    assert "eval/score" in result.stdout and "0.3" in result.stdout


def test_json_is_one_line_for_scripts_and_indented_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptd.cli.output import print_json

    data = [{"step": 1, "metrics": {"loss": float("nan")}}]
    print_json(data)  # captured: not a terminal
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == [{"step": 1, "metrics": {"loss": None}}]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    print_json(data)
    out = capsys.readouterr().out
    assert '\n  {\n    "step": 1,' in "\n" + out and json.loads(out)[0]["step"] == 1


@pytest.mark.slow
def test_the_cli_prints_what_the_api_returns(recorded: Path, corpus: Corpus) -> None:
    """The read commands render `ckptd.api` data: the JSON each prints is what the api returns
    for the same database (retention reasons, best marks, pins and their audit rows included)."""
    from ckptd.api import database, events, listing, pins, status
    from ckptd.config import load_config
    from ckptd.store.handle import Store

    # The same database under a retention policy, so that `ls` explains what it keeps.
    retained = recorded.with_name("retained.toml")
    retained.write_text(recorded.read_text() + "\n[watch.retain]\nkeep_last = 1\n")
    config = load_config(retained)
    store = Store.open(config.daemon.database)
    try:
        change = pins.pin(store, "mnist@10", "paper")
        assert change.changed and change.checkpoint.step == 10 and not change.checkpoint.pinned
        assert not pins.pin(store, "mnist@10").changed  # already pinned: nothing written
        again = ckptd("pin", "mnist@10", config=retained)
        assert again.returncode == 0 and again.stdout.strip() == "mnist@10 is already pinned"

        found = listing.listing(store, config)
        printed = json.loads(ckptd("ls", "--json", config=retained).stdout)
        assert [(i["step"], i["best"], i["pinned"], i["kept_because"]) for i in printed] == [
            (c.step, c.id in found.best, c.pinned, found.kept_because[c.id])
            for c in found.checkpoints
        ]
        best_step = max(
            corpus.saves["tf1"], key=lambda s: (s["metrics"]["eval/accuracy"], s["step"])
        )["step"]
        kept = {i["step"]: i["kept_because"] for i in printed}
        assert "pinned" in kept[10] and "newest" in kept[30] and "best" in kept[best_step]

        ranking = listing.best(store, config, "mnist", top=3)
        printed_best = json.loads(
            ckptd("best", "mnist", "--top", "3", "--json", config=retained).stdout
        )
        assert [c["step"] for c in printed_best["best"]] == [c.step for c in ranking.best]
        no_metric = write_config(
            recorded.with_name("plain.toml"),
            recorded.parent / "runs",
            db=recorded.parent / "ckptd.db",
            best=False,
        )
        with pytest.raises(listing.NoMetric):
            listing.best(store, load_config(no_metric), "mnist")

        audit = events.events(store, kinds=["pinned"])
        printed_events = json.loads(
            ckptd("events", "--kind", "pinned", "--json", config=retained).stdout
        )
        assert (
            [(e["kind"], e["subject"], e["reason"]) for e in printed_events]
            == [(a.kind, a.subject, a.reason) for a in audit]
            == [("pinned", str(recorded.parent / "runs" / "mnist" / "model.ckpt-10"), "paper")]
        )

        st = status.status(store)
        printed_status = json.loads(ckptd("status", "--json", config=retained).stdout)
        assert printed_status["counts"] == st.counts == {"complete": 3}
        assert [r["run"] for r in printed_status["runs"]] == [r.run for r in st.runs]
        assert [r["newest_step"] for r in printed_status["runs"]] == [
            r.newest_step for r in st.runs
        ]
        assert st.runs[0].run == "mnist" and st.runs[0].newest_step == 30
        assert st.daemon is not None and not st.daemon.alive
        assert printed_status["daemon"]["pid"] == st.daemon.pid

        revision = database.current(store, config.daemon.database)
        printed_db = json.loads(ckptd("db", "current", "--json", config=retained).stdout)
        assert printed_db == {
            "database": revision.database,
            "current": revision.current,
            "head": revision.head,
            "up_to_date": True,
        }

        assert pins.unpin(store, "mnist@10").changed
        assert ckptd("unpin", "mnist@10", config=retained).stdout.strip() == (
            "mnist@10 is already not pinned"
        )
    finally:
        store.close()
