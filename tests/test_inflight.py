"""Issue 13: work in flight when its daemon dies is not stuck. A real daemon is killed (-9) in
the middle of evaluating a checkpoint of real TF output; once its claim has expired the job is
back in the queue (another daemon evaluates it, once) and the checkpoint is prunable again, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ckptd.core.model import utcnow
from ckptd.store.handle import Store
from tests.conftest import Corpus, DaemonProcess, ckptd, wait_for, write_config

pytestmark = pytest.mark.slow

HANG = """
[watch.evaluate]
evaluator = "python"
function = "tests.daemon_eval_fns:hang"
timeout = "1h"
"""
SCORE = """
[watch.evaluate]
evaluator = "python"
function = "tests.daemon_eval_fns:step_score"
every = "1s"
timeout = "300s"
"""
BEST = """
[watch.best]
metric = "eval/score"
mode = "max"
"""
RETAIN = """
[watch.retain]
keep_last = 1
min_age = "0s"
every = "1s"
"""


def _config(tmp_path: Path, name: str, root: Path, url: str, extra: str) -> Path:
    conf = write_config(
        tmp_path / f"{name}.toml",
        root,
        db=tmp_path / "unused.db",
        rescan="1s",
        daemon=f'name = "{name}"\nlease_ttl = "3s"',
        best=False,
        extra=extra,
    )
    conf.write_text(conf.read_text().replace(f'"sqlite:///{tmp_path / "unused.db"}"', f'"{url}"'))
    return conf


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store.open(database_url)
    yield s
    s.close()


def _sql(store: Store, statement: str, **params: Any) -> list[Any]:
    with store.engine.begin() as conn:
        result = conn.execute(text(statement), params)
        return [tuple(r) for r in result] if result.returns_rows else []


def _running(store: Store) -> list[tuple[int, str]]:
    return _sql(
        store,
        "select c.step, c.prefix from evaluations e join checkpoints c on c.id = e.checkpoint_id "
        "where e.status = 'running'",
    )


def _killed_mid_evaluation(
    tmp_path: Path, database_url: str, store: Store, golden: Corpus, daemon_factory: Any
) -> tuple[Path, int]:
    """Daemon ``a`` claims the oldest checkpoint's evaluation, hangs in it and is killed -9
    (with its worker); its claim is then aged past CLAIM_TTL, as if a minute had passed, and
    named as another host's (whose process nobody here can see is gone)."""
    root = tmp_path / "runs"
    golden.copy("tf2", root / "tf2")
    conf = _config(tmp_path, "a", root, database_url, HANG)
    assert ckptd("db", "upgrade", config=conf).returncode == 0
    a = daemon_factory(conf)
    (step, _prefix), *_ = wait_for(lambda: _running(store), timeout=60, interval=0.2)
    os.killpg(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    _sql(
        store,
        "update evaluations set claimed_until = :past, claimed_by = 'elsewhere:1:dead' "
        "where status = 'running'",
        past=utcnow() - timedelta(seconds=1),
    )
    return root, step


def test_a_dead_daemons_evaluation_is_prunable_once_its_claim_expired(
    tmp_path: Path,
    database_url: str,
    store: Store,
    golden: Corpus,
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    """Nobody takes the job over (no daemon evaluates that watch now): the checkpoint is not
    `in use` for ever, `ckptd prune` prunes it, and `status` counts no evaluation running."""
    root, step = _killed_mid_evaluation(tmp_path, database_url, store, golden, daemon_factory)
    conf = _config(tmp_path, "cli", root, database_url, RETAIN)
    status = json.loads(ckptd("status", "--json", config=conf).stdout)
    assert "running" not in status["evaluations"], status["evaluations"]
    result = ckptd("prune", config=conf)
    assert result.returncode == 0, result.stderr
    states = dict(_sql(store, "select step, state from checkpoints"))
    assert states[step] == "pruned", (step, states, result.stdout)
    # Its job goes back to the queue, not 'running' for good: nobody claims the jobs of a
    # checkpoint that is no longer complete (the cluster fault suite's audit caught one).
    assert _running(store) == []
    (job,) = _sql(
        store,
        "select e.status, e.claimed_by from evaluations e join checkpoints c "
        "on c.id = e.checkpoint_id where c.step = :step",
        step=step,
    )
    assert job == ("pending", None)


def test_a_dead_daemons_evaluation_is_done_by_the_next_holder_once(
    tmp_path: Path,
    database_url: str,
    store: Store,
    golden: Corpus,
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    """Daemon ``b`` takes the run over, evaluates the job ``a`` left (once), then prunes (the
    best metric keeps every checkpoint awaiting evaluation until it has one)."""
    root, step = _killed_mid_evaluation(tmp_path, database_url, store, golden, daemon_factory)
    retain = RETAIN.replace("keep_last = 1", "keep_last = 1\nkeep_best = 1")
    b = daemon_factory(_config(tmp_path, "b", root, database_url, SCORE + BEST + retain))
    steps = sorted(r["step"] for r in golden.saves["tf2"])
    marker = root / "tf2" / ".evaluated"
    wait_for(lambda: marker.exists() and len(marker.read_text().split()) >= len(steps), 90)
    wait_for(
        lambda: dict(_sql(store, "select step, state from checkpoints")).get(step) == "pruned", 60
    )
    assert sorted(int(s) for s in marker.read_text().split()) == steps  # each once
    b.stop()
