"""Schema migrations with Alembic (imported lazily: it is slow to import)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    inspect,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from ckptd.core.errors import StoreError
from ckptd.store.db import store_error
from ckptd.store.handle import Store

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig


# The newest migration in migrations/versions. A test checks it equals Alembic's head, so the
# daemon can tell "schema is current" with one SELECT instead of importing Alembic (slow).
SCHEMA_HEAD = "0010"

_version_table = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


P = ParamSpec("P")
R = TypeVar("R")


def _user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Database and Alembic errors as :class:`StoreError`: one line, not a traceback (`ckptd db
    upgrade` is the unit's ExecStartPre, and its output is what the journal shows)."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with _mapped():
            return func(*args, **kwargs)

    return wrapper


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise store_error(exc) from exc
    except Exception as exc:
        from alembic.util import CommandError  # imported by then if it can be the cause

        if isinstance(exc, CommandError):  # e.g. a revision this ckptd does not know
            raise StoreError(
                f"database schema: {exc}; is the database from a newer ckptd?"
            ) from exc
        raise


def script_location() -> Path:
    """Where the migration scripts are: inside the installed wheel, or the source checkout."""
    import ckptd.migrations

    return Path(ckptd.migrations.__file__).parent


def _alembic_config() -> AlembicConfig:
    """Migrations always run on a connection we pass in, so no URL goes into the config."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(script_location()))
    return cfg


@_user_errors
def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


@_user_errors
def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@_user_errors
def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to ``revision``; returns (before, after)."""
    from alembic import command

    before = current_revision(engine)
    cfg = _alembic_config()
    with migrating(engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before, current_revision(engine)


# Held (for its transaction) by whoever creates or migrates the schema on PostgreSQL, so that
# daemons starting together on an empty database create it once; SQLite's BEGIN IMMEDIATE
# serialises them already.
_SCHEMA_LOCK = 0x636B707464  # "ckptd"


def _lock_schema(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")


@contextmanager
def migrating(engine: Engine) -> Iterator[Connection]:
    """A transaction to migrate in. On SQLite with foreign keys off: a batch migration copies a
    table and drops the old one, and with them on, the DROP would cascade to every row that
    references it (metrics, evaluations, pins …). They are checked before the commit instead,
    and turned back on (the pragma only takes effect outside a transaction). On PostgreSQL,
    whose ALTERs keep the rows in place, only the schema lock is taken."""
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection if engine.dialect.name == "sqlite" else None
        if raw is not None:
            raw.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                _lock_schema(conn)
                yield conn
                if raw is not None and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise StoreError("a migration left rows referencing missing ones; not applied")
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys = ON")


@_user_errors
def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision(engine)


@_user_errors
def ensure_schema(engine: Engine) -> tuple[str | None, str | None]:
    """Bring the schema to head at start-up, cheaply; returns (before, after).

    Current schema: one SELECT. Empty database: ``create_all`` from the tables and stamp head, the
    Alembic cookbook's way to create a fresh database (a test checks the result is the schema the
    migrations build). Anything else (an older revision, a foreign database): Alembic's upgrade.
    """
    from ckptd.store.tables import metadata

    with engine.begin() as conn:  # BEGIN IMMEDIATE: one process creates, the others wait
        _lock_schema(conn)
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" in tables:
            current = conn.execute(select(_version_table.c.version_num)).scalar()
            if current == SCHEMA_HEAD:
                return current, current
        elif not tables:
            metadata.create_all(conn)
            _version_table.create(conn)
            conn.execute(_version_table.insert().values(version_num=SCHEMA_HEAD))
            return None, SCHEMA_HEAD
    return upgrade(engine)


def schema_revisions(store: Store) -> tuple[str | None, str | None]:
    """The database's schema revision and the newest this ckptd knows: (current, head)."""
    return current_revision(store.engine), head_revision(store.engine)


def upgrade_schema(store: Store) -> tuple[str | None, str | None]:
    """Create or upgrade the schema to head; returns (before, after)."""
    return upgrade(store.engine)


def ensure_store_schema(store: Store) -> tuple[str | None, str | None]:
    """The daemon's start: :func:`ensure_schema` on the store's database."""
    return ensure_schema(store.engine)
