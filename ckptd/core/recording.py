"""Recording as a pure diff: what a run directory shows, what the store holds, what to write.

``io/observe`` builds an :class:`Observation` of one run directory; ``store/recording`` loads the
run's :class:`RunState` and applies :class:`Changes` in one transaction, conditional on the run's
``version``. :func:`diff` decides, with no I/O: applying ``diff(obs, state)`` makes the state what
the observation shows, and diffing the same observation again yields nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.core.model import COMPLETE, CORRUPT, GONE, PRUNING

INCOMPLETE = "incomplete"  # a save in progress: seen in a scan, never stored
BULK_AUDIT = 20  # more new checkpoints than this in one scan get one audit entry, not one each
_INT64 = 1 << 63  # the database's INTEGER is 64-bit

ScalarValue = tuple[str, int, float, float]  # (name, step, value, wall time)


@dataclass(frozen=True)
class RunDir:
    """A run directory to record: its name, path, the watch root it is reached from."""

    name: str
    path: Path
    root: Path
    keras_template: str | None = None
    step_variable: str | None = None  # the tensor a TF checkpoint's step is read from


@dataclass(frozen=True)
class Found:
    """One checkpoint as seen on disk at scan time."""

    prefix: str  # absolute prefix path (Keras: the file path)
    format: str  # tf1 | tf2 | keras | keras_weights
    step: int | None
    state: str  # complete | incomplete | corrupt
    reason: str | None
    files: tuple[str, ...]  # base names in the run directory
    size: int
    has_meta: bool
    mtime: float
    signature: tuple[int, ...]  # (size, mtime_ns) of the file whose change means "look again"
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Fingerprint:
    """mtimes of the run directory and its event subdirectories, sizes of its event files
    (these two by their paths relative to the run directory).

    Any file created, renamed or deleted in the run directory changes its mtime; a growing event
    file changes its size. Taken before the listing, so a change during it is never absorbed.
    """

    run_mtime_ns: int
    dirs: tuple[tuple[str, int], ...]
    event_sizes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class EventRead:
    """What reading an event file from ``EventTail.start`` gave."""

    offset: int  # just past the last whole record
    scalars: tuple[ScalarValue, ...] = ()
    error: str | None = None  # corrupt at ``offset``: never read again
    retry: str | None = None  # could not be read now: read on from ``offset`` next scan
    skipped: int = 0  # values that were not usable scalars
    skip_reason: str | None = None


@dataclass(frozen=True)
class EventTail:
    """One event file: its size now and, when it grew, what was read from ``start``."""

    size: int
    start: int
    read: EventRead | None  # None: unchanged since the offset the store holds


@dataclass(frozen=True)
class Observation:
    """What one run directory holds now (picklable: made in worker processes at backfill)."""

    run_dir: str
    present: bool  # False: the run directory does not exist (or is no longer a real directory)
    found: tuple[Found, ...] = ()
    unsupported: tuple[str, ...] = ()  # file names that are not valid UTF-8
    events: Mapping[str, EventTail] = field(default_factory=dict)
    # The run version this was observed against (what the request knew); None: a first look.
    basis: int | None = None
    # What a quick rescan compares to skip this run while nothing changed; None when the
    # directory may still change without its mtime showing it.
    fingerprint: Fingerprint | None = None
    # Why the run directory could not be read (EACCES, EIO …): nothing was seen, so nothing is
    # concluded about its checkpoints; the next scan tries again.
    unreadable: str | None = None


@dataclass(frozen=True)
class Known:
    """A checkpoint the store holds."""

    id: int
    state: str
    step: int | None
    signature: tuple[int, ...]


@dataclass(frozen=True)
class EventFile:
    """An event file the store holds: read up to ``offset``; ``error``: corrupt, never re-read."""

    offset: int
    error: str | None = None


@dataclass(frozen=True)
class RunState:
    """What the store holds for one run, at ``version``."""

    run_id: int
    version: int
    present: bool = True
    scanned: bool = False  # False until the first scan of a newly discovered run is written
    checkpoints: Mapping[str, Known] = field(default_factory=dict)
    event_files: Mapping[str, EventFile] = field(default_factory=dict)
    # Non-UTF-8 names already reported. Not stored (the audit table has no index to ask it):
    # this process's memory, so each name is reported once per daemon start.
    unsupported: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        """Nothing recorded yet: a first look at the run is as good as any observation."""
        return not (self.checkpoints or self.event_files)


@dataclass(frozen=True)
class Update:
    """A known checkpoint seen with another state or signature: its row takes ``found``."""

    id: int
    found: Found
    completed: bool  # became complete: completed now, no longer gone
    corrupted: bool  # became corrupt


@dataclass(frozen=True)
class Gone:
    id: int
    prefix: str
    step: int | None


@dataclass(frozen=True)
class EventFileWrite:
    path: str
    offset: int
    error: str | None
    new: bool  # not in the store yet


@dataclass(frozen=True)
class Metric:
    """A metric value of a checkpoint, by prefix (a new checkpoint has no id before insert)."""

    prefix: str
    name: str
    value: float
    step: int | None
    source: str  # tfevents | filename


@dataclass(frozen=True)
class Audit:
    """An audit entry; ``prefix`` names its checkpoint, if it concerns one."""

    kind: str
    subject: str | None
    reason: str | None = None
    detail: Mapping[str, object] = field(default_factory=dict)
    prefix: str | None = None


@dataclass(frozen=True)
class Changes:
    """What to write so the store holds what an observation shows.

    Besides these, the store gives each new checkpoint the event-file values logged at its step
    (those recorded earlier are in the store, not in the state).
    """

    present: bool
    new: tuple[Found, ...] = ()
    updated: tuple[Update, ...] = ()
    gone: tuple[Gone, ...] = ()
    gone_reason: str = ""
    event_files: tuple[EventFileWrite, ...] = ()
    event_reads: tuple[tuple[str, EventRead], ...] = ()  # the reads used (for their warnings)
    scalars: tuple[ScalarValue, ...] = ()
    metrics: tuple[Metric, ...] = ()  # tfevents values of known ones, file-name values of new
    audit: tuple[Audit, ...] = ()
    reported: tuple[str, ...] = ()  # non-UTF-8 names reported now
    touch: bool = False  # the run row changes (present, first scan) even if nothing else does

    @property
    def empty(self) -> bool:
        return not (
            self.touch
            or self.new
            or self.updated
            or self.gone
            or self.event_files
            or self.scalars
            or self.audit
        )

    @property
    def recorded(self) -> list[Found]:
        """Checkpoints that are complete now and were not: recorded or back again."""
        return [u.found for u in self.updated if u.completed] + [
            f for f in self.new if f.state == COMPLETE
        ]

    @property
    def corrupt(self) -> list[Found]:
        return [u.found for u in self.updated if u.corrupted] + [
            f for f in self.new if f.state == CORRUPT
        ]


def storable_step(f: Found) -> Found:
    """``f`` with a step the database can hold: a file name claiming a bigger one
    (``ckpt-99999999999999999999``) is recorded without a step, not refused with its run."""
    if f.step is None or f.step < _INT64:
        return f
    return dataclasses.replace(f, step=None)


def _deleting(known: Known, f: Found) -> bool:
    """TF deletes the .index before the data files: a recorded checkpoint whose index is gone
    is being deleted (and stays gone while leftovers of its data remain)."""
    return (
        known.state in (COMPLETE, GONE)
        and f.state == CORRUPT
        and (f.reason or "").startswith("no .index")
    )


def diff(obs: Observation, state: RunState) -> Changes:
    """The changes that make ``state`` hold what ``obs`` shows. ``pruning``/``pruned`` rows
    belong to the pruner: never turned gone (a ``pruned`` one seen again is recorded anew)."""
    if obs.unreadable is not None:
        return Changes(present=state.present)  # nothing was seen, so nothing is concluded
    audit: list[Audit] = []

    # Event files first: their scalars go to known checkpoints here, to new ones in the store.
    writes: list[EventFileWrite] = []
    reads: list[tuple[str, EventRead]] = []
    scalars: dict[tuple[str, int], tuple[float, float]] = {}
    for path, tail in obs.events.items():
        known_file = state.event_files.get(path)
        if known_file is not None and known_file.error:
            continue  # reported once; a corrupt file is skipped, not re-read forever
        read = tail.read if tail.read is not None else EventRead(tail.start)
        if known_file is not None and known_file.offset == read.offset and not read.error:
            continue  # nothing new in it
        reads.append((path, read))
        for name, step, value, wall_time in read.scalars:
            scalars[(name, step)] = (value, wall_time)
        if read.error:
            audit.append(Audit("event_file_corrupt", path, read.error))
        writes.append(EventFileWrite(path, read.offset, read.error, known_file is None))
    by_step: dict[int, list[str]] = {}
    for prefix, k in state.checkpoints.items():
        if k.step is not None:
            by_step.setdefault(k.step, []).append(prefix)
    metrics = [
        Metric(prefix, name, value, step, "tfevents")
        for (name, step), (value, _wall) in scalars.items()
        for prefix in by_step.get(step, ())
    ]

    new: list[Found] = []
    updated: list[Update] = []
    seen: set[str] = set()
    for f in map(storable_step, obs.found):
        if f.state == INCOMPLETE:
            seen.add(f.prefix)  # not yet a checkpoint; its completion triggers another scan
            continue
        known = state.checkpoints.get(f.prefix)
        if known is None:
            seen.add(f.prefix)
            new.append(f)
            continue
        if _deleting(known, f):
            continue  # not seen: gone now if it was complete
        seen.add(f.prefix)
        if known.state == PRUNING or (known.state == f.state and known.signature == f.signature):
            continue  # the pruner owns it until it commits "pruned"; or nothing changed
        completed = f.state == COMPLETE and known.state != COMPLETE
        corrupted = f.state == CORRUPT and known.state != CORRUPT
        updated.append(Update(known.id, f, completed, corrupted))
        if corrupted:
            audit.append(Audit("corrupt", f.prefix, f.reason, prefix=f.prefix))

    # Checkpoints that vanished: deleted by the trainer (Saver max_to_keep) or by hand.
    why = "deleted outside ckptd" if obs.present else "run directory is gone"
    gone = [
        Gone(k.id, prefix, k.step)
        for prefix, k in state.checkpoints.items()
        if prefix not in seen and k.state in (COMPLETE, CORRUPT)
    ]
    audit += [Audit("gone", g.prefix, why, prefix=g.prefix) for g in gone]

    audit += _new_audit(obs.run_dir, new)
    metrics += [
        Metric(f.prefix, name, value, f.step, "filename")
        for f in new
        for name, value in f.metrics.items()
    ]
    reported = tuple(dict.fromkeys(n for n in obs.unsupported if n not in state.unsupported))
    audit += [
        Audit(
            "unsupported_name",
            name,
            "file name is not valid UTF-8; ckptd ignores it (rename it to have it recorded)",
        )
        for name in reported
    ]
    return Changes(
        present=obs.present,
        new=tuple(new),
        updated=tuple(updated),
        gone=tuple(gone),
        gone_reason=why,
        event_files=tuple(writes),
        event_reads=tuple(reads),
        scalars=tuple((n, s, v, w) for (n, s), (v, w) in scalars.items()),
        metrics=tuple(metrics),
        audit=tuple(audit),
        reported=reported,
        touch=obs.present != state.present or not state.scanned,
    )


def _new_audit(run_dir: str, new: list[Found]) -> list[Audit]:
    """One entry per new checkpoint; past BULK_AUDIT complete ones (a backfill), one for the
    batch instead (the rows themselves carry recorded_at), corrupt ones still one by one."""
    complete = [f for f in new if f.state == COMPLETE]
    bulk = len(complete) > BULK_AUDIT
    out = [
        Audit(
            "recorded" if f.state == COMPLETE else "corrupt",
            f.prefix,
            f.reason,
            {"step": f.step, "format": f.format},
            prefix=f.prefix,
        )
        for f in new
        if f.state != COMPLETE or not bulk
    ]
    if bulk:
        steps = [f.step for f in complete if f.step is not None]
        out.append(
            Audit(
                "recorded",
                run_dir,
                f"{len(complete)} checkpoints found in one scan",
                {"count": len(complete), "steps": [min(steps), max(steps)] if steps else None},
            )
        )
    return out


def apply_to(state: RunState, changes: Changes, new_ids: Mapping[str, int]) -> RunState:
    """The state after the store applied ``changes`` (``new_ids``: ids of the new checkpoints)."""
    if changes.empty:
        return state
    checkpoints = dict(state.checkpoints)
    for u in changes.updated:
        checkpoints[u.found.prefix] = Known(u.id, u.found.state, u.found.step, u.found.signature)
    for g in changes.gone:
        checkpoints[g.prefix] = dataclasses.replace(checkpoints[g.prefix], state=GONE)
    for f in changes.new:
        checkpoints[f.prefix] = Known(new_ids[f.prefix], f.state, f.step, f.signature)
    event_files = dict(state.event_files)
    for w in changes.event_files:
        event_files[w.path] = EventFile(w.offset, w.error)
    return RunState(
        state.run_id,
        state.version + 1,
        changes.present,
        True,
        checkpoints,
        event_files,
        state.unsupported | set(changes.reported),
    )
