"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temporary directory as the
``postgres`` user (PostgreSQL refuses to run as root), a Unix socket only, no durability (the
data is thrown away), and one fresh database per test.

Debian's ``postgresql`` package puts the binaries under /usr/lib/postgresql/<version>/bin;
``.ci/run`` installs it when absent. Without it, PostgreSQL tests are skipped with the reason.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER = "postgres"
_SERVER_OPTIONS = (
    "-c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=200"
)


def bindir() -> Path | None:
    """The binaries of the newest PostgreSQL installed (Debian's layout first), or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    on_path = shutil.which("initdb")
    candidates = [p.parent for p in reversed(found)] + ([Path(on_path).parent] if on_path else [])
    return next((d for d in candidates if (d / "pg_ctl").exists()), None)


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    if bindir() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'ckptd[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            return f"no {USER!r} user to run PostgreSQL as"
    return None


@dataclass
class Cluster:
    root: Path
    bin: Path
    _names: itertools.count[int]
    extra_options: str = ""  # server settings beyond _SERVER_OPTIONS, kept for restart()

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@/{database}?host={self.socket_dir}"

    def _psql(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), user=USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """A new empty database's URL (template0: nothing copied but the catalog)."""
        name = f"t{next(self._names)}"
        self._psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1].split("?", 1)[0]
        self._psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def halt(self, mode: str = "fast") -> None:
        """Stop the server and keep its data (``restart`` brings it back): an outage. ``fast``
        ends every session at once, as a restart of the service does."""
        _as_postgres([str(self.bin / "pg_ctl"), "stop", "-D", str(self.root / "data"), "-m", mode])

    def restart(self) -> None:
        """Start the server stopped by :meth:`halt`, on the same socket and data."""
        _pg_ctl_start(self.bin, self.root, self.extra_options)

    def stop(self) -> None:
        _as_postgres(
            [str(self.bin / "pg_ctl"), "stop", "-D", str(self.root / "data"), "-m", "immediate"],
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def _as_postgres(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", USER, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def start(extra_options: str = "") -> Cluster:
    """initdb and start a cluster; the caller stops it. ``extra_options``: more server settings
    (``-c name=value ...``; the benchmarks load pg_stat_statements with it)."""
    bin_ = bindir()
    assert bin_ is not None
    root = Path(tempfile.mkdtemp(prefix="ckptd-pg-"))
    (root / "socket").mkdir()
    if os.geteuid() == 0:
        uid, gid = pwd.getpwnam(USER)[2:4]
        for p in (root, root / "socket"):
            os.chown(p, uid, gid)
    data = root / "data"
    _as_postgres(
        [
            str(bin_ / "initdb"),
            "-D",
            str(data),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]
    )
    _pg_ctl_start(bin_, root, extra_options)
    return Cluster(root, bin_, itertools.count(1), extra_options)


def _pg_ctl_start(bin_: Path, root: Path, extra_options: str = "") -> None:
    options = f"-k {root / 'socket'} {_SERVER_OPTIONS} {extra_options}"
    _as_postgres(
        [
            str(bin_ / "pg_ctl"),
            "start",
            "-D",
            str(root / "data"),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            options,
        ]
    )


def started_or_skip() -> Iterator[Cluster]:
    """A started cluster for a fixture to ``yield from``, stopped after it; the test is skipped
    where PostgreSQL is not installed."""
    import pytest

    why = unavailable()
    if why:
        pytest.skip(why)
    cluster = start()
    try:
        yield cluster
    finally:
        cluster.stop()
