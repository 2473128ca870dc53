"""The ``daemons`` table: each daemon on a database, by name (``[daemon] name``).

Several daemons share one database when their names differ: runs are divided between them by
leases (``leases.py``). Two live daemons of the same name would both believe they hold the same
leases, so the second is refused at start. The check and the insert are one transaction that
takes the write lock first (``BEGIN IMMEDIATE`` on SQLite, a table lock on PostgreSQL): of two
daemons of one name starting at the same moment, exactly one sees no live row and inserts its own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, insert, select, text, update

from ckptd.core.model import heartbeat_grace, iso, utcnow
from ckptd.store import tables
from ckptd.store.db import insert_id
from ckptd.store.handle import Store

_daemons = tables.daemons
DAEMON, WORKER = "daemon", "worker"  # daemons.role


class AlreadyRunning(Exception):
    """Another live daemon holds the database; the message names it."""


@dataclass(frozen=True)
class DaemonRecord:
    """A daemon's row: who it is, since when, and the status its last heartbeat wrote."""

    id: int
    name: str
    host: str
    pid: int
    version: str
    config: str
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    status: dict[str, Any] = field(default_factory=dict)
    role: str = DAEMON


def ckptd_alive(pid: int) -> bool:
    """Whether ``pid`` is a live ckptd on this host (not a reused pid, not a zombie)."""
    if pid == os.getpid():
        return False  # an earlier process that had our pid, killed before it marked itself stopped
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, under another user
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"ckptd" in fh.read()  # empty for a zombie
    except OSError:
        return True  # /proc hidden (ProtectProc=): the pid exists, assume it is the daemon


def _alive(row: Any, now: datetime, host: str) -> bool:
    if row.host == host:
        return ckptd_alive(row.pid)
    # Another host: only its heartbeat tells (a stale one means it died without marking itself).
    interval = float((row.status or {}).get("heartbeat_interval", 10))
    return bool(now - row.heartbeat_at <= heartbeat_grace(timedelta(seconds=interval)))


def _name(row: Any) -> str:
    return str(row.name or row.host)  # rows from before names: the default name, the host's


def claim(
    store: Store,
    *,
    name: str,
    version: str,
    config: str,
    status: dict[str, object],
    role: str = DAEMON,
) -> int:
    """Register this process as daemon (or worker) ``name`` and return its row id; raise
    :class:`AlreadyRunning` when a live process of that role and name uses the database. Rows
    of dead ones (kill -9, power loss) are marked stopped, so they never block a restart."""
    host, now = socket.gethostname(), utcnow()
    with store.session() as s:
        if store.dialect == "postgresql":
            s.execute(text("LOCK TABLE daemons IN SHARE ROW EXCLUSIVE MODE"))
        rows = s.execute(select(_daemons).where(_daemons.c.stopped_at.is_(None))).all()
        for row in rows:
            if row.role != role:
                continue  # a worker and a daemon may share a name (both default to the host's)
            alive = _alive(row, now, host)
            if alive and _name(row) != name:
                continue  # another daemon sharing the database
            if alive:
                raise AlreadyRunning(
                    f"another ckptd already uses this database: pid {row.pid} on {row.host}, "
                    f"running since {iso(row.started_at)} (last heartbeat "
                    f"{iso(row.heartbeat_at)}), named {name!r}; stop it first, or give this "
                    "one another database or another [daemon] name"
                )
            s.execute(
                update(_daemons).where(_daemons.c.id == row.id).values(stopped_at=row.heartbeat_at)
            )
        return insert_id(
            s,
            insert(_daemons).values(
                name=name,
                role=role,
                host=host,
                pid=os.getpid(),
                version=version,
                config=config,
                started_at=now,
                heartbeat_at=now,
                status=status,
            ),
        )


def heartbeat(store: Store, daemon_id: int | None, status: dict[str, object]) -> None:
    """Record that the daemon is alive now, with its status (what `ckptd status` shows)."""
    with store.session() as s:
        s.execute(
            update(_daemons)
            .where(_daemons.c.id == daemon_id)
            .values(heartbeat_at=utcnow(), status=status)
        )


def mark_stopped(store: Store, daemon_id: int) -> None:
    """The daemon stops: its row no longer holds the database."""
    now = utcnow()
    with store.session() as s:
        s.execute(
            update(_daemons)
            .where(_daemons.c.id == daemon_id)
            .values(stopped_at=now, heartbeat_at=now)
        )


def _record(row: Any) -> DaemonRecord:
    return DaemonRecord(
        row.id,
        _name(row),
        row.host,
        row.pid,
        row.version,
        row.config,
        row.started_at,
        row.heartbeat_at,
        row.stopped_at,
        dict(row.status or {}),
        row.role,
    )


def latest(conn: Connection) -> DaemonRecord | None:
    """The newest daemon's row (inside the caller's transaction)."""
    query = select(_daemons).where(_daemons.c.role == DAEMON)
    row = conn.execute(query.order_by(_daemons.c.id.desc()).limit(1)).first()
    return None if row is None else _record(row)


def others(
    conn: Connection, newest: DaemonRecord | None, *, seen_since: datetime | None = None
) -> list[DaemonRecord]:
    """The other daemons not marked stopped, newest first: those sharing the database with
    ``newest`` (a dead one's row stays until a daemon of its name starts again)."""
    return [
        m
        for m in members(conn, seen_since=seen_since)
        if m.role == DAEMON and (newest is None or m.id != newest.id)
    ]


def members(conn: Connection, *, seen_since: datetime | None = None) -> list[DaemonRecord]:
    """Every daemon and worker not marked stopped, newest first, in one SELECT; with
    ``seen_since``, only those whose last heartbeat is newer (one killed long ago, whose row
    nobody marked stopped, is forgotten rather than listed forever)."""
    query = select(_daemons).where(_daemons.c.stopped_at.is_(None))
    if seen_since is not None:
        query = query.where(_daemons.c.heartbeat_at > seen_since)
    return [_record(r) for r in conn.execute(query.order_by(_daemons.c.id.desc()))]


def newest(store: Store) -> DaemonRecord | None:
    """:func:`latest` in a transaction of its own (is a daemon there to hand work to?)."""
    with store.session() as s:
        return latest(s)


def running(store: Store, role: str) -> list[DaemonRecord]:
    """The rows of ``role`` not marked stopped, newest first (a dead one's too: its heartbeat
    tells the caller)."""
    query = select(_daemons).where(_daemons.c.stopped_at.is_(None), _daemons.c.role == role)
    with store.session() as s:
        return [_record(r) for r in s.execute(query.order_by(_daemons.c.id.desc()))]
