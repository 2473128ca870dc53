"""Observe: what one run directory holds now — the filesystem half of a reconcile.

Pure reads (listing, .index headers, event-file tails), no database, picklable results, so a
backfill can observe many runs in worker processes while the daemon writes what they saw. The
reconciler (``reconcile.py``) decides what an observation means for the database.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import formats
from ckptd.eventfiles import ReadResult, metric_prefix, read_scalars

log = logging.getLogger(__name__)


@dataclass
class EventTail:
    """One event file: its size now and, when it grew, the records read from ``start``."""

    size: int
    start: int
    read: ReadResult | None  # None: unchanged since the offset the database holds


@dataclass
class Observation:
    present: bool
    found: list[formats.Found] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    events: dict[str, EventTail] = field(default_factory=dict)
    basis: int = -1  # the reconciler cache generation this was observed against
    # What a quick rescan compares to skip this run while nothing changed (see fingerprint_holds);
    # None when the directory may still change without its mtime showing it.
    fingerprint: Fingerprint | None = None


@dataclass(frozen=True)
class Fingerprint:
    """mtimes of the run directory and its event subdirectories, sizes of its event files.

    Any file created, renamed or deleted in the run directory changes its mtime; a growing event
    file changes its size. Taken before the listing, so a change during it is never absorbed.
    """

    run_mtime_ns: int
    dirs: tuple[tuple[str, int], ...]
    event_sizes: tuple[tuple[str, int], ...]


# An mtime this close to now can still be followed by a change in the same timestamp tick
# (coarse filesystem clocks): such a fingerprint is not trusted ("racy" in git's terms).
_RACY_NS = 2_000_000_000


def fingerprint_holds(run_dir: Path, fp: Fingerprint) -> bool:
    """Whether nothing a quick rescan can see changed since ``fp`` (a few stats, no listing)."""
    try:
        if os.stat(run_dir, follow_symlinks=False).st_mtime_ns != fp.run_mtime_ns:
            return False
        for d, mtime in fp.dirs:
            if os.stat(d, follow_symlinks=False).st_mtime_ns != mtime:
                return False
        for path, size in fp.event_sizes:
            if os.stat(path, follow_symlinks=False).st_size != size:
                return False
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Request:
    """What observing a run needs to know from the database (picklable)."""

    run_dir: Path
    keras_template: str | None
    known: dict[str, tuple[int, ...]] | None  # prefix -> signature of validated checkpoints
    event_offsets: dict[str, int]  # event file -> offset already read (absent: new file)
    skip_events: frozenset[str]  # event files reported corrupt: never re-read
    stale_after: float
    basis: int


def observe(req: Request) -> Observation:
    run_dir = req.run_dir
    if not run_dir.is_dir() or run_dir.is_symlink():
        return Observation(False, basis=req.basis)
    try:
        run_mtime = os.stat(run_dir).st_mtime_ns
    except OSError:
        return Observation(False, basis=req.basis)
    obs = Observation(True, basis=req.basis)
    obs.found = formats.scan_run(
        run_dir,
        req.keras_template,
        req.known,
        stale_after=req.stale_after,
        unsupported=obs.unsupported,
    )
    dir_mtimes: dict[str, int] = {}
    for path in formats.event_files(run_dir, dir_mtimes=dir_mtimes):
        key = str(path)
        if key in req.skip_events:
            continue  # reported once; a corrupt file is skipped, not re-read forever
        try:
            size = path.stat().st_size
        except OSError:
            continue
        offset = req.event_offsets.get(key)
        if offset is not None and size == offset:
            obs.events[key] = EventTail(size, offset, None)
            continue
        start = offset if offset is not None and size > offset else 0  # shrank: replaced
        obs.events[key] = EventTail(
            size, start, read_scalars(path, start, metric_prefix(run_dir, path))
        )
    racy = time.time_ns() - _RACY_NS
    # A partial write turns corrupt after stale_after with no change on disk: not settled.
    settled = all(f.state != formats.INCOMPLETE for f in obs.found)
    if settled and run_mtime < racy and all(m < racy for m in dir_mtimes.values()):
        obs.fingerprint = Fingerprint(
            run_mtime,
            tuple(sorted(dir_mtimes.items())),
            tuple(sorted((k, t.size) for k, t in obs.events.items())),
        )
    return obs


def observe_many(requests: Sequence[Request], workers: int) -> Iterator[Observation]:
    """Observations in request order; with ``workers`` > 1, computed in worker processes.

    The pool lives only as long as the iteration (a backfill), so an idle daemon keeps no extra
    processes. Processes come from a fork server (never a fork of this threaded daemon). The
    caller's process works too: a run no worker has started by the time the caller wants it is
    observed right here (while the pool starts up, and whenever the workers fall behind). If the
    pool cannot start or breaks, the remaining runs are observed here — never lost.
    """
    done = 0
    stolen: dict[int, Observation] = {}  # observed here ahead of their turn
    if workers > 1 and len(requests) > 1:
        pool = None
        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["ckptd.daemon.observe"])
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
            futures = [pool.submit(observe, req) for req in requests]
            n, ahead = len(requests), 0
            for i in range(n):
                if i in stolen:
                    obs = stolen.pop(i)
                elif futures[i].cancel():  # no worker has it yet: do it here
                    obs = observe(requests[i])
                else:
                    # A worker has it: meanwhile observe the next run no worker has started
                    # (a future only goes from pending to running, so `ahead` only advances).
                    ahead = max(ahead, i + 1)
                    while not futures[i].done():
                        while ahead < n and not futures[ahead].cancel():
                            ahead += 1
                        if ahead >= n:
                            break
                        stolen[ahead] = observe(requests[ahead])
                        ahead += 1
                    obs = futures[i].result()
                done += 1
                yield obs
        except Exception as exc:  # BrokenProcessPool, OSError (no /dev/shm, seccomp) …
            log.warning(
                "observing runs in %d worker processes failed (%s); continuing in-process",
                workers,
                exc,
            )
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                _stop_forkserver()
    for i in range(done, len(requests)):
        yield stolen.pop(i) if i in stolen else observe(requests[i])


def _stop_forkserver() -> None:
    """The fork server otherwise idles for the daemon's lifetime (~20 MB). ``_stop`` is private
    (CPython's own tests use it); without it the server just stays."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        try:
            stop()
        except OSError:  # pragma: no cover - already gone
            pass


def default_workers() -> int:
    """One worker per CPU this process may use (the daemon applies results meanwhile)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1
