"""Progress markers: health means the reconcile loop and the scheduled jobs finish what they start.

Each thread that does work says what it is busy with (``with progress.busy("reconcile of X")``),
stamped with the monotonic clock. An item busy for longer than its bound is *stuck*: the daemon
then stops pinging the systemd watchdog (systemd restarts it) and reports what is stuck.
Nested items (a rescan job, then each run it reconciles) replace the outer one while they run;
when one ends, the outer item's clock restarts, as finishing an item is progress.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from ckptd.core.model import iso, utcnow
from ckptd.daemon.notify import watchdog_timeout

log = logging.getLogger("ckptd.daemon.main")  # the name the journal has always shown

# At start-up under systemd (NOTIFY_SOCKET set): one minute less than the unit's
# TimeoutStartSec=10min, so ckptd exits 1 with its own message before systemd kills it.
DEFAULT_START_TIMEOUT = 9 * 60.0


@dataclass
class Busy:
    what: str
    since: float  # time.monotonic()
    bound: float  # seconds


@dataclass(frozen=True)
class Stuck:
    what: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.what} (busy for {self.seconds:.0f} s)"


def stall_bound(heartbeat_interval: timedelta) -> float:
    """How long one item may keep a thread busy before it counts as stuck: the systemd watchdog
    timeout (``WatchdogSec``) when there is one, and never less than three heartbeats."""
    return max(watchdog_timeout() or 0.0, 3 * heartbeat_interval.total_seconds())


def start_timeout() -> float | None:
    """Seconds the start-up (migration, claim, backfill) may take: ``$CKPTD_START_TIMEOUT``,
    else DEFAULT_START_TIMEOUT under systemd, else none (a long backfill in a terminal is fine)."""
    value = os.environ.get("CKPTD_START_TIMEOUT")
    if value:
        try:
            return max(float(value), 0.1)
        except ValueError:
            pass
    return DEFAULT_START_TIMEOUT if os.environ.get("NOTIFY_SOCKET") else None


class Progress:
    """What each working thread is busy with, and since when."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self._stacks: dict[int, list[Busy]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def busy(self, what: str, *, extra: float = 0.0) -> Iterator[None]:
        """Mark this thread busy with ``what`` for up to the bound plus ``extra`` seconds (an
        item with a timeout of its own, such as a worker call, adds that timeout)."""
        ident = threading.get_ident()
        item = Busy(what, time.monotonic(), self.bound + extra)
        with self._lock:
            self._stacks.setdefault(ident, []).append(item)
        try:
            yield
        finally:
            with self._lock:
                stack = self._stacks[ident]
                stack.pop()
                if stack:
                    stack[-1].since = time.monotonic()
                else:
                    del self._stacks[ident]

    def tick(self) -> None:
        """Progress inside this thread's current item (one of its parts is done)."""
        with self._lock:
            stack = self._stacks.get(threading.get_ident())
            if stack:
                stack[-1].since = time.monotonic()

    def stuck(self) -> list[Stuck]:
        now = time.monotonic()
        with self._lock:
            current = [stack[-1] for stack in self._stacks.values() if stack]
        return sorted(
            (Stuck(b.what, now - b.since) for b in current if now - b.since > b.bound),
            key=lambda s: s.what,
        )

    def busy_with(self) -> list[str]:
        """What every thread is busy with now (for the log line of a forced exit)."""
        with self._lock:
            return sorted(stack[-1].what for stack in self._stacks.values() if stack)


class DatabaseHealth:
    """Whether the database answers this daemon: down from the first statement that could not
    reach it, up again at the first that did. Each change is logged once; while it is down
    the daemon is unhealthy, skips pruning and exporting, and keeps running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None  # time.monotonic()
        self.since = ""  # ISO time the outage began
        self.error = ""

    @property
    def up(self) -> bool:
        return self._down_since is None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.error = str(exc)
            if self._down_since is not None:
                return
            self._down_since, self.since = time.monotonic(), iso(utcnow()) or ""
        log.error(
            "database unreachable: %s; not pruning or exporting, recording and heartbeats "
            "wait, until it answers again",
            exc,
        )

    def answered(self) -> float | None:
        """A statement succeeded: how long the outage that this ends lasted, else None."""
        with self._lock:
            if self._down_since is None:
                return None
            seconds, self._down_since = time.monotonic() - self._down_since, None
        log.warning("database reachable again after %.0f s; catching up", seconds)
        return seconds

    def status_text(self) -> str:
        """What the sd_notify STATUS line says while it is down ("" while up)."""
        if self.up:
            return ""
        return (
            f"unhealthy, database unreachable since {self.since} ({self.error}); not pruning "
            "or exporting, checkpoints are recorded when it answers: check that the database "
            "server runs and that this host reaches it"
        )
