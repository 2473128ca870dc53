"""Store: migrations match the tables, ship in the wheel, and SQLite is set up as promised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ckptd.store import migrate
from ckptd.store.db import StoreError, make_engine, session_scope
from ckptd.store.tables import metadata
from tests.conftest import ENV, REPO, new_database_url


def test_migrations_match_the_tables(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(database_url)
    before, after = migrate.upgrade(engine)
    assert before is None and after == migrate.head_revision(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == [], f"tables and migrations disagree: {diff}"
    assert migrate.is_current(engine)
    # Idempotent: upgrading again is a no-op.
    assert migrate.upgrade(engine) == (after, after)


def _schema(engine: Any) -> list[Any]:
    """Every table, index and trigger as SQLite stores it: a table's columns and constraints in
    any order; on PostgreSQL, as its catalog describes them."""
    if engine.dialect.name != "sqlite":
        return _catalog(engine)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")
        ).all()
    out = []
    for kind, name, sql in rows:
        if kind == "trigger":
            out.append((kind, name, " ".join(sql.split())))
            continue
        head, body = sql.split("(", 1)
        clauses, depth, cur = [], 0, ""
        for ch in body.rsplit(")", 1)[0]:
            depth += (ch == "(") - (ch == ")")
            if ch == "," and depth == 0:
                clauses.append(" ".join(cur.split()))
                cur = ""
            else:
                cur += ch
        clauses.append(" ".join(cur.split()))
        # (a table copied by a batch migration keeps its name quoted: the same table)
        out.append((kind, " ".join(head.replace('"', "").split()), sorted(clauses)))
    return out


def _catalog(engine: Any) -> list[Any]:
    """Every table's columns, keys, constraints and indexes, as the database's catalog has
    them (names and all)."""
    from sqlalchemy import inspect

    with engine.connect() as conn:
        insp = inspect(conn)
        out: list[Any] = []
        for table in sorted(insp.get_table_names()):
            out.append(
                (
                    table,
                    [
                        (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                        for c in insp.get_columns(table)
                    ],
                    insp.get_pk_constraint(table),
                    sorted(map(repr, insp.get_foreign_keys(table))),
                    sorted(map(repr, insp.get_unique_constraints(table))),
                    sorted(map(repr, insp.get_indexes(table))),
                )
            )
        triggers = (
            "SELECT pg_get_triggerdef(t.oid), pg_get_functiondef(t.tgfoid) FROM pg_trigger t "
        )
        triggers += "WHERE NOT t.tgisinternal ORDER BY t.tgname"
        out.append(("triggers", [tuple(r) for r in conn.execute(text(triggers))]))
    return out


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def test_start_up_schema_fast_path_builds_what_the_migrations_build(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    def database(name: str) -> Any:
        (tmp_path / name).mkdir()
        return make_engine(new_database_url(request, kind, tmp_path / name))

    migrated = database("migrated")
    migrate.upgrade(migrated)
    created = database("created")
    assert migrate.ensure_schema(created) == (None, migrate.SCHEMA_HEAD)
    assert migrate.head_revision(created) == migrate.SCHEMA_HEAD
    assert migrate.current_revision(created) == migrate.SCHEMA_HEAD
    with created.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    # Same tables, columns, constraints and indexes, clause by clause as SQLite keeps them.
    assert [r[:2] for r in _schema(created)] == [r[:2] for r in _schema(migrated)]
    assert _schema(created) == _schema(migrated)
    # Current: nothing to do (and Alembic agrees); an older revision goes through Alembic.
    assert migrate.ensure_schema(created) == (migrate.SCHEMA_HEAD,) * 2
    assert migrate.upgrade(created) == (migrate.SCHEMA_HEAD,) * 2
    old = database("old")
    migrate.upgrade(old, "0001")
    assert migrate.ensure_schema(old) == ("0001", migrate.SCHEMA_HEAD)
    assert _schema(old) == _schema(migrated)
    for engine in (migrated, created, old):
        engine.dispose()


def test_sqlite_pragmas_and_readonly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/p.db"
    engine = make_engine(url)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000
    ro = make_engine(url, readonly=True)
    with pytest.raises(StoreError), session_scope(ro) as s:
        s.execute(text("INSERT INTO pins (checkpoint_id, created_at) VALUES (1, '2020-01-01')"))


def test_readonly_on_missing_database_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="ckptd db upgrade"):
        make_engine(f"sqlite:///{tmp_path}/none.db", readonly=True)


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_migrations_run_from_the_installed_wheel(tmp_path: Path) -> None:
    """Build the wheel, install it alone into a target dir, and migrate with it (not the source)."""
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        env=ENV,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("ckptd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ckptd/migrations/env.py" in names
    assert any(n.startswith("ckptd/migrations/versions/0001") for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        env=ENV,
    )
    db = tmp_path / "w.db"
    conf = tmp_path / "c.toml"
    conf.write_text(f'[daemon]\ndatabase = "sqlite:///{db}"\n')
    env = {**ENV, "PYTHONPATH": str(target)}
    probe = "import ckptd.store.migrate as m; print(m.script_location())"
    where = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(target)), f"migrations came from {where}, not the wheel"
    result = subprocess.run(
        [sys.executable, "-m", "ckptd", "--config", str(conf), "db", "upgrade"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "upgraded" in result.stdout
    current = subprocess.run(
        [sys.executable, "-m", "ckptd", "--config", str(conf), "db", "current", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert '"up_to_date": true' in current.stdout
    assert json.loads(current.stdout)["database"] == f"sqlite:///{db}"  # as configured
    assert os.path.getsize(db) > 0


def test_driver_errors_leave_the_store_as_store_errors(tmp_path: Path) -> None:
    """Above the store nothing catches SQLAlchemy's or the driver's exceptions: every store
    entry point raises StoreError, phrased for the user (here a damaged database file)."""
    from ckptd.store import daemons, reads
    from ckptd.store.db import checkpoint_wal
    from ckptd.store.handle import Store

    damaged = tmp_path / "d.db"
    damaged.write_bytes(b"not a database, but long enough to look like one" * 100)
    store = Store.open(f"sqlite:///{damaged}")
    for call in (
        lambda: checkpoint_wal(store.engine),  # a raw connection, outside any session
        lambda: reads.count_states(store),
        lambda: daemons.mark_stopped(store, 1),
        lambda: migrate.schema_revisions(store),
    ):
        with pytest.raises(StoreError, match="file is not a database"):
            call()
    store.close()


def test_wal_checkpoints_can_be_taken_off_the_commit_path(tmp_path: Path) -> None:
    """The daemon's engine never checkpoints in a commit; checkpoint_wal does it on demand."""
    from ckptd.store.db import checkpoint_wal

    url = f"sqlite:///{tmp_path}/w.db"
    default, daemon = make_engine(url), make_engine(url, wal_autocheckpoint=False)
    with default.connect() as c:
        assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    with daemon.connect() as c:
        assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    migrate.upgrade(daemon)
    with session_scope(daemon) as s:
        for i in range(3000):  # well past 1,000 pages of WAL
            s.execute(
                text(
                    "INSERT INTO runs (name, path, watch_path, present, created_at) "
                    "VALUES (:n, :p, '/', 1, '')"
                ),
                {"n": f"r{i}", "p": f"/{i}/" + "x" * 2000},
            )
    wal = tmp_path / "w.db-wal"
    busy, pages, done = checkpoint_wal(daemon)  # type: ignore[misc]
    assert busy == 0 and pages > 1000 and done == pages  # nothing had checkpointed it
    assert wal.exists()
    daemon.dispose()
    default.dispose()


def test_backfill_checkpoints_the_wal_while_it_writes(tmp_path: Path) -> None:
    """The start-up backfill runs before the scheduler's WAL job: a thread checkpoints meanwhile,
    so the copy overlaps the writing instead of landing on the exit (or the first job)."""
    import time

    from ckptd.config import parse_config
    from ckptd.daemon.dbfile import checkpointing_wal
    from ckptd.daemon.main import Daemon

    (tmp_path / "runs").mkdir()
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/d.db"},
            "watch": [{"path": str(tmp_path / "runs"), "runs": "*"}],
        }
    )
    daemon = Daemon(cfg)
    daemon.prepare()
    calls: list[float] = []
    daemon.checkpoint_wal = lambda: calls.append(time.monotonic())  # type: ignore[method-assign]
    with checkpointing_wal(daemon.checkpoint_wal, every=0.02):
        time.sleep(0.3)
    n = len(calls)
    assert n >= 2
    time.sleep(0.1)
    assert len(calls) == n  # stopped with the body
    daemon.store.engine.dispose()
