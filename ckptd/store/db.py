"""Engines and the one transaction scope: SQLite's pragmas and BEGIN IMMEDIATE, PostgreSQL's
pooled connections, read-only CLI access on both."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ckptd.core.errors import StoreError
from ckptd.store.urls import redacted, sqlite_path

BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_S = 10
IDLE_IN_TRANSACTION_MS = 60_000
TCP_KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}
# PostgreSQL's (psycopg's) wording of a server that cannot be reached, and of a missing table.
_CONNECT_FAILED = re.compile(
    r"connection .*failed|could not connect|connection is bad|connection timeout expired"
    r"|the database system is (starting up|shutting down|in recovery mode)"
)


class DatabaseUnreachable(StoreError):
    """The database server does not answer (stopped, restarting, network down): a condition
    that passes; what failed can be done again once it answers."""


_NO_RELATION = re.compile(r'relation "[^"]*" does not exist')


def make_engine(
    url: str, *, readonly: bool = False, wal_autocheckpoint: bool = True, recreate: bool = True
) -> Engine:
    """An engine with SQLite set up for one writer and many readers (WAL, busy timeout, FKs).

    Writers start transactions with ``BEGIN IMMEDIATE`` so a lock conflict waits at BEGIN (under
    the busy timeout) instead of failing half-way through a transaction.
    ``wal_autocheckpoint=False``: commits never checkpoint the WAL (SQLite's default makes the
    commit that crosses 1,000 pages copy them into the database and fsync it, a stall that
    grows when a trainer is writing to the same disk); the owner then calls :func:`checkpoint_wal`
    from a thread of its own (the daemon: every second, and every 0.1 s during its backfill).
    ``recreate=False``: a missing file is created now, once; a connection opened after it was
    deleted then fails instead of silently creating an empty database at the path (the daemon
    notices the deletion and exits, so that its restart records everything again).
    """
    try:
        return _make_engine(
            url, readonly=readonly, wal_autocheckpoint=wal_autocheckpoint, recreate=recreate
        )
    except (SQLAlchemyError, ImportError) as exc:  # a bad URL, an unknown dialect or driver
        raise StoreError(f"cannot use database {redacted(url)}: {exc}") from None
    except OSError as exc:  # the directory of the SQLite file cannot be created
        raise StoreError(
            f"cannot create the database directory for {redacted(url)}: {exc.strerror or exc}"
        ) from None


def _make_engine(url: str, *, readonly: bool, wal_autocheckpoint: bool, recreate: bool) -> Engine:
    path = sqlite_path(url)
    if path is None:
        return _server_engine(url, readonly=readonly)
    if readonly:
        if not path.exists():
            raise StoreError(
                f"no database at {path}: start the daemon (ckptd run) or run `ckptd db upgrade`"
            )
        engine = create_engine(
            f"sqlite:///file:{path}?mode=ro&uri=true",
            future=True,
            connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not recreate:
            with open(path, "ab"):
                pass  # an empty file is an empty SQLite database
        engine = create_engine(
            url if recreate else f"sqlite:///file:{path}?mode=rw&uri=true",
            future=True,
            connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            if not wal_autocheckpoint:
                cur.execute("PRAGMA wal_autocheckpoint = 0")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def _server_engine(url: str, *, readonly: bool) -> Engine:
    """A database server (PostgreSQL): each transaction is a plain BEGIN (READ COMMITTED; the
    store's writes are conditional, so they stay right under it). Pooled connections are
    checked before use, so a restarted server costs a reconnect, not an error; a server that
    does not answer fails the connect after ``CONNECT_TIMEOUT_S`` instead of hanging."""
    from sqlalchemy.engine import make_url

    connect_args: dict[str, Any] = {}
    if make_url(url).get_backend_name() == "postgresql":
        # Over TCP, a server that vanished (host down, partition) fails a statement within
        # seconds instead of when the kernel gives up on the connection (hours): libpq's
        # keepalives and user timeout; unused on a Unix socket. A URL's own settings win.
        # A process paused inside a transaction (SIGSTOP, a frozen VM) would hold its row
        # locks (a lease row's, see store/leases.fence) until it resumes: the server ends it.
        idle = f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"
        defaults = {"connect_timeout": CONNECT_TIMEOUT_S, "options": idle, **TCP_KEEPALIVE}
        connect_args.update({k: v for k, v in defaults.items() if k not in url})
    engine = create_engine(url, future=True, pool_pre_ping=True, connect_args=connect_args)
    if readonly and engine.dialect.name == "postgresql":  # the CLI's reads: never a write
        engine = engine.execution_options(postgresql_readonly=True)
    return engine


def checkpoint_wal(engine: Engine) -> tuple[int, int, int] | None:
    """Copy committed WAL pages into the database without blocking readers or writers
    (``PRAGMA wal_checkpoint(PASSIVE)``): (busy, WAL pages, pages checkpointed); None when the
    database is not SQLite. Runs outside any transaction, on a connection of its own."""
    if engine.dialect.name != "sqlite":
        return None
    try:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            busy, log_pages, done = cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            cur.close()
            return int(busy), int(log_pages), int(done)
        finally:
            raw.close()
    except (SQLAlchemyError, sqlite3.Error) as exc:  # the driver's own, on a raw connection
        raise store_error(exc) from exc


def insert_id(conn: Connection, stmt: Any) -> int:
    """Execute an INSERT of one row and return its new ``id``."""
    return int(conn.execute(stmt.returning(stmt.table.c.id)).scalar_one())


def rowcount(conn: Connection, stmt: Any) -> int:
    """Execute an UPDATE/DELETE and return how many rows it touched."""
    return int(conn.execute(stmt).rowcount)


def store_error(exc: SQLAlchemyError | sqlite3.Error) -> StoreError:
    """A driver error as one line a user can act on (the CLI prints it, exit status 1)."""
    msg = (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]
    operational = isinstance(exc, OperationalError | sqlite3.OperationalError)
    if operational and ("locked" in msg or "busy" in msg):
        return StoreError(
            f"database is locked by another process ({msg}); retry, or check "
            "for a long-running reader"
        )
    if operational and _CONNECT_FAILED.search(msg):
        return DatabaseUnreachable(
            f"cannot connect to the database ({msg}): check the URL, and that the server is "
            "running and lets this user in"
        )
    if getattr(exc, "connection_invalidated", False):  # the server went away mid-statement
        return DatabaseUnreachable(
            f"lost the connection to the database ({msg}): check that the server is running "
            "and reachable from this host"
        )
    if "no such table" in msg or _NO_RELATION.search(msg):  # SQLite, PostgreSQL
        return StoreError(f"database schema is missing ({msg}): run `ckptd db upgrade`")
    if "not a database" in msg or "malformed" in msg:
        return StoreError(
            f"database error: {msg}: the database file is damaged; restore it from a backup, or "
            "move it aside and run `ckptd db upgrade` (pins and history stay in the old file)"
        )
    return StoreError(f"database error: {msg}")


@contextmanager
def session_scope(engine: Engine) -> Iterator[Connection]:
    """One transaction on a connection of its own: commit on success, roll back on error;
    driver errors become :class:`StoreError`. The transaction begins at the first statement
    (BEGIN IMMEDIATE on SQLite, see ``_on_begin``): a scope that executes nothing takes no lock."""
    try:
        with engine.connect() as conn:
            try:
                yield conn
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
    except SQLAlchemyError as exc:
        raise store_error(exc) from exc
