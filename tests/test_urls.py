"""Database URLs (store/urls.py): the one reader of SQLite URLs, for config, engine and cold start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ckptd.store import urls
from ckptd.store.db import make_engine
from tests.conftest import ENV, PY, REPO


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:////var/lib/ckptd/ckptd.db", "/var/lib/ckptd/ckptd.db"),
        ("sqlite:///relative/ckptd.db", "relative/ckptd.db"),
        ("sqlite+pysqlite:////tmp/a%20b/ckptd.db?timeout=5", "/tmp/a b/ckptd.db"),
        ("sqlite:///file:x.db?uri=true", "file:x.db"),
        ("sqlite://", None),
        ("sqlite:///", None),
        ("sqlite:///:memory:", None),
        ("sqlite://host/x.db", None),  # SQLite's driver refuses a host
        ("postgresql://ckptd@db/ckptd", None),
        ("nonsense", None),
    ],
)
def test_sqlite_path(url: str, path: str | None) -> None:
    assert urls.sqlite_path(url) == (Path(path) if path is not None else None)


def test_the_engine_opens_the_file_sqlite_path_names(tmp_path: Path) -> None:
    """What SQLAlchemy opens for the URL as given is the file the store reads and creates."""
    url = f"sqlite:///{tmp_path}/a%20b/c%2Bd.db?timeout=5"
    expected = tmp_path / "a b" / "c+d.db"
    assert urls.sqlite_path(url) == expected
    engine = make_engine(url)  # creates the directory sqlite_path names, then connects
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x)")
    finally:
        engine.dispose()
    assert expected.stat().st_size > 0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///state/ckptd.db", "sqlite:////etc/ckptd/state/ckptd.db"),
        ("sqlite:///../x.db?timeout=5", "sqlite:////etc/x.db?timeout=5"),
        ("sqlite+pysqlite:///a b/x.db", "sqlite+pysqlite:////etc/ckptd/a b/x.db"),
        ("sqlite:///a%3Fb.db", "sqlite:////etc/ckptd/a%3Fb.db"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("sqlite:///file:x.db?uri=true", "sqlite:///file:x.db?uri=true"),
        ("sqlite://", "sqlite://"),
        ("postgresql://u:p@h/db", "postgresql://u:p@h/db"),
    ],
)
def test_absolute(url: str, expected: str) -> None:
    made = urls.absolute(url, Path("/etc/ckptd"))
    assert made == expected
    if (path := urls.sqlite_path(made)) is not None and not str(path).startswith("file:"):
        assert path.is_absolute()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("nonsense", ""),
        ("/var/lib/ckptd.db", ""),
        ("postgresql://u:p@h:notaport/db", "port"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite://host/x.db", "no host"),
    ],
)
def test_check_refuses(url: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        urls.check(url)
    assert why in str(info.value) and (why or str(info.value) == "")


@pytest.mark.parametrize(
    "url", ["sqlite:////x/y.db", "sqlite:///rel.db", "mysql+pymysql://u@h:3306/d"]
)
def test_check_accepts(url: str) -> None:
    urls.check(url)


def test_redacted_hides_the_password() -> None:
    assert urls.redacted("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert urls.redacted("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert urls.redacted("postgresql://u:p@h:notaport/db") == "(unparseable URL)"


def test_cold_start_reads_the_url_without_sqlalchemy() -> None:
    """The prefetch overlaps SQLAlchemy's import: reading the URL must not import it."""
    probe = (
        "import sys\n"
        "from ckptd.daemon.prefetch import knows_no_run\n"
        "knows_no_run('sqlite:////nonexistent/ckptd.db')\n"
        "assert not [m for m in sys.modules if m.startswith('sqlalchemy')]\n"
    )
    result = subprocess.run([PY, "-c", probe], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_check_driver_names_what_to_install() -> None:
    urls.check_driver("sqlite:////x/y.db")
    with pytest.raises(urls.MissingDriver, match="install pymysql"):
        urls.check_driver("mysql+pymysql://u@h:3306/d")  # not installed here
    with pytest.raises(ValueError, match="unknown database dialect"):
        urls.check_driver("nosuchdb://h/d")
    pytest.importorskip("psycopg")
    urls.check_driver("postgresql+psycopg://u@h/d")
