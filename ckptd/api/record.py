"""Record runs: observe a run directory, diff it against what the store holds, apply the diff.

The loop is load → observe → diff → apply. The state is loaded before observing, and the apply
is conditional on the version it was loaded at: a write by anyone in between (a prune from the
CLI, a second daemon) makes the apply write nothing, and the run is loaded and observed again.
Idempotent, so a dropped filesystem event costs latency, never a checkpoint, and a restart is
just a full scan. Nothing here is a cache of the store: the fingerprint hints that let a quick
rescan skip a run hold only while the run's version is the one they were taken at.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from ckptd.core.model import utcnow
from ckptd.core.recording import Changes, Fingerprint, Found, Observation, RunDir, RunState, diff
from ckptd.io.observe import (
    STALE_AFTER,
    ObservePool,
    Request,
    RunObservation,
    fingerprint_holds,
    observe,
    observe_many,
)
from ckptd.store import audit, recording
from ckptd.store.handle import Store
from ckptd.store.leases import Fenced, Hold

log = logging.getLogger(__name__)

ATTEMPTS = 5  # loads of a run that keeps changing under us before giving up until next scan


class Leases(Protocol):
    """The run leases of a daemon that shares its database (``daemon/leases.py``)."""

    def claim(self, run_ids: Collection[int]) -> None: ...

    def hold(self, run_id: int) -> Hold | None: ...

    def current(self, run_id: int) -> Hold | None: ...

    def lost(self, hold: Hold, what: str) -> None: ...


class Contended(RuntimeError):
    """The run changed between every load and apply: recorded at the next scan."""


@dataclass
class Outcome:
    """What one recording of one run changed (used for logs, status and tests)."""

    run: str
    recorded: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    scalars: int = 0
    new_complete_ids: list[int] = field(default_factory=list)  # to evaluate
    written_at: list[float] = field(default_factory=list)  # newest file mtime of each recorded


@dataclass(frozen=True)
class _Hint:
    """What a quick rescan may trust: ``fingerprint`` held when the run was at ``version``."""

    run_id: int
    version: int
    fingerprint: Fingerprint


class Recorder:
    """Records runs into ``store``; ``record`` calls are serialised (one writer path here)."""

    def __init__(
        self, store: Store, *, stale_after: float = STALE_AFTER, leases: Leases | None = None
    ) -> None:
        self.store = store
        self.stale_after = stale_after
        self.leases = leases  # None: the only writer (the CLI), no lease to hold
        self._lock = threading.Lock()
        self._prepared: dict[str, RunState] = {}  # loaded by prepare(), each used once
        self._hints: dict[str, _Hint] = {}
        self._reported: dict[int, frozenset[str]] = {}  # non-UTF-8 names reported, per run
        self._unreadable: set[str] = set()  # run directories reported unreadable
        # Why checkpoint-like files of a run are not recorded: each reason reported once per run.
        self._unread: dict[int, frozenset[str]] = {}
        self._retrying: set[str] = set()  # event files reported unreadable

    def prepare(self, runs: Sequence[RunDir]) -> int:
        """Load (or create) the states of the runs a scan is about to record, in one
        transaction (a few queries whatever their number); returns how many runs were new.
        Each state is used once, by the next ``record`` of its run (its apply is conditional
        on the version, as always)."""
        with self._lock:
            states = recording.load_states(self.store, runs) if runs else {}
            self._prepared = states
        if self.leases is not None and states:
            self.leases.claim([s.run_id for s in states.values()])  # one batch per scan
        return sum(not s.scanned and s.empty for s in states.values())

    def unchanged(self, runs: Sequence[RunDir]) -> list[bool]:
        """Whether a quick rescan may skip each run: its fingerprint still holds and nobody
        wrote the run since (one SELECT of every run's version, a few stats per run)."""
        versions = recording.run_versions(self.store)
        out = []
        for run in runs:
            hint = self._hints.get(run.key)
            out.append(
                hint is not None
                and versions.get(hint.run_id) == hint.version
                and fingerprint_holds(run.path, hint.fingerprint)
            )
        return out

    def observe_all(
        self, runs: Sequence[RunDir], workers: int = 1, *, prefetched: ObservePool | None = None
    ) -> Iterator[Observation | None]:
        """Observations of ``runs`` in order, ``workers`` processes at a time (backfill), made
        against their prepared states. ``prefetched``: first looks begun before the database was
        read (``daemon/prefetch.py``), used if they are of exactly these runs, all empty here."""
        with self._lock:
            states = [self._prepared.get(r.key) for r in runs]
            requests = [
                Request.for_state(r, s, self.stale_after)
                if s is not None
                else Request.first_look(
                    r.path, r.keras_template, self.stale_after, r.root, r.step_variable
                )
                for r, s in zip(runs, states, strict=True)
            ]
        if prefetched is not None:
            if [_looked_at(r) for r in prefetched.requests] == [
                _looked_at(r) for r in requests
            ] and all(s is None or s.empty for s in states):
                return observe_many(prefetched.requests, workers, pool=prefetched)
            prefetched.close()
        return observe_many(requests, workers)

    def record(
        self,
        run: RunDir,
        observation: Observation | None = None,
        *,
        observer: Callable[[Request], Observation] = observe,
    ) -> Outcome:
        """Bring the store in line with ``run``'s directory. ``observation``: one made earlier
        (``observe_all``), used only if the run is still at the version it was made against.
        ``observer``: how the run is looked at (an object store's listing; default: the local
        directory), called only while this daemon may record the run."""
        with self._lock:
            state = self._prepared.pop(run.key, None)
            for _ in range(ATTEMPTS):
                if state is None:
                    state = recording.load_state(self.store, run)
                hold = None
                if self.leases is not None:
                    hold = self.leases.hold(state.run_id)
                    if hold is None:
                        return Outcome(run.name)  # another daemon holds the run: stand by
                state = replace(state, unsupported=self._reported.get(state.run_id, frozenset()))
                if observation is None or not _current(observation, state):
                    observation = observer(Request.for_state(run, state, self.stale_after))
                changes = diff(observation, state)
                try:
                    new_ids = (
                        {} if changes.empty else recording.apply(self.store, state, changes, hold)
                    )
                except Fenced:
                    assert self.leases is not None and hold is not None
                    self.leases.lost(hold, "recording")
                    return Outcome(run.name)
                if new_ids is not None:
                    version = state.version + (not changes.empty)
                    self._settled(run, state, observation, changes, version)
                    return _outcome(run, state, changes, new_ids)
                state = observation = None  # someone wrote the run meanwhile: look again
        raise Contended(f"{run.key}: the run kept changing while being recorded; retried later")

    def _settled(
        self,
        run: RunDir,
        state: RunState,
        obs: Observation,
        changes: Changes,
        version: int,
    ) -> None:
        """After a successful apply (or nothing to apply): hints and one-time reports."""
        path = run.key
        if obs.unreadable is not None:
            if path not in self._unreadable:
                self._unreadable.add(path)
                log.warning(
                    "%s; its checkpoints stay as recorded and it is retried at every scan "
                    "(give the ckptd user read access to it)",
                    obs.unreadable,
                )
            self._hints.pop(path, None)  # nothing seen: never skipped by a quick rescan
            return
        if path in self._unreadable:
            self._unreadable.discard(path)
            log.info("%s: readable again", run.key)
        if changes.reported:
            self._reported[state.run_id] = state.unsupported | set(changes.reported)
            for name in changes.reported:
                log.warning("%s/%s: file name is not valid UTF-8; ignored", run.key, name)
        for key, read in changes.event_reads:
            if read.skipped:
                log.warning(
                    "event file %s: skipped %d value(s) that are not valid scalars (first: %s)",
                    key,
                    read.skipped,
                    read.skip_reason,
                )
            if read.retry and key not in self._retrying:
                log.warning("event file %s: %s; retrying at the next scan", key, read.retry)
            if read.retry:
                self._retrying.add(key)
            else:
                self._retrying.discard(key)
            if read.error:
                log.warning("event file %s: %s; skipping the rest of it", key, read.error)
        if isinstance(obs, RunObservation) and obs.unread:
            self._report_unread(run, state.run_id, obs.unread)
        if obs.fingerprint is None:
            self._hints.pop(path, None)
        else:
            self._hints[path] = _Hint(state.run_id, version, obs.fingerprint)

    def _report_unread(self, run: RunDir, run_id: int, unread: tuple[tuple[str, str], ...]) -> None:
        """One ``unrecognized_files`` audit entry (``status`` shows it) when a run holds
        checkpoint-like files ckptd does not record, for a reason not reported before."""
        reasons = frozenset(why for _, why in unread)
        if reasons <= self._unread.get(run_id, frozenset()):
            return
        self._unread[run_id] = self._unread.get(run_id, frozenset()) | reasons
        first, why = unread[0]
        more = f" (and {len(unread) - 1} more: ckptd events --json)" if len(unread) > 1 else ""
        reason = f"{first}: {why}{more}"
        log.warning("%s: not recorded: %s", run.key, reason)
        detail = {"files": [{"file": f, "why": w} for f, w in unread[:UNREAD_LISTED]]}
        entry = audit.Entry(utcnow(), UNRECOGNIZED, run_id, None, run.key, reason, detail)
        audit.write(self.store, [entry])


UNRECOGNIZED = "unrecognized_files"  # the audit kind `status` shows as a problem
UNREAD_LISTED = 100  # files listed in one entry's detail


def _current(obs: Observation, state: RunState) -> bool:
    """Whether ``obs`` may be diffed against ``state``: made against this very version (nothing
    was written since), or a first look at a run that still holds nothing."""
    return obs.basis == state.version if obs.basis is not None else state.empty


def _looked_at(r: Request) -> tuple[object, ...]:
    """What makes two first looks at a run the same observation."""
    return (r.run_dir, r.keras_template, r.stale_after, r.root, r.step_variable)


def _label(run: RunDir, f: Found) -> str:
    return f"{run.name}@{f.step}" if f.step is not None else f.prefix


def _outcome(run: RunDir, state: RunState, changes: Changes, new_ids: dict[str, int]) -> Outcome:
    recorded = changes.recorded
    return Outcome(
        run.name,
        recorded=[_label(run, f) for f in recorded],
        corrupt=[_label(run, f) for f in changes.corrupt],
        gone=[f"{run.name}@{g.step}" if g.step is not None else g.prefix for g in changes.gone],
        scalars=len(changes.scalars),
        new_complete_ids=[
            new_ids[f.prefix] if f.prefix in new_ids else state.checkpoints[f.prefix].id
            for f in recorded
        ],
        written_at=[f.mtime for f in recorded],
    )
