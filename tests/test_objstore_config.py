"""Watches on object stores in the config: parsing, and `config check`/`run` refusing (exit 78,
one line) a bucket that is missing, credentials that are wrong, a server that is not there —
against the real servers of tests/objservers.py."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from ckptd.config import ConfigError, parse_config
from tests.conftest import ckptd, query
from tests.objfixtures import Bucket
from tests.objservers import ObjServer, free_ports


def watch(path: str, extra: str = "", tail: str = "") -> dict:
    import tomllib

    text = (
        f'[daemon]\ndatabase = "sqlite:////tmp/x.db"\n[[watch]]\npath = "{path}"\n{extra}\n{tail}'
    )
    return tomllib.loads(text)


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("s3://bucket/runs", "s3://bucket/runs"),
        ("s3://bucket/runs/", "s3://bucket/runs"),
        ("gs://my-bucket.example/a/b", "gs://my-bucket.example/a/b"),
        ("gs://bucket", "gs://bucket"),
        ("s3://bucket//runs", None),
        ("s3://bucket/../runs", None),
        ("s3://Bucket/runs", None),
        ("s3://b/runs", None),
        ("s3:///runs", None),
        ("ftp://bucket/runs", None),
        ("az://bucket/runs", None),
    ],
)
def test_watch_path_may_be_an_object_url(given: str, kept: str | None) -> None:
    if kept is None:
        with pytest.raises(ConfigError) as exc:
            parse_config(watch(given))
        assert exc.value.key == "watch[0].path"
        return
    w = parse_config(watch(given)).watches[0]
    assert w.path == kept and isinstance(w.path, str) and w.is_object_store
    assert w.poll_interval == timedelta(seconds=10) and w.endpoint_url is None
    with pytest.raises(ValueError, match="not a local directory"):
        _ = w.local_path


def test_local_paths_stay_paths(tmp_path: Path) -> None:
    w = parse_config(watch(str(tmp_path / "runs"))).watches[0]
    assert w.path == tmp_path / "runs" and isinstance(w.path, Path)
    assert not w.is_object_store and w.local_path == w.path


def test_object_store_keys() -> None:
    w = parse_config(
        watch(
            "s3://bucket/runs",
            'endpoint_url = "http://127.0.0.1:8333/"\npoll_interval = "30s"\nruns = "*"',
            '[watch.best]\nmetric = "eval/accuracy"\n'
            '[watch.freeze]\nexport_dir = "gs://exports/mnist/"\n',
        )
    ).watches[0]
    assert w.endpoint_url == "http://127.0.0.1:8333"
    assert w.poll_interval == timedelta(seconds=30)
    assert w.freeze is not None and w.freeze.export_dir == "gs://exports/mnist"


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ('endpoint_url = "http://key:secret@127.0.0.1:8333"', "endpoint_url", "credentials"),
        ('endpoint_url = "ftp://127.0.0.1"', "endpoint_url", "http(s) URL"),
        ('endpoint_url = "http://127.0.0.1:99999"', "endpoint_url", "http(s) URL"),
        ('poll_interval = "0s"', "poll_interval", "from 1s to 1d"),
        ('observer = "inotify"', "observer", "no inotify"),
    ],
)
def test_bad_object_store_keys(extra: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(watch("s3://bucket/runs", extra))
    assert exc.value.key == f"watch[0].{key}" and words in exc.value.message


@pytest.mark.parametrize(
    "extra", ['endpoint_url = "http://127.0.0.1:8333"', 'poll_interval = "5s"']
)
def test_object_store_keys_refused_on_local_watches(tmp_path: Path, extra: str) -> None:
    with pytest.raises(ConfigError, match="object store watches"):
        parse_config(watch(str(tmp_path), extra))


def test_nested_and_equal_object_watches_refused() -> None:
    import tomllib

    def two(a: str, b: str, runs: str = "") -> dict:
        return tomllib.loads(
            f'[[watch]]\npath = "{a}"\n{runs}\n[[watch]]\npath = "{b}"\n'
            '[daemon]\ndatabase = "sqlite:////tmp/x.db"\n'
        )

    with pytest.raises(ConfigError, match="already watched"):
        parse_config(two("s3://bucket/runs", "s3://bucket/runs/"))
    with pytest.raises(ConfigError, match="a run can belong to one watch only"):
        parse_config(two("s3://bucket/runs", "s3://bucket/runs/a/b"))
    # The same prefix on another scheme, a sibling prefix, a branch the glob cannot match: fine.
    assert len(parse_config(two("s3://bucket/runs", "gs://bucket/runs")).watches) == 2
    assert len(parse_config(two("s3://bucket/runs", "s3://bucket/runs2")).watches) == 2
    ok = parse_config(two("s3://bucket/runs", "s3://bucket/runs/other/x", 'runs = "team-*"'))
    assert len(ok.watches) == 2


def test_worker_watches_may_name_object_watches() -> None:
    import tomllib

    data = tomllib.loads(
        '[daemon]\ndatabase = "sqlite:////tmp/x.db"\n[[watch]]\npath = "gs://bucket/runs"\n'
        '[worker]\nwatches = ["gs://bucket/runs/"]\n'
    )
    assert parse_config(data).worker.watches == ("gs://bucket/runs",)
    data["worker"]["watches"] = ["gs://bucket/other"]
    with pytest.raises(ConfigError, match="not the path of a"):
        parse_config(data)


# ------------------------------------------------------------------ access, against real servers


def write(tmp_path: Path, url: str, extra: str = "") -> Path:
    config = tmp_path / "ckptd.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            [daemon]
            database = "sqlite:///{tmp_path / "ckptd.db"}"

            [[watch]]
            path = "{url}"
            runs = "*"
            {extra}
            """
        )
    )
    return config


def test_config_check_passes_for_a_usable_bucket(
    tmp_path: Path, bucket: Bucket, objstore_env: dict[str, str]
) -> None:
    result = ckptd("config", "check", config=write(tmp_path, bucket.url_of("runs")))
    assert result.returncode == 0, result.stderr
    assert f"watch[0] {bucket.url_of('runs')}: runs=*, polled every 10s" in result.stdout


def test_missing_bucket_is_one_line_exit_78(
    tmp_path: Path, bucket: Bucket, objstore_env: dict[str, str]
) -> None:
    url = f"{bucket.scheme}://{bucket.name}-nope/runs"
    for argv in (("config", "check"), ("run",)):
        result = ckptd(*argv, config=write(tmp_path, url))
        assert result.returncode == 78, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "watch[0].path: missing bucket:" in lines[0]
        assert f"bucket {bucket.name}-nope does not exist" in lines[0]


@pytest.mark.parametrize("objstore_server", ["s3"], indirect=True)
def test_wrong_credentials_are_one_line_exit_78(
    tmp_path: Path, bucket: Bucket, objstore_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import ENV

    monkeypatch.setitem(ENV, "AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for argv in (("config", "check"), ("run",)):
        result = ckptd(*argv, config=write(tmp_path, bucket.url_of("runs")))
        assert result.returncode == 78, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "watch[0].path: denied:" in lines[0] and "credentials" in lines[0]
        assert "not-the-secret" not in result.stderr  # a secret is never shown


def test_unreachable_server_is_one_line_exit_78(
    tmp_path: Path, objstore_server: ObjServer, objstore_env: dict[str, str]
) -> None:
    (port,) = free_ports(1)  # nothing listens there
    url = objstore_server.url("somebucket", "runs")
    extra = f'endpoint_url = "http://127.0.0.1:{port}"'
    result = ckptd("config", "check", config=write(tmp_path, url, extra))
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "watch[0].path: unreachable:" in lines[0], result.stderr
    assert f"127.0.0.1:{port}" in lines[0]


def test_per_watch_endpoint_overrides_the_environment(
    tmp_path: Path, bucket: Bucket, objstore_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import ENV

    (port,) = free_ports(1)
    variable = "AWS_ENDPOINT_URL" if bucket.scheme == "s3" else "STORAGE_EMULATOR_HOST"
    monkeypatch.setitem(ENV, variable, f"http://127.0.0.1:{port}")  # wrong: nothing there
    extra = f'endpoint_url = "{bucket.server.endpoint}"'
    result = ckptd("config", "check", config=write(tmp_path, bucket.url_of("runs"), extra))
    assert result.returncode == 0, result.stderr


def test_export_dir_on_an_object_store_is_checked_too(
    tmp_path: Path, bucket: Bucket, objstore_env: dict[str, str]
) -> None:
    extra = (
        '[watch.best]\nmetric = "eval/accuracy"\n'
        f'[watch.freeze]\nexport_dir = "{bucket.scheme}://{bucket.name}-nope/export"\n'
    )
    result = ckptd("config", "check", config=write(tmp_path, bucket.url_of("runs"), extra))
    assert result.returncode == 78, result.stderr
    assert "watch[0].freeze.export_dir: missing bucket:" in result.stderr


def test_run_once_polls_object_store_watches_beside_local_ones(
    tmp_path: Path, bucket: Bucket, objstore_env: dict[str, str]
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    config = tmp_path / "ckptd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "sqlite:///{tmp_path / "ckptd.db"}"\n'
        f'[[watch]]\npath = "{bucket.url_of("runs")}"\nruns = "*"\n'
        f'[[watch]]\npath = "{local}"\nruns = "*"\n'
    )
    bucket.put("runs/r/notes.txt", b"a run with no checkpoint yet")
    result = ckptd("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    assert "not observed" not in result.stderr  # polled (daemon/objwatch.py), not skipped
    assert "Traceback" not in result.stderr
    rows = query(tmp_path / "ckptd.db", "SELECT name, watch_path FROM runs")
    assert rows == [("r", bucket.url_of("runs"))]


@pytest.mark.slow
def test_sighup_to_a_missing_bucket_keeps_the_running_config(
    tmp_path: Path, bucket: Bucket, objstore_env: dict[str, str], daemon_factory
) -> None:
    import json
    import signal

    from tests.conftest import wait_for

    local = tmp_path / "local"
    local.mkdir()
    head = (
        f'[daemon]\ndatabase = "sqlite:///{tmp_path / "ckptd.db"}"\nheartbeat_interval = "1s"\n'
        f'[[watch]]\npath = "{local}"\nruns = "*"\n'
    )
    conf = tmp_path / "ckptd.toml"
    conf.write_text(head)
    good = tmp_path / "good.toml"
    good.write_text(head)
    d = daemon_factory(conf)

    def status() -> dict:
        result = ckptd("status", "--json", config=good)
        return json.loads(result.stdout)["daemon"] if result.returncode == 0 else {}

    wait_for(lambda: status().get("alive"))
    missing = f"{bucket.scheme}://{bucket.name}-nope/runs"
    conf.write_text(head + f'[[watch]]\npath = "{missing}"\nruns = "*"\n')
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    error = wait_for(lambda: status().get("reload_error"))
    assert "watch[1].path: missing bucket:" in error and f"bucket {bucket.name}-nope" in error
    assert d.proc.poll() is None
    # Fixed: reloaded, and the object store watch is polled.
    conf.write_text(head + f'[[watch]]\npath = "{bucket.url_of("runs")}"\nruns = "*"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: not status().get("reload_error"))
    wait_for(
        lambda: any(
            w.get("path") == bucket.url_of("runs") and w.get("requests")
            for w in status().get("watches", [])
        )
    )
    assert d.stop() == 0
    assert "Traceback" not in d.log()
