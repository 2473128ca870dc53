"""The daemon's run leases: which runs it may act on now, renewed by a thread of their own.

Held leases live in memory (``run id → epoch``); the ``ckptd-leases`` thread renews them all
every TTL/3 with one statement. If no renewal succeeded for TTL minus a margin by this process's
monotonic clock (it was paused, or the database is unreachable), the daemon drops every run by
itself — before the database would let another daemon take them over — and claims them again
at its next look. The database's check at every write (``store.leases.fence``) is the guarantee;
this is what keeps a paused daemon from even trying.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from ckptd.core.model import utcnow
from ckptd.store import audit, leases
from ckptd.store.db import DatabaseUnreachable
from ckptd.store.handle import Store
from ckptd.store.leases import Hold

log = logging.getLogger(__name__)

MARGIN = 1 / 6  # of the TTL: a renewal older than TTL × (1 − MARGIN) no longer counts


class LeaseKeeper:
    """The leases of daemon ``owner`` on ``store``, with a TTL of ``ttl`` seconds."""

    def __init__(self, store: Store, owner: str, ttl: float) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self._held: dict[int, int] = {}
        self._tried: dict[int, float] = {}  # run id -> when a claim of it last failed
        self._renewed = time.monotonic()  # when the last successful renewal/claim began
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Called with the runs just taken (not at start: ``adopt``), before this daemon acts on
        # them: it finishes what their previous holder left (its interrupted prunes, exports).
        self.on_taken: Callable[[set[int]], None] | None = None
        # Runs taken whose ``on_taken`` has not finished: held (``current``, for the recovery
        # itself), but not to act on yet (``holds``, ``held``: the scheduled prune and export
        # would race the recovery of the same run, and this process's claims are its own).
        self._recovering: set[int] = set()

    # ------------------------------------------------------------ what the daemon asks

    def _fresh(self) -> bool:
        """Whether the leases may still be trusted; drops them all (and says so) if not."""
        age = time.monotonic() - self._renewed
        if age <= self.ttl * (1 - MARGIN):
            return True
        if self._held:
            log.warning(
                "leases not renewed for %.1f s (TTL %g s): no longer acting on %d run(s) until "
                "they are claimed again",
                age,
                self.ttl,
                len(self._held),
            )
            self._held.clear()
        return False

    def hold(self, run_id: int) -> Hold | None:
        """The lease to write ``run_id`` under, claiming it if free; None: another daemon
        holds it (this one stands by)."""
        with self._lock:
            if self._fresh() and run_id in self._held:
                return Hold(run_id, self.owner, self._held[run_id])
            if time.monotonic() - self._tried.get(run_id, -self.ttl) < self.ttl / 3:
                return None  # claimed in vain just now (this scan's batch): standing by
        self.claim([run_id])
        with self._lock:
            epoch = self._held.get(run_id)
        return None if epoch is None else Hold(run_id, self.owner, epoch)

    def current(self, run_id: int) -> Hold | None:
        """The lease this daemon holds on ``run_id`` now, without claiming it."""
        with self._lock:
            if self._fresh() and run_id in self._held:
                return Hold(run_id, self.owner, self._held[run_id])
        return None

    def holds(self, run_id: int) -> bool:
        """Whether this daemon may act on ``run_id`` now (prune, export, evaluate)."""
        with self._lock:
            return self._fresh() and run_id in self._held and run_id not in self._recovering

    def claim(self, run_ids: Collection[int]) -> None:
        """Claim the leases of ``run_ids`` not held yet (free or expired ones; batched)."""
        with self._lock:
            self._fresh()
            wanted = [r for r in run_ids if r not in self._held]
        if not wanted:
            return
        began = time.monotonic()
        got = leases.claim(self.store, self.owner, wanted, self.ttl)
        with self._lock:
            if not self._held:
                self._renewed = began  # nothing else held: these are as fresh as this claim
            new = {r: e for r, e in got.items() if self._held.get(r) != e}
            self._held.update(got)
            self._recovering |= set(new) if self.on_taken is not None else set()
            for r in wanted:
                if r in got:
                    self._tried.pop(r, None)
                else:
                    self._tried[r] = began
        if new:
            log.info("holding the leases of %d run(s) more (%d in all)", len(new), len(self._held))
            try:
                if self.on_taken is not None:
                    self.on_taken(set(new))
            except Exception:  # recording goes on; the next start (or takeover) tries again
                log.exception("finishing what the runs' previous holder left failed")
            finally:
                with self._lock:
                    self._recovering -= set(new)

    def lost(self, hold: Hold, what: str) -> None:
        """A write under ``hold`` was fenced: its lease lapsed (another daemon, or this one
        after a pause or an outage, holds the run under a newer epoch now)."""
        run_id, epoch = hold.run_id, hold.epoch
        with self._lock:
            if self._held.get(run_id) == epoch:
                del self._held[run_id]
        log.warning(
            "fenced: %s of run %d refused, its lease (epoch %s) lapsed; the run's current "
            "holder records it",
            what,
            run_id,
            epoch,
        )
        audit.write(
            self.store,
            [
                audit.Entry(
                    utcnow(),
                    "fenced",
                    run_id,
                    None,
                    self.owner,
                    f"{what} refused: daemon {self.owner} no longer holds the run's lease "
                    f"(epoch {epoch})",
                )
            ],
        )

    def held(self) -> dict[int, int]:
        """The runs this daemon may act on now, with their epochs."""
        with self._lock:
            if not self._fresh():
                return {}
            return {r: e for r, e in self._held.items() if r not in self._recovering}

    # ------------------------------------------------------------ the thread

    def adopt(self) -> None:
        """At start: take over at once what a dead daemon of the same name held."""
        began = time.monotonic()
        adopted = leases.adopt(self.store, self.owner, self.ttl)
        with self._lock:
            self._held.update(adopted)
            self._renewed = began

    def start(self) -> None:
        """Renew every TTL/3 from now on, in the ``ckptd-leases`` thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="ckptd-leases", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        began = time.monotonic()
        with self._lock:
            self._fresh()  # woken from a pause past the TTL: drop (and say so) before asking
            held = dict(self._held)
        kept = leases.renew(self.store, self.owner, held, self.ttl)
        with self._lock:
            lost = set(held) - set(kept)
            for run in lost:
                if self._held.get(run) == held[run]:
                    del self._held[run]
            self._renewed = began
        if lost:
            log.warning("lost the leases of %d run(s) to another daemon", len(lost))

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except DatabaseUnreachable as exc:  # said once by the daemon; dropped past the TTL
                log.debug("renewing the run leases failed; retrying: %s", exc)
            except Exception:
                log.warning("renewing the run leases failed; retrying", exc_info=True)

    def stop(self) -> None:
        """Stop renewing and release every lease, so that another daemon takes over now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._held.clear()
        leases.release(self.store, self.owner)
