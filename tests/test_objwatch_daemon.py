"""A real ``ckptd run`` watching a bucket on a real S3 server (SeaweedFS on loopback): it
records real TF checkpoints uploaded while it runs, never a half-way upload, says in ``status``
what polling costs and what fails, and survives the server going away."""

from __future__ import annotations

import json
import socket
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Corpus, DaemonProcess, ckptd, query, wait_for
from tests.objupload import upload_checkpoint, upload_run

pytestmark = pytest.mark.parametrize("objstore_server", ["s3"], indirect=True)


def _config(tmp_path: Path, url: str, endpoint: str, daemon: str = "") -> tuple[Path, Path]:
    db = tmp_path / "ckptd.db"
    config = tmp_path / "ckptd.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            [daemon]
            database = "sqlite:///{db}"
            heartbeat_interval = "1s"
            {daemon}

            [[watch]]
            path = "{url}"
            runs = "*"
            endpoint_url = "{endpoint}"
            poll_interval = "1s"
            """
        )
    )
    return config, db


def _states(db: Path) -> dict[str, str]:
    rows = query(db, "SELECT prefix, state FROM checkpoints")
    return {p.rsplit("/", 1)[1]: s for p, s in rows}


def _watch_status(config: Path) -> dict[str, Any]:
    out = ckptd("status", "--json", config=config)
    assert out.returncode == 0, out.stderr
    (watch,) = json.loads(out.stdout)["daemon"]["watches"]
    assert isinstance(watch, dict)
    return watch


def _error_shown(config: Path) -> str | None:
    """The watch's last error once the daemon reports one (None before it is up)."""
    out = ckptd("status", "--json", config=config)
    if out.returncode != 0:
        return None
    watches = json.loads(out.stdout)["daemon"].get("watches") or [{}]
    error: str | None = watches[0].get("last_error")
    return error


def _polls_later(config: Path, n: int = 3) -> None:
    """Until the daemon has made ``n`` more polls' worth of requests (a poll is at least one)."""
    start = _watch_status(config)["requests"]
    wait_for(lambda: _watch_status(config)["requests"] >= start + n, timeout=60)


def test_records_uploads_while_running_never_a_half_way_one(
    tmp_path: Path,
    golden: Corpus,
    bucket: Any,
    objstore_env: dict[str, str],
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config, db = _config(
        tmp_path,
        bucket.url_of("runs"),
        bucket.server.endpoint,
        daemon=f'metrics_address = "127.0.0.1:{port}"',
    )
    run = golden.run_dir("tf2")
    upload_run(bucket.fs, run, bucket.key("runs", "r"), prefixes=["ckpt-10"])
    daemon = daemon_factory(config)
    wait_for(lambda: _states(db).get("ckpt-10") == "complete", timeout=60)
    # Uploaded while it runs: one whole, one stopped after its data (no index yet).
    upload_run(bucket.fs, run, bucket.key("runs", "r"), prefixes=["ckpt-20"], events=False)
    upload_checkpoint(bucket.fs, run, bucket.key("runs", "r"), "ckpt-30", stop="data")
    wait_for(lambda: _states(db).get("ckpt-20") == "complete", timeout=60)
    _polls_later(config)
    assert "ckpt-30" not in _states(db)  # half-way: never recorded
    watch = _watch_status(config)
    assert watch["path"] == bucket.url_of("runs")
    assert watch["requests_per_minute"] is not None and watch["requests_per_minute"] > 0
    assert watch["last_error"] is None
    shown = ckptd("status", config=config)
    assert "/min" in shown.stdout and bucket.url_of("runs") in shown.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        scraped = r.read().decode()
    line = f'ckptd_object_store_requests_total{{watch="{bucket.url_of("runs")}"}}'
    (count,) = [float(x.rsplit(" ", 1)[1]) for x in scraped.splitlines() if x.startswith(line)]
    assert count >= 3
    # The rest of its upload arrives: recorded then.
    upload_checkpoint(bucket.fs, run, bucket.key("runs", "r"), "ckpt-30")
    wait_for(lambda: _states(db).get("ckpt-30") == "complete", timeout=60)
    steps = query(db, "SELECT step FROM checkpoints ORDER BY step")
    assert [s for (s,) in steps] == [10, 20, 30]
    assert daemon.stop() == 0


def test_index_without_its_shard_stays_incomplete(
    tmp_path: Path,
    golden: Corpus,
    bucket: Any,
    objstore_env: dict[str, str],
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    config, db = _config(tmp_path, bucket.url_of("runs"), bucket.server.endpoint)
    run = golden.run_dir("sharded")
    upload_checkpoint(bucket.fs, run, bucket.key("runs", "r"), "ckpt-10")
    upload_checkpoint(bucket.fs, run, bucket.key("runs", "r"), "ckpt-20", stop="shard")
    daemon_factory(config)
    wait_for(lambda: _states(db).get("ckpt-10") == "complete", timeout=60)
    _polls_later(config)
    assert _states(db).get("ckpt-20") != "complete"


def test_server_stopped_mid_scan_daemon_stays_up_and_recovers(
    tmp_path: Path,
    golden: Corpus,
    bucket: Any,
    objstore_env: dict[str, str],
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    server = bucket.server
    config, db = _config(tmp_path, bucket.url_of("runs"), server.endpoint)
    run = golden.run_dir("tf2")
    upload_run(bucket.fs, run, bucket.key("runs", "r"), prefixes=["ckpt-10"])
    daemon = daemon_factory(config)
    wait_for(lambda: _states(db).get("ckpt-10") == "complete", timeout=60)
    server.stop()
    try:
        failing = wait_for(lambda: _watch_status(config)["last_error"], timeout=120)
        assert daemon.proc is not None and daemon.proc.poll() is None  # still up
        shown = ckptd("status", config=config)
        assert "failing" in shown.stdout and failing in shown.stdout
        assert _states(db) == {"ckpt-10": "complete"}  # nothing concluded from the outage
    finally:
        server.start()  # SeaweedFS keeps its data across a restart
    upload_run(bucket.fs, run, bucket.key("runs", "r"), prefixes=["ckpt-20"], events=False)
    wait_for(lambda: _states(db).get("ckpt-20") == "complete", timeout=180)
    wait_for(lambda: _watch_status(config)["last_error"] is None, timeout=60)
    assert _states(db)["ckpt-10"] == "complete"
    assert daemon.stop() == 0


@pytest.mark.parametrize("fault", ["503", "truncate"])
def test_throttled_or_truncated_answers_record_nothing_wrong(
    tmp_path: Path,
    golden: Corpus,
    bucket: Any,
    objstore_env: dict[str, str],
    daemon_factory: Callable[..., DaemonProcess],
    fault: str,
) -> None:
    """503 SlowDown on every request, or every read of an index cut short: the daemon stays
    up, says what fails, records nothing from it; when the store answers again, it records."""
    from tests.objfaults import fault_proxy

    run = golden.run_dir("tf2")
    upload_run(bucket.fs, run, bucket.key("runs", "r"), prefixes=["ckpt-10"])
    with fault_proxy(bucket.server.endpoint, bucket.scheme) as proxy:
        config, db = _config(tmp_path, bucket.url_of("runs"), proxy.endpoint)
        daemon = daemon_factory(config)
        wait_for(lambda: _states(db).get("ckpt-10") == "complete", timeout=60)
        if fault == "503":
            proxy.fail("503", times=10_000)
        else:
            proxy.fail("truncate", times=10_000, match=lambda m, p: m == "GET" and ".index" in p)
        upload_run(bucket.fs, run, bucket.key("runs", "r"), prefixes=["ckpt-20"], events=False)
        failing = wait_for(lambda: _error_shown(config), timeout=120)
        assert ("throttl" if fault == "503" else "shorter than asked") in failing
        assert _states(db) == {"ckpt-10": "complete"}
        assert daemon.proc is not None and daemon.proc.poll() is None
        with proxy._lock:
            proxy._faults.clear()  # the store answers again
        wait_for(lambda: _states(db).get("ckpt-20") == "complete", timeout=180)
        assert [s for (s,) in query(db, "SELECT step FROM checkpoints ORDER BY step")] == [10, 20]
        wait_for(lambda: _error_shown(config) is None, timeout=120)
        assert daemon.stop() == 0
