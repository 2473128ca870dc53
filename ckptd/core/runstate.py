"""What recording works on: a run directory's :class:`Observation`, the store's
:class:`RunState` of it, and the :class:`Changes` that ``core.recording.diff`` computes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.core.model import COMPLETE, CORRUPT

INCOMPLETE = "incomplete"  # a save in progress: seen in a scan, never stored

ScalarValue = tuple[str, int, float, float]  # (name, step, value, wall time)
Scalar = tuple[str, int, float, float, float]  # ... and its event file's creation time (born)


@dataclass(frozen=True)
class RunDir:
    """A run directory to record: its name, path, the watch root it is reached from."""

    name: str
    path: Path
    root: Path
    keras_template: str | None = None
    step_variable: str | None = None  # the tensor a TF checkpoint's step is read from
    # On an object store: the run's and the watch's URLs (``s3://bucket/runs/r1``), what the
    # store records them by; ``path`` and ``root`` are then not local directories.
    url: str | None = None
    root_url: str | None = None

    @property
    def key(self) -> str:
        """What the store records the run by: its path, or its URL."""
        return self.url if self.url is not None else str(self.path)

    @property
    def root_key(self) -> str:
        return self.root_url if self.root_url is not None else str(self.root)


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
    format: str = "tf2"
    incarnation: int = 1


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
    # When each incarnation after the first started (see core/incarnations.py).
    incarnation_starts: tuple[float, ...] = ()

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
    checkpoint_id: int | None = None  # a stored row, when ``prefix`` would name its successor


@dataclass(frozen=True)
class Changes:
    """What to write so the store holds what an observation shows.

    Besides these, the store gives each new checkpoint the event-file values logged at its step
    in its incarnation (those recorded earlier are in the store, not in the state).
    """

    present: bool
    new: tuple[Found, ...] = ()
    updated: tuple[Update, ...] = ()
    gone: tuple[Gone, ...] = ()
    replaced: tuple[Gone, ...] = ()  # rows whose files were written anew: a new row in ``new``
    incarnations: Mapping[str, int] = field(default_factory=dict)  # of each new one, by prefix
    incarnation_starts: tuple[float, ...] | None = None  # all of them, when one began
    gone_reason: str = ""
    event_files: tuple[EventFileWrite, ...] = ()
    event_reads: tuple[tuple[str, EventRead], ...] = ()  # the reads used (for their warnings)
    scalars: tuple[Scalar, ...] = ()
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
            or self.replaced
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
