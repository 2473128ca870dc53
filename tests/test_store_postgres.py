"""PostgreSQL as the store: bad URLs and missing pieces give one line and the exit status the
README promises; the CLI's read-only handle cannot write."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ckptd.store import migrate
from ckptd.store.db import StoreError, make_engine, session_scope
from tests.conftest import ENV, PY, ckptd


def _config(tmp_path: Path, url: str) -> Path:
    (tmp_path / "runs").mkdir(exist_ok=True)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[daemon]\ndatabase = "{url}"\n\n[[watch]]\npath = "{tmp_path / "runs"}"\n')
    return conf


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", [("config", "check"), ("run",), ("status",)])
def test_a_postgresql_url_without_its_driver_says_which_extra_to_install(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A psycopg that cannot be imported (as when the extra is not installed): exit 78 and
    the pip command, at `config check` already, not a ModuleNotFoundError traceback later."""
    fake = tmp_path / "site" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named psycopg')\n")
    conf = _config(tmp_path, "postgresql+psycopg://ckptd@db.example/ckptd")
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'site'}:{ENV['PYTHONPATH']}"}
    result = subprocess.run(
        [PY, "-m", "ckptd", "--config", str(conf), *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 78, result.stderr
    assert "pip install 'ckptd[postgres]'" in _one_line(result)


def test_an_unknown_dialect_is_a_config_error(tmp_path: Path) -> None:
    result = ckptd("config", "check", config=_config(tmp_path, "nosuchdb://host/x"))
    assert result.returncode == 78
    assert "unknown database dialect" in _one_line(result)


@pytest.mark.slow
@pytest.mark.pg
def test_a_postgresql_server_that_is_not_there_is_one_line_and_exit_1(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://ckptd@/ckptd?host={tmp_path}"  # no server listens there
    conf = _config(tmp_path, url)
    for command in (("status",), ("db", "upgrade"), ("run",)):
        result = ckptd(*command, config=conf, real=True)
        assert result.returncode == 1, (command, result.stderr)
        assert "cannot connect to the database" in _one_line(result)


@pytest.mark.slow
@pytest.mark.pg
def test_an_unmigrated_postgresql_database_says_to_upgrade(tmp_path: Path, pg_cluster: Any) -> None:
    conf = _config(tmp_path, pg_cluster.new_database())
    result = ckptd("status", config=conf, real=True)
    assert result.returncode == 1
    assert "ckptd db upgrade" in _one_line(result)
    upgraded = ckptd("db", "upgrade", config=conf, real=True)
    assert upgraded.returncode == 0, upgraded.stderr
    assert ckptd("status", config=conf, real=True).returncode == 0


@pytest.mark.pg
def test_the_read_only_handle_cannot_write_on_postgresql(pg_cluster: Any) -> None:
    url = pg_cluster.new_database()
    migrate.upgrade(make_engine(url))
    ro = make_engine(url, readonly=True)
    with pytest.raises(StoreError, match="read-only"), session_scope(ro) as s:
        s.execute(text("INSERT INTO pins (checkpoint_id, created_at) VALUES (1, now())"))
    ro.dispose()


@pytest.mark.pg
def test_daemons_starting_together_on_an_empty_postgresql_create_the_schema_once(
    pg_cluster: Any,
) -> None:
    """SQLite's BEGIN IMMEDIATE makes the others wait; on PostgreSQL a transaction lock does."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    url = pg_cluster.new_database()
    engines = [make_engine(url) for _ in range(4)]
    start = Barrier(len(engines))

    def ensure(engine: Any) -> tuple[str | None, str | None]:
        start.wait()
        return migrate.ensure_schema(engine)

    with ThreadPoolExecutor(len(engines)) as pool:
        results = list(pool.map(ensure, engines))
    head = migrate.SCHEMA_HEAD
    assert sorted(results, key=str) == sorted([(None, head)] + [(head, head)] * 3, key=str)
    for engine in engines:
        engine.dispose()


def _record_with_the_daemon(tmp_path: Path, url: str, golden: Any) -> list[list[dict[str, Any]]]:
    """The golden runs backfilled by `ckptd run --once` into ``url`` and listed by the CLI;
    then pruned to the newest of each run by `ckptd prune`, and listed again."""
    import json

    root = tmp_path / "runs"
    for kind in ("tf1", "tf2", "sharded", "keras"):
        golden.copy(kind, root / kind)
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[daemon]\ndatabase = "{url}"\n\n[[watch]]\npath = "{root}"\nruns = "*"\n'
        'keras_template = "model.{epoch:02d}-{val_loss:.2f}.keras"\n'
    )
    assert ckptd("db", "upgrade", config=conf).returncode == 0
    result = ckptd("run", "--once", config=conf)
    assert result.returncode == 0, result.stderr
    again = ckptd("run", "--once", config=conf)  # nothing new: nothing recorded twice
    assert again.returncode == 0, again.stderr
    volatile = {"id", "run_id", "recorded_at", "completed_at", "created_at"}

    def listed() -> list[dict[str, Any]]:
        out = ckptd("ls", "--all", "--json", config=conf)
        assert out.returncode == 0, out.stderr
        rows = [{k: v for k, v in r.items() if k not in volatile} for r in json.loads(out.stdout)]
        return sorted(rows, key=lambda r: (r["run"], r["path"]))

    recorded = listed()
    conf.write_text(conf.read_text() + '\n[watch.retain]\nkeep_last = 1\nmin_age = "0s"\n')
    pruned = ckptd("prune", config=conf)
    assert pruned.returncode == 0, pruned.stderr
    return [recorded, listed()]


@pytest.mark.slow
@pytest.mark.pg
def test_the_daemon_records_real_checkpoints_into_postgresql_as_into_sqlite(
    tmp_path: Path, pg_cluster: Any, golden: Any
) -> None:
    """Real TensorFlow output (the golden runs) recorded by the daemon into PostgreSQL, then
    pruned, reads back through the CLI exactly as from SQLite: every checkpoint, step, state
    and metric."""
    (tmp_path / "pg").mkdir()
    (tmp_path / "sqlite").mkdir()
    on_pg = _record_with_the_daemon(tmp_path / "pg", pg_cluster.new_database(), golden)
    on_sqlite = _record_with_the_daemon(
        tmp_path / "sqlite", f"sqlite:///{tmp_path / 'sqlite' / 'ckptd.db'}", golden
    )
    moved = [
        [
            {
                k: str(v).replace(str(tmp_path / "sqlite"), str(tmp_path / "pg"))
                for k, v in r.items()
            }
            for r in rows
        ]
        for rows in on_sqlite
    ]
    assert [[{k: str(v) for k, v in r.items()} for r in rows] for rows in on_pg] == moved
    recorded, after_prune = on_pg
    tf_steps = sorted(r["step"] for r in recorded if r["run"] == "tf2")
    assert tf_steps == sorted(rec["step"] for rec in golden.saves["tf2"])
    assert all(r["state"] == "complete" for r in recorded)
    states = [r["state"] for r in after_prune]
    assert states.count("complete") == 4 and "pruned" in states  # the newest of each run


def test_concurrent_exports_of_a_run_get_distinct_versions(database_url: str) -> None:
    """Each export's version is one more than the highest: two writers reading it at once
    must not both take the same (SQLite: BEGIN IMMEDIATE; PostgreSQL: the run row's lock)."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import insert

    from ckptd.core.model import COMPLETE, utcnow
    from ckptd.store import exports, reads, tables
    from ckptd.store.handle import Store

    a, b = Store.open(database_url), Store.open(database_url)
    migrate.ensure_schema(a.engine)
    with a.session() as s:
        run_id = s.execute(
            insert(tables.runs).values(name="r", path="/w/r", watch_path="/w", created_at=utcnow())
        ).inserted_primary_key[0]
        cid = s.execute(
            insert(tables.checkpoints).values(
                run_id=run_id,
                prefix="/w/r/ckpt-1",
                step=1,
                format="tf2",
                state=COMPLETE,
                files=[],
                signature=[],
                recorded_at=utcnow(),
            )
        ).inserted_primary_key[0]
        (checkpoint,) = reads.checkpoints(s, ids=[cid])

    def export(store: Store) -> int:
        return exports.begin(
            store, checkpoint, root="/e/r", on_disk=0, formats="saved_model", metric=None,
            metric_value=None,
        )[1]  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(export, [a, b] * 10))
    assert sorted(versions) == list(range(1, 21))
    a.close()
    b.close()
