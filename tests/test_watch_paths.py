"""A watch path that comes and goes (issue 12, item 8): the real daemon, the real observers.

While the path is missing its nearest existing ancestor is watched; when the path is back it is
observed again within a second and scanned, so checkpoints are recorded without waiting for the
periodic rescan (an hour here), and ``status`` says what is watched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Corpus, DaemonProcess, ckptd, query, wait_for, write_config


def _complete(db: Path, like: str) -> int:
    return query(
        db, "SELECT count(*) FROM checkpoints WHERE state = 'complete' AND prefix LIKE ?", like
    )[0][0]


def _watches(conf: Path) -> list[dict[str, object]]:
    status = json.loads(ckptd("status", "--json", config=conf).stdout)
    return status["daemon"]["watches"] if status["daemon"] else []


def _text(conf: Path) -> str:
    return ckptd("status", config=conf).stdout


def _arrive(corpus: Corpus, kind: str, staging: Path, root: Path) -> None:
    """``root`` appears in one rename, holding the run ``kind`` whose files were written where
    no observer looks: only a scan can find them."""
    corpus.copy(kind, staging / kind)
    os.rename(staging, root)


@pytest.mark.slow
def test_a_deleted_and_recreated_root_is_watched_again_and_scanned(
    tmp_path: Path, corpus: Corpus, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, rescan="1h")
    corpus.copy("tf1", root / "a")
    daemon = daemon_factory(conf)
    wait_for(lambda: _complete(db, f"{root}/a/%") == 3)
    wait_for(lambda: [w["observer"] for w in _watches(conf)] == ["inotify"])
    assert f"watching {root} (inotify)" in _text(conf)

    # Deleted: status says the truth, the ancestor is what is watched.
    shutil.rmtree(root)
    waiting = {"path": str(root), "observer": "waiting for path", "alive": False}
    wait_for(lambda: _watches(conf) == [{**waiting, "watching": str(tmp_path)}])
    assert f"waiting for {root} (watching {tmp_path})" in _text(conf)

    # Recreated holding a run written out of sight: observed and scanned again at once.
    _arrive(corpus, "tf2", tmp_path / "staging", root)
    wait_for(lambda: _complete(db, f"{root}/tf2/%") == 3, timeout=30)
    wait_for(lambda: [w["observer"] for w in _watches(conf)] == ["inotify"])
    # ... and its observer sees what follows: a new run, then a deletion.
    corpus.copy("sharded", root / "b")
    wait_for(lambda: _complete(db, f"{root}/b/%") == 2, timeout=30)
    shutil.rmtree(root / "b")
    # Live rows: a copy seen half-done can leave a ``replaced`` (history) row.
    sql = "SELECT DISTINCT state FROM checkpoints WHERE prefix LIKE ? AND state != 'replaced'"
    wait_for(lambda: query(db, sql, f"{root}/b/%") == [("gone",)], timeout=30)
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_watch_path_that_appears_after_start(
    tmp_path: Path, corpus: Corpus, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Two levels missing at start: the nearest ancestor is watched, then the next one."""
    root = tmp_path / "later" / "runs"
    db = tmp_path / "ckptd.db"
    conf = write_config(tmp_path / "c.toml", root, db=db, rescan="1h")
    daemon = daemon_factory(conf)
    wait_for(lambda: f"waiting for {root} (watching {tmp_path})" in _text(conf))
    (tmp_path / "later").mkdir()
    wait_for(lambda: f"waiting for {root} (watching {tmp_path / 'later'})" in _text(conf))
    _arrive(corpus, "tf1", tmp_path / "staging", root)
    wait_for(lambda: _complete(db, f"{root}/tf1/%") == 3, timeout=30)
    wait_for(lambda: f"watching {root} (inotify)" in _text(conf))
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0
