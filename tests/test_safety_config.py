"""Issue 10, items 13 and 15: a bad config or a bad argument is one line and an exit status.

`config check`, `run` and SIGHUP share one validation (config.load_config), so what `config
check` accepts the daemon can run; the CLI turns every error a user can cause into one line
(usage 2, failure 1, config 78), never a traceback. Real `ckptd` subprocesses throughout.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import ConfigError, load_config, parse_config
from tests.conftest import ENV, PY, ckptd, wait_for, write_config

FREEZE = '\n[watch.freeze]\nexport_dir = "{tmp}/exports"\ncron = "{cron}"\n'


def _config(tmp_path: Path, daemon: str = "", extra: str = "", **kw: Any) -> Path:
    """conftest's config with the ``daemon`` line set in [daemon] (replacing the same key)."""
    (tmp_path / "runs").mkdir(exist_ok=True)
    conf = write_config(
        tmp_path / "c.toml", tmp_path / "runs", db=tmp_path / "db.sqlite", extra=extra, **kw
    )
    lines = conf.read_text().splitlines()
    if daemon:
        key = daemon.split("=")[0].strip()
        lines = [line for line in lines if line.split("=")[0].strip() != key]
        lines.insert(lines.index("[daemon]") + 1, daemon)
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# Each of these passed `config check` (or crashed it) and then crashed `ckptd run` or failed
# every scan on cb01aeb.
BAD = [
    ('metrics_address = "127.0.0.1:99999"', "", "daemon.metrics_address", "port from 1 to 65535"),
    ('database = "nonsense"', "", "daemon.database", "expected a database URL"),
    ('rescan_interval = "3000000d"', "", "daemon.rescan_interval", "from 1s to 1d"),
    ('rescan_interval = "99999999999d"', "", "daemon.rescan_interval", "from 1s to 1d"),
    ("rescan_interval = inf", "", "daemon.rescan_interval", "from 1s to 1d, got inf"),
    ("rescan_interval = nan", "", "daemon.rescan_interval", "from 1s to 1d, got nan"),
    ('debounce = "3650d"', "", "daemon.debounce", "from 0s to 10s"),
    ("", FREEZE.replace("{cron}", "61 * * * *"), "watch[0].freeze.cron", "valid crontab"),
    ("", FREEZE.replace("{cron}", "0 0 31 2 *"), "watch[0].freeze.cron", "fires"),
    ("", '\n[watch.retain]\nkeep_last = 9223372036854775808\n', "watch[0].retain.keep_last", "from 0 to"),
    ("", '\n[watch.evaluate]\nevaluator = "command"\ncommand = ["awk", "{print $1}"]\n',
     "watch[0].evaluate.command", "{checkpoint}, {step} and {run}"),
]  # fmt: skip


@pytest.mark.parametrize(("daemon", "extra", "key", "expected"), BAD)
def test_bad_values_are_one_config_error_in_check_and_run(
    tmp_path: Path, daemon: str, extra: str, key: str, expected: str
) -> None:
    conf = _config(tmp_path, daemon, extra.replace("{tmp}", str(tmp_path)))
    for args in (["config", "check"], ["run", "--once"]):
        line = _one_line(ckptd(*args, config=conf), 78)
        assert line.startswith(f"ckptd: config error: {conf}: {key}: ")
        assert expected in line and "got " in line
    assert not (tmp_path / "db.sqlite").exists()  # refused before touching anything


@pytest.mark.parametrize(
    ("runs", "expected"), [(".", '"."'), ("..", '".."'), ("/abs/*", '"/abs/*"'), ("", '""')]
)
def test_runs_glob_must_name_subdirectories(tmp_path: Path, runs: str, expected: str) -> None:
    conf = _config(tmp_path)
    conf.write_text(conf.read_text().replace('runs = "*"', f'runs = "{runs}"'))
    line = _one_line(ckptd("config", "check", config=conf), 78)
    assert "watch[0].runs: expected a glob of subdirectories" in line and line.endswith(expected)


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("model.{0}.keras", "fields are named"),
        ("model.{}.keras", "fields are named"),
        ("model.{epoch:zz}.keras", "Unknown format code"),
        ("model.{epoch}-{loss:%}.keras", "cannot read"),  # "25.000000%": no number ckptd parses
        ("model.{epoch}.h5", "ending in .keras or .weights.h5"),
        ("sub/model.{epoch}.keras", "ending in .keras or .weights.h5"),
    ],
)
def test_keras_template_is_formatted_and_parsed_back(
    tmp_path: Path, template: str, why: str
) -> None:
    conf = _config(tmp_path)
    good = "model.{epoch:02d}-{val_loss:.2f}.keras"
    assert good in conf.read_text()
    assert ckptd("config", "check", config=conf).returncode == 0
    conf.write_text(conf.read_text().replace(good, template))
    line = _one_line(ckptd("config", "check", config=conf), 78)
    assert "watch[0].keras_template: expected a file name template" in line and why in line


def test_every_problem_is_listed_one_per_line(tmp_path: Path) -> None:
    conf = _config(tmp_path, 'rescan_interval = "0s"\nlog_level = "loud"\nmetrics_address = "x"')
    result = ckptd("config", "check", config=conf)
    assert result.returncode == 78 and "Traceback" not in result.stderr
    keys = [line.split(": ")[3] for line in result.stderr.strip().splitlines()]
    assert keys == ["daemon.rescan_interval", "daemon.log_level", "daemon.metrics_address"]
    with pytest.raises(ConfigError) as info:  # one line for STATUS= and `ckptd status`
        load_config(conf)
    assert "\n" not in str(info.value) and len(info.value.problems) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'[daemon]\nlog_level = "\xff"\n', "not UTF-8 text (byte 0xff at offset 22)"),
        (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid TOML"),
        (b"[daemon]\nx = 2024-02-30\n", "not valid TOML"),
    ],
)
def test_unreadable_files_are_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_bytes(content)
    assert message in _one_line(ckptd("config", "check", config=conf), 78)


def test_fifo_and_device_configs_do_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    import os

    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        line = _one_line(ckptd("config", "check", config=path, timeout=30), 78)
        assert line == f"ckptd: config error: {path}: cannot read: not a regular file"


@pytest.mark.parametrize(
    ("second", "runs", "ok"),
    [
        ("runs/a", "*", False),  # a run of watch[0] watched again as a single run
        ("runs/a/b", "*", False),  # inside a run of watch[0]
        ("runs/../runs", "*", False),  # the same directory, spelled differently
        ("runs/other", "team-*", True),  # a branch watch[0]'s glob never matches
    ],
)
def test_overlapping_watches_are_refused(tmp_path: Path, second: str, runs: str, ok: bool) -> None:
    conf = _config(tmp_path, runs=runs, best=False)
    conf.write_text(conf.read_text() + f'\n[[watch]]\npath = "{tmp_path / second}"\n')
    result = ckptd("config", "check", config=conf)
    if ok:
        assert result.returncode == 0, result.stderr
        return
    line = _one_line(result, 78)
    assert "watch[1].path: " in line and ("run of watch[0]" in line or "already watched" in line)


@pytest.mark.slow
def test_sighup_with_a_bad_value_keeps_the_running_config(tmp_path: Path, daemon_factory) -> None:
    conf = _config(tmp_path)
    good = tmp_path / "good.toml"  # `ckptd status` itself refuses the edited (invalid) file
    good.write_text(conf.read_text())
    d = daemon_factory(conf)

    def status() -> dict:
        result = ckptd("status", "--json", config=good)
        return json.loads(result.stdout)["daemon"] if result.returncode == 0 else {}

    wait_for(lambda: status().get("alive"))
    conf.write_text(conf.read_text().replace('rescan_interval = "2s"', 'rescan_interval = "3000d"'))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    error = wait_for(lambda: status().get("reload_error"))
    assert f"{conf}: daemon.rescan_interval: expected a duration from 1s to 1d" in error
    assert d.proc.poll() is None and status()["alive"]
    assert d.stop() == 0


# ---------------------------------------------------------------- item 15: the CLI


@pytest.fixture
def database(tmp_path: Path) -> Path:
    conf = _config(tmp_path)
    assert ckptd("db", "upgrade", config=conf).returncode == 0
    return conf


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["show", "a@99999999999999999999"], "the step after @ must be a whole number from 0 to"),
        (["pin", "a@9223372036854775808"], "the step after @ must be a whole number from 0 to"),
        (["unpin", "a@²"], "the step after @ must be a whole number from 0 to"),
        (["events", "--limit", "-5"], "-5 is not in the range"),
        (["events", "--limit", "0"], "0 is not in the range"),
        (["events", "--limit", "99999999999999999999"], "is not in the range"),
        (["best", "a", "--top", "0"], "0 is not in the range"),
        (["ls", "--state", "bogus"], "'bogus' is not one of"),
    ],
)
def test_usage_errors_are_one_line_exit_2(database: Path, args: list[str], expected: str) -> None:
    line = _one_line(ckptd(*args, config=database), 2)
    assert line.startswith(f"ckptd {args[0]}: ") and expected in line


@pytest.mark.parametrize("command", ["ls", "show", "pin", "unpin", "best", "evaluate", "prune"])
def test_non_utf8_arguments_are_a_usage_error(database: Path, command: str) -> None:
    result = subprocess.run(
        [PY, "-m", "ckptd", "--config", str(database), command, b"run-\xff@3"],
        capture_output=True,
        env=ENV,
        timeout=60,
    )
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert result.stderr.decode().splitlines() == [
        'ckptd: argument "run-\\xff@3" is not valid UTF-8 text'
    ]


@pytest.mark.parametrize("args", [["db", "upgrade"], ["db", "current"], ["status"], ["ls"]])
def test_a_damaged_database_is_one_line_exit_1(tmp_path: Path, args: list[str]) -> None:
    conf = _config(tmp_path)
    (tmp_path / "db.sqlite").write_bytes(b"not a database, but long enough to look like one" * 100)
    line = _one_line(ckptd(*args, config=conf), 1)
    assert line.startswith("ckptd: database error: file is not a database: the database file is")


@pytest.mark.slow
def test_missing_names_and_unusable_databases_are_one_line_exit_1(
    tmp_path: Path, database: Path
) -> None:
    for args in (["show", "a@9223372036854775807"], ["ls", "nope"], ["events", "--run", "x"]):
        assert _one_line(ckptd(*args, config=database), 1).startswith("ckptd: no ")
    # A database that cannot be used is a failure (1); a URL naming a driver that does not
    # exist is a config error (78), found when the config is read.
    for url, code, expected in [
        ("sqlite:////proc/nope/x.db", 1, "cannot create the database directory"),
        ("postgresql+nodriver://u@h/db", 78, "unknown database dialect 'postgresql+nodriver'"),
    ]:
        conf = tmp_path / "other.toml"
        conf.write_text(f'[daemon]\ndatabase = "{url}"\n')
        assert expected in _one_line(ckptd("db", "upgrade", config=conf), code)


def test_overlap_is_found_whichever_watch_comes_first() -> None:
    inner, outer = {"path": "/d/a/b"}, {"path": "/d", "runs": "*"}
    for watches in ([inner, outer], [outer, inner]):
        with pytest.raises(ConfigError) as info:
            parse_config({"watch": watches}, source="X.toml")
        assert str(info.value) == (
            f"X.toml: watch[1].path: /d/a/b (watch[{watches.index(inner)}]) is or holds a run of "
            f'watch[{watches.index(outer)}] (/d, runs = "*"); a run can belong to one watch only: '
            "watch disjoint directories, or narrow the runs glob"
        )
    parse_config({"watch": [{"path": "/d", "runs": "x/*"}, {"path": "/d/y/z"}]})  # disjoint


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """The daemon runs in / under systemd, the CLI anywhere: both must open the same files."""
    data = {
        "daemon": {"database": "sqlite:///state/ckptd.db"},
        "watch": [
            {
                "path": "runs",
                "best": {"metric": "m"},
                "evaluate": {"evaluator": "keras", "data": "held/out.npz"},
                "freeze": {"export_dir": "../exports"},
            }
        ],
    }
    config = parse_config(data, source=str(tmp_path / "conf" / "c.toml"))
    (w,) = config.watches
    assert config.daemon.database == f"sqlite:///{tmp_path}/conf/state/ckptd.db"
    assert w.path == tmp_path / "conf" / "runs"
    assert w.evaluate is not None and w.evaluate.data == tmp_path / "conf" / "held" / "out.npz"
    assert w.freeze is not None and w.freeze.export_dir == tmp_path / "exports"


@pytest.mark.parametrize("path", ["/x/" + "n" * 256, "/x" * 2100, "/x/a\x00b"])
def test_paths_that_can_never_exist_are_refused(path: str) -> None:
    with pytest.raises(ConfigError, match=r"^X.toml: watch\[0\].path: expected "):
        parse_config({"watch": [{"path": path}]}, source="X.toml")


def test_an_unexpected_error_is_one_line_unless_debugging(database: Path) -> None:
    """A bug is still one line (exit 1) for the CLI; CKPTD_DEBUG=1 shows the traceback."""
    script = (
        "import sys, ckptd.cli, ckptd.store.daemons as d\n"
        "def boom(*a, **k): raise KeyError('x')\n"
        "d.latest = boom\n"
        f"sys.exit(ckptd.cli.main(['--config', {str(database)!r}, 'status']))\n"
    )
    for debug, lines in (("", 1), ("1", None)):
        result = subprocess.run(
            [PY, "-c", script],
            capture_output=True,
            text=True,
            env={**ENV, "CKPTD_DEBUG": debug},
            timeout=60,
        )
        assert result.returncode == 1
        if lines:
            assert result.stderr.strip().splitlines() == [
                "ckptd: internal error: KeyError: 'x' (a bug in ckptd: please report it; "
                "CKPTD_DEBUG=1 shows the traceback)"
            ]
        else:
            assert "Traceback" in result.stderr
