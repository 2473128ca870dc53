"""Hand ``ckptd evaluate``/``freeze`` to the running daemon, whose TensorFlow worker is warm.

A fresh worker costs seconds of ``import tensorflow`` per call. When a daemon is alive on the
database, the CLI inserts a request (``store/requests``), which the daemon polls for, claims and
does in its own worker (``daemon/requests.py``), writing progress and the outcome into the row
this side polls. Without a live daemon the CLI does the work itself, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ckptd.api.status import DaemonStatus, daemon_status
from ckptd.api.targets import Target
from ckptd.core.model import utcnow
from ckptd.store import daemons, requests
from ckptd.store.handle import Store, holder_gone
from ckptd.store.requests import CANCELLED, DONE, PENDING, Request

# How long a live daemon may take to pick a request up (it looks every REQUEST_POLL seconds,
# between two evaluations when it is busy with its backlog).
PICKUP_TIMEOUT = 60.0
POLL_SECONDS = 0.1  # this side's poll of its request row (a read-only primary-key lookup)
# The daemon's claim on a request it works on, renewed at a third of it.
REQUEST_TTL = timedelta(seconds=30)
CLOCK_SKEW = timedelta(seconds=5)  # between this host and a daemon's on another


class HandoffFailed(Exception):
    """The daemon did not (or could not) do the request; the message says what to do."""


def live_daemon(store: Store) -> DaemonStatus | None:
    """The daemon of this database if it is alive (fresh heartbeat, not stopped)."""
    record = daemons.newest(store)
    if record is None:
        return None
    status = daemon_status(record, utcnow())
    return status if status.alive else None


def submit(store: Store, kind: str, target: Target, **options: Any) -> int:
    checkpoint_id = target.checkpoint.id if target.checkpoint else None
    return requests.submit(store, kind, target.run.id, checkpoint_id, options)


def _who(daemon: DaemonStatus) -> str:
    return f"the daemon (pid {daemon.pid} on {daemon.host})"


def wait(
    poll_store: Store,
    write_store: Store,
    request_id: int,
    daemon: DaemonStatus,
    on_progress: Callable[[dict[str, Any]], None] = lambda _result: None,
    *,
    pickup_timeout: float = PICKUP_TIMEOUT,
) -> Request:
    """Poll the request until the daemon has done it; :class:`HandoffFailed` when it does not
    take it up within ``pickup_timeout``, its claim lapses (it stopped or hangs), or it says it
    cannot do it. ``on_progress`` gets the result so far while it works."""
    deadline = time.monotonic() + pickup_timeout
    while True:
        req = requests.get(poll_store, request_id)
        if req is None or req.status == CANCELLED:
            raise HandoffFailed(f"request {request_id} was withdrawn before {_who(daemon)} took it")
        if req.status == DONE:
            if req.error:
                raise HandoffFailed(f"{_who(daemon)} could not do it: {req.error}")
            return req
        if req.status == PENDING and time.monotonic() > deadline:
            if requests.cancel(write_store, request_id):
                raise HandoffFailed(
                    f"{_who(daemon)} did not take the request up within {pickup_timeout:.0f} s "
                    "(busy or stuck: see `ckptd status`); run the command again with "
                    "--no-daemon to do the work in this process"
                )
            continue  # it was taken just now
        if req.status != PENDING:
            on_progress(req.result)
            expired = req.claimed_until is not None and req.claimed_until < utcnow() - CLOCK_SKEW
            if expired or (req.claimed_by is not None and holder_gone(req.claimed_by)):
                raise HandoffFailed(
                    f"{_who(daemon)} stopped working on the request (it exited, or its claim "
                    "lapsed: it hangs; see `ckptd status`); run the command again, or with "
                    "--no-daemon to do the work in this process"
                )
        time.sleep(POLL_SECONDS)


def withdraw(store: Store, request_id: int) -> bool:
    """The user gave up waiting (Ctrl-C): withdraw the request if the daemon has not taken it;
    False when it has (it finishes the work anyway)."""
    return requests.cancel(store, request_id)
