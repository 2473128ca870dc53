"""Config: the TOML contract, durations, and one-line errors that name file and key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from ckptd.config import ConfigError, load_config, parse_config, parse_duration
from tests.conftest import REPO, ckptd


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("6h", 21600), ("1.5d", 129600), ("250ms", 0.25), (30, 30)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["ten minutes", "-5s", "5 parsecs", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_full_contract_parses(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "daemon": {"database": "sqlite:////tmp/x.db", "rescan_interval": "60s"},
            "watch": [
                {
                    "path": "/data/runs",
                    "runs": "*",
                    "observer": "polling",
                    "best": {"metric": "eval/accuracy", "mode": "max"},
                    "evaluate": {
                        "evaluator": "meta_graph",
                        "every": "5m",
                        "timeout": "30m",
                        "data": "/data/heldout.npz",
                        "feed": {"x:0": "x"},
                        "fetch": {"eval/accuracy": "accuracy:0"},
                    },
                    "freeze": {
                        "format": "saved_model",
                        "export_dir": "/srv/models/mnist",
                        "every": "1h",
                        "keep": 3,
                    },
                    "retain": {
                        "keep_last": 5,
                        "keep_best": 3,
                        "keep_every": "6h",
                        "min_age": "10m",
                    },
                }
            ],
        },
        source="x.toml",
    )
    (w,) = cfg.watches
    assert cfg.daemon.rescan_interval == timedelta(seconds=60)
    assert w.path == Path("/data/runs") and w.runs == "*" and w.observer == "polling"
    assert w.evaluate is not None and w.evaluate.timeout == timedelta(minutes=30)
    assert w.freeze is not None and w.freeze.keep == 3 and w.freeze.format == ("saved_model",)
    assert w.retain is not None and w.retain.keep_every == timedelta(hours=6)


def test_shipped_example_config_is_valid() -> None:
    cfg = load_config(REPO / "deploy" / "ckptd.toml")
    assert cfg.watches, "the example config should show at least one watch"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"watch": [{"path": "/x", "best": {"mode": "maximum"}}]},
            'X.toml: watch[0].best.mode: expected "min" or "max", got "maximum"',
        ),
        (
            {"watch": [{"path": "/x", "observr": "auto"}]},
            'X.toml: watch[0].observr: unknown key (did you mean "observer"?)',
        ),
        (
            {"daemon": {"rescan_interval": "soon"}},
            "X.toml: daemon.rescan_interval: expected a duration",
        ),
        ({"watch": [{"runs": "*"}]}, "X.toml: watch[0].path: required"),
        (
            {"watch": [{"path": "/x", "retain": {"keep_last": -1}}]},
            "X.toml: watch[0].retain.keep_last: expected a whole number from 0 to 1000000, got -1",
        ),
        (
            {"watch": [{"path": "/x", "retain": {"keep_best": 2}}]},
            "X.toml: watch[0].best.metric: required when freeze or keep_best is set",
        ),
        (
            {"watch": [{"path": "/x", "evaluate": {"evaluator": "meta_graph"}}]},
            "X.toml: watch[0].evaluate.data: required",
        ),
        (
            {"watch": [{"path": "/x"}, {"path": "/x"}]},
            "X.toml: watch[1].path: /x is already watched",
        ),
        ({"deamon": {}}, 'X.toml: deamon: unknown key (did you mean "daemon"?)'),
        (
            {
                "watch": [
                    {
                        "path": "/x",
                        "best": {"metric": "m"},
                        "freeze": {"export_dir": "/e", "cron": "hourly"},
                    }
                ]
            },
            'X.toml: watch[0].freeze.cron: expected a crontab schedule of 5 fields such as "0 * * * *", got "hourly"',
        ),
        (
            {
                "watch": [
                    {
                        "path": "/x",
                        "best": {"metric": "m"},
                        "freeze": {"export_dir": "/e", "format": "onnx"},
                    }
                ]
            },
            'X.toml: watch[0].freeze.format: expected "saved_model" or "frozen_graph", got "onnx"',
        ),
    ],
)
def test_errors_name_file_key_and_expectation(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="X.toml")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_missing_watch_path_is_a_warning_not_an_error(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[daemon]\ndatabase = "sqlite:///{tmp_path}/db"\n[[watch]]\npath = "{tmp_path}/later"\n'
    )
    result = ckptd("config", "check", config=conf)
    assert result.returncode == 0, result.stderr
    assert "does not exist yet" in result.stderr


def test_config_check_exit_78_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[[watch]]\npath = "/x"\n[watch.best]\nmode = "maximum"\n')
    result = ckptd("config", "check", config=conf)
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f'ckptd: config error: {conf}: watch[0].best.mode: expected "min" or "max", got "maximum"'
    ]


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    conf = tmp_path / "broken.toml"
    conf.write_text("[daemon\n")
    result = ckptd("config", "check", config=conf)
    assert result.returncode == 78 and "not valid TOML" in result.stderr
    result = ckptd("config", "check", config=tmp_path / "nope.toml")
    assert result.returncode == 78 and "no such file" in result.stderr


def test_default_database_follows_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/ckptd")
    assert parse_config({}).daemon.database == "sqlite:////var/lib/ckptd/ckptd.db"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("HOME", "/home/u")
    assert parse_config({}).daemon.database == "sqlite:////home/u/.local/state/ckptd/ckptd.db"
