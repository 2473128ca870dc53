"""Hand ``ckptd evaluate``/``freeze`` to a running daemon or ``ckptd worker``, whose TensorFlow
worker is warm.

A fresh worker costs seconds of ``import tensorflow`` per call. When a daemon that evaluates
itself, or a worker serving the run's watch and the kind of work, is alive on the database, the
CLI inserts a request (``store/requests``), which they poll for, claim and do in their own worker
(``daemon/requests.py``), writing progress and the outcome into the row this side polls. Without
one the CLI does the work itself, as before. A daemon with ``evaluate_on = "workers"`` queues its
scheduled exports here too (:func:`queue_export`): one queue for every process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ckptd.api.status import DaemonStatus, daemon_status
from ckptd.api.targets import Target
from ckptd.core.model import Run, utcnow
from ckptd.store import daemons, requests
from ckptd.store.handle import Store, holder_gone
from ckptd.store.requests import CANCELLED, DONE, FREEZE, PENDING, Request

# How long a live daemon may take to pick a request up (it looks every REQUEST_POLL seconds,
# between two evaluations when it is busy with its backlog).
PICKUP_TIMEOUT = 60.0
POLL_SECONDS = 0.1  # this side's poll of its request row (a read-only primary-key lookup)
# The daemon's claim on a request it works on, renewed at a third of it.
REQUEST_TTL = timedelta(seconds=30)
CLOCK_SKEW = timedelta(seconds=5)  # between this host and a daemon's on another


class HandoffFailed(Exception):
    """The daemon did not (or could not) do the request; the message says what to do."""


LOCAL, WORKERS = "local", "workers"  # [daemon] evaluate_on, in the daemon's status too
# What a worker's status says it serves (``[worker] kinds``), by request kind.
WORK_KIND = {requests.EVALUATE: "evaluate", FREEZE: "export"}


@dataclass(frozen=True)
class Server:
    """A live process that takes requests: a daemon, or a ``ckptd worker`` (named)."""

    role: str
    name: str
    pid: int
    host: str


def live_daemon(store: Store) -> DaemonStatus | None:
    """The daemon of this database if it is alive (fresh heartbeat, not stopped)."""
    record = daemons.newest(store)
    if record is None:
        return None
    status = daemon_status(record, utcnow())
    return status if status.alive else None


def live_server(store: Store, kind: str, target: Target) -> Server | None:
    """Who would do a ``kind`` request for ``target`` now: the daemon when it is alive and
    evaluates itself, else a live worker whose status says it serves the target's watch and
    that kind of work; None when no one would (the CLI then does the work itself)."""
    daemon = daemons.newest(store)
    now = utcnow()
    evaluates = daemon is not None and daemon.status.get("evaluate_on", LOCAL) == LOCAL
    if daemon is not None and evaluates and daemon_status(daemon, now).alive:
        return Server(daemons.DAEMON, daemon.name, daemon.pid, daemon.host)
    for worker in daemons.running(store, daemons.WORKER):
        serves = worker.status.get("serves") or {}
        if (
            str(target.watch.path) in serves.get("watches", ())
            and WORK_KIND.get(kind) in serves.get("kinds", ())
            and daemon_status(worker, now).alive
        ):
            return Server(daemons.WORKER, worker.name, worker.pid, worker.host)
    return None


def who(server: Server | DaemonStatus) -> str:
    if isinstance(server, Server) and server.role == daemons.WORKER:
        return f"the worker {server.name!r} (pid {server.pid} on {server.host})"
    return f"the daemon (pid {server.pid} on {server.host})"


def queue_export(store: Store, run: Run) -> bool:
    """A scheduled export of ``run``'s best, left to the workers; False when one is queued or
    being done already. The worker honours a failed export's retry backoff, as a daemon's
    own scheduled export does."""
    return requests.submit_unless_open(store, FREEZE, run.id, {"scheduled": True}) is not None


def submit(store: Store, kind: str, target: Target, **options: Any) -> int:
    checkpoint_id = target.checkpoint.id if target.checkpoint else None
    return requests.submit(store, kind, target.run.id, checkpoint_id, options)


def wait(
    poll_store: Store,
    write_store: Store,
    request_id: int,
    daemon: Server | DaemonStatus,
    on_progress: Callable[[dict[str, Any]], None] = lambda _result: None,
    *,
    pickup_timeout: float = PICKUP_TIMEOUT,
) -> Request:
    """Poll the request until a daemon or worker has done it; :class:`HandoffFailed` when no
    one takes it up within ``pickup_timeout``, its holder's claim lapses (it stopped or hangs)
    and no other process has taken it over, or it says it cannot do it. ``on_progress`` gets the
    result so far while it works."""
    deadline = time.monotonic() + pickup_timeout
    while True:
        req = requests.get(poll_store, request_id)
        if req is None or req.status == CANCELLED:
            raise HandoffFailed(f"request {request_id} was withdrawn before {who(daemon)} took it")
        if req.status == DONE:
            if req.error:
                raise HandoffFailed(f"{who(daemon)} could not do it: {req.error}")
            return req
        if req.status == PENDING and time.monotonic() > deadline:
            if requests.cancel(write_store, request_id):
                raise HandoffFailed(
                    f"{who(daemon)} did not take the request up within {pickup_timeout:.0f} s "
                    "(busy or stuck: see `ckptd status`); run the command again with "
                    "--no-daemon to do the work in this process"
                )
            continue  # it was taken just now
        if req.status != PENDING:
            on_progress(req.result)
            expired = req.claimed_until is not None and req.claimed_until < utcnow() - CLOCK_SKEW
            holder = req.claimed_by
            if (expired or (holder is not None and holder_gone(holder))) and (
                holder is None or requests.abandon(write_store, request_id, holder)
            ):
                raise HandoffFailed(
                    f"{who(daemon)} stopped working on the request (it exited, or its claim "
                    "lapsed: it hangs; see `ckptd status`); run the command again, or with "
                    "--no-daemon to do the work in this process"
                )
            # (not abandoned: another daemon or worker has taken the request over)
        time.sleep(POLL_SECONDS)


def withdraw(store: Store, request_id: int) -> bool:
    """The user gave up waiting (Ctrl-C): withdraw the request if the daemon has not taken it;
    False when it has (it finishes the work anyway)."""
    return requests.cancel(store, request_id)
