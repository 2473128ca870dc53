"""Issue 13 item 2 on real processes: two `ckptd run` daemons of different names watch the same
runs through one database (a SQLite file, and a PostgreSQL database); only the lease holder
records, a killed holder's runs are taken over within TTL + one rescan, and a daemon paused past
its TTL stops acting and rejoins."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from ckptd.store import tables
from ckptd.store.handle import Store
from ckptd.store.leases import db_now
from tests.conftest import DaemonProcess, ckptd, load_golden, wait_for, write_config

pytestmark = pytest.mark.slow

TTL = 3.0  # [daemon] lease_ttl of both daemons
RESCAN = 1.0


def _config(tmp_path: Path, name: str, root: Path, url: str) -> Path:
    conf = write_config(
        tmp_path / f"{name}.toml",
        root,
        db=tmp_path / "unused.db",
        rescan=f"{RESCAN:g}s",
        daemon=f'name = "{name}"\nlease_ttl = "{TTL:g}s"',
    )
    conf.write_text(conf.read_text().replace(f'"sqlite:///{tmp_path / "unused.db"}"', f'"{url}"'))
    return conf


def _holders(db: Store) -> dict[str, int]:
    """Who holds live leases, by the database's clock."""
    leases = tables.run_leases.c
    stmt = (
        select(leases.owner, func.count())
        .where(leases.expires_at > db_now())
        .group_by(leases.owner)
    )
    with db.engine.connect() as conn:
        return {owner: n for owner, n in conn.execute(stmt)}


def _recorded(db: Store) -> list[tuple[str, str]]:
    with db.engine.connect() as conn:
        rows = conn.execute(
            text(
                "select r.name, c.prefix from checkpoints c join runs r on r.id = c.run_id "
                "where c.state = 'complete'"
            )
        )
        return sorted((name, prefix) for name, prefix in rows)


def _new_keras(root: Path, epoch: int) -> str:
    """A new checkpoint of the Keras run (its epoch is in the file name)."""
    src = sorted((root / "keras").glob("model.*.keras"))[0]
    dest = root / "keras" / f"model.{epoch:02d}-0.10.keras"
    shutil.copyfile(src, dest)
    return dest.name


def _recorded_lines(log: str) -> list[str]:
    return re.findall(r"recorded (\S+@\d+)", log)


@pytest.fixture
def two(
    tmp_path: Path, database_url: str, daemon_factory: Callable[..., DaemonProcess]
) -> Iterator[tuple[Path, Store, DaemonProcess, DaemonProcess]]:
    root = tmp_path / "runs"
    root.mkdir()
    corpus = load_golden(root)
    db = Store.open(database_url)
    assert ckptd("db", "upgrade", config=_config(tmp_path, "a", root, database_url)).returncode == 0
    a = daemon_factory(_config(tmp_path, "a", root, database_url))
    wait_for(lambda: _holders(db).get("a") == 4, timeout=60, interval=0.2)
    b = daemon_factory(_config(tmp_path, "b", root, database_url))
    expected = sum(len(v) for v in corpus.saves.values() if v)
    wait_for(lambda: len(_recorded(db)) >= expected, timeout=60, interval=0.2)
    status = wait_for(
        lambda: (d := _status(tmp_path / "a.toml")) and len(d["other_daemons"]) == 1 and d,
        timeout=30,
        interval=0.3,
    )
    names = {status["daemon"]["name"], status["other_daemons"][0]["name"]}
    assert names == {"a", "b"}
    yield root, db, a, b
    db.close()


def _status(conf: Path) -> dict[str, object] | None:
    import json

    result = ckptd("status", "--json", config=conf)
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_one_holder_records_and_a_killed_holders_runs_are_taken_over(
    two: tuple[Path, Store, DaemonProcess, DaemonProcess],
) -> None:
    root, db, a, b = two
    assert _holders(db) == {"a": 4}  # b stands by
    recorded = _recorded(db)
    assert len(recorded) == len(set(recorded))
    assert _recorded_lines(b.log()) == []  # b recorded nothing
    name = _new_keras(root, 50)
    wait_for(lambda: ("keras", str(root / "keras" / name)) in _recorded(db), timeout=20)

    assert a.proc is not None
    os.killpg(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: _holders(db) == {"b": 4}, timeout=TTL + RESCAN + 5, interval=0.1)
    took = time.monotonic() - killed
    assert took <= TTL + RESCAN + 2, took
    name = _new_keras(root, 51)
    wait_for(lambda: ("keras", str(root / "keras" / name)) in _recorded(db), timeout=20)
    assert "keras@51" in _recorded_lines(b.log())
    shown = ckptd("status", config=root.parent / "b.toml").stdout
    assert "name b, holds 4 run(s)" in shown and "name a, holds 0 run(s)" in shown
    recorded = _recorded(db)
    assert len(recorded) == len(set(recorded))


def test_a_daemon_paused_past_its_lease_stops_acting_and_rejoins(
    two: tuple[Path, Store, DaemonProcess, DaemonProcess],
) -> None:
    root, db, a, b = two
    assert a.proc is not None and b.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _holders(db) == {"b": 4}, timeout=TTL + RESCAN + 5, interval=0.1)
        name = _new_keras(root, 60)  # written while a sleeps: its observer queues the event
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    wait_for(lambda: ("keras", str(root / "keras" / name)) in _recorded(db), timeout=20)
    # a woke up believing it held every run: it noticed by its own clock and wrote nothing.
    # (Or its renewal, in flight when it was paused, found them gone.)
    wait_for(lambda: re.search("leases not renewed|lost the leases", a.log()), timeout=10)
    time.sleep(RESCAN * 3)
    assert "keras@60" not in _recorded_lines(a.log())
    assert "keras@60" in _recorded_lines(b.log())
    recorded = _recorded(db)
    assert len(recorded) == len(set(recorded))
    # It rejoined: alive, standing by, and it takes the runs back when b stops.
    b.stop()
    wait_for(lambda: _holders(db) == {"a": 4}, timeout=RESCAN + 5, interval=0.1)
    name = _new_keras(root, 61)
    wait_for(lambda: ("keras", str(root / "keras" / name)) in _recorded(db), timeout=20)
    assert "keras@61" in _recorded_lines(a.log())
