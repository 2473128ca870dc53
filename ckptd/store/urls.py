"""Database URLs: checked, the file a SQLite URL names, shown without the password.

One reader of SQLite URLs for the config, the engine and the daemon's cold start. It imports only
the standard library: the cold start (daemon/prefetch.py) reads the database's file name while
SQLAlchemy is still being imported. SQLAlchemy's own parser is asked only to check or render a
URL of any dialect, and is imported then.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote, unquote

EXAMPLE = "sqlite:////var/lib/ckptd/ckptd.db"
_DIALECT = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\+[A-Za-z0-9_]+)?://")


def _sqlite_parts(url: str) -> tuple[str, str, str | None, str | None] | None:
    """(dialect[+driver], host part, database, query) of a ``sqlite[+driver]://`` URL, split as
    SQLAlchemy splits it (the database percent-decoded); None for any other dialect."""
    name, sep, rest = url.partition("://")
    if not sep or name.split("+", 1)[0] != "sqlite":
        return None
    head, has_query, query = rest.partition("?")
    host, has_database, database = head.partition("/")
    return (
        name,
        host,
        unquote(database) if has_database else None,
        query if has_query else None,
    )


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names; None for another dialect, an in-memory database or a URL
    with a host (which SQLite's driver refuses)."""
    parts = _sqlite_parts(url)
    if parts is None:
        return None
    _name, host, database, _query = parts
    if host or not database or database == ":memory:":
        return None
    return Path(database)


def absolute(url: str, base: Path) -> str:
    """``sqlite:///ckptd.db`` made relative to ``base`` (like every other path in the config);
    any other URL unchanged."""
    parts = _sqlite_parts(url)
    path = sqlite_path(url)
    if parts is None or path is None or path.is_absolute() or str(path).startswith("file:"):
        return url
    name, _host, _database, query = parts
    database = quote(os.path.normpath(base / path), safe=" +/")
    return f"{name}:///{database}" + (f"?{query}" if query is not None else "")


def check(url: str) -> None:
    """Raise ValueError unless ``url`` names a database ckptd can keep: its message says why,
    or is empty when the text is not shaped like a URL at all."""
    if not _DIALECT.match(url):
        raise ValueError("")
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - parsed lazily: a port that is not a number raises here
    except Exception as exc:  # ArgumentError, ValueError: one message either way
        raise ValueError(str(exc)) from None
    parts = _sqlite_parts(url)
    if parts is None:
        return
    if parts[1]:
        raise ValueError(f"a SQLite URL names a file and no host or user, such as {EXAMPLE}")
    if sqlite_path(url) is None:
        raise ValueError("an in-memory database is lost at exit and the CLI cannot see it")


class MissingDriver(ValueError):
    """The URL is fine, but the database driver it names is not installed."""


# The extra that installs each driver ckptd documents.
_EXTRAS = {"psycopg": "postgres"}


def check_driver(url: str) -> None:
    """Import the driver of a URL :func:`check` accepted, so that a missing one is a config
    error (exit 78) naming what to install, not a failure when the daemon first connects:
    :class:`MissingDriver`, or ValueError for a dialect SQLAlchemy does not know."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import NoSuchModuleError

    if _sqlite_parts(url) is not None:
        return  # the standard library's
    parsed = make_url(url)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"unknown database dialect {parsed.drivername!r}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        extra = _EXTRAS.get(parsed.get_driver_name())
        how = f"pip install 'ckptd[{extra}]'" if extra else f"install {parsed.get_driver_name()}"
        raise MissingDriver(
            f"the database driver {parsed.get_driver_name()!r} for {parsed.drivername} is not "
            f"installed ({exc}): {how}"
        ) from None


def redacted(url: str) -> str:
    """The URL as it may be shown or logged: its password replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):  # ValueError: a port that is not a number
        return "(unparseable URL)"
