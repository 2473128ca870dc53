"""The one handle to the database that code above the store holds (it never sees an engine)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine

from ckptd.store.db import checkpoint_wal, make_engine, session_scope

# The last field of a daemon's holder name: its claims are fenced by its run leases, so the
# run's lease holder may take them over (``store.claims``); the CLI's and workers' never are.
DAEMON_TAG = "daemon"


def process_name(*, daemon: bool = False) -> str:
    """Who holds a claim: host, pid and a per-process nonce (a pid is reused after a reboot),
    then ``:daemon`` for a daemon."""
    name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return f"{name}:{DAEMON_TAG}" if daemon else name


@dataclass
class Store:
    """An open database. ``holder`` names this process in the claims it takes."""

    engine: Engine
    holder: str = field(default_factory=process_name)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        readonly: bool = False,
        wal_autocheckpoint: bool = True,
        recreate: bool = True,
        daemon: bool = False,
    ) -> Store:
        """``daemon``: this is a daemon's handle, whose claims name it as one."""
        engine = make_engine(
            url, readonly=readonly, wal_autocheckpoint=wal_autocheckpoint, recreate=recreate
        )
        return cls(engine, process_name(daemon=daemon))

    @contextmanager
    def session(self) -> Iterator[Connection]:
        """One transaction (commit on success). For the store's own modules only."""
        with session_scope(self.engine) as conn:
            yield conn

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def checkpoint_wal(self) -> tuple[int, int, int] | None:
        return checkpoint_wal(self.engine)

    def close(self) -> None:
        self.engine.dispose()


def holder_gone(holder: str) -> bool:
    """Whether a claim's holder (see :func:`process_name`) is a process on this host that has
    exited: only then is its claim dead before its expiry. A holder on another host, or whose
    pid is alive (whatever it runs now), keeps its claim until ``claimed_until``."""
    host, _, rest = holder.partition(":")
    pid_text, _, _nonce = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():  # another Store of this process, or a dead one that had our pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False
