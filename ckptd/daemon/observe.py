"""Observe: what one run directory holds now — the filesystem half of a reconcile.

Pure reads (listing, .index headers, event-file tails), no database, picklable results, so a
backfill can observe many runs in worker processes while the daemon writes what they saw. The
reconciler (``reconcile.py``) decides what an observation means for the database.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
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
    obs = Observation(True, basis=req.basis)
    obs.found = formats.scan_run(
        run_dir,
        req.keras_template,
        req.known,
        stale_after=req.stale_after,
        unsupported=obs.unsupported,
    )
    for path in formats.event_files(run_dir):
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
    return obs


def observe_many(requests: Sequence[Request], workers: int) -> Iterator[Observation]:
    """Observations in request order; with ``workers`` > 1, computed in worker processes.

    The pool lives only as long as the iteration (a backfill), so an idle daemon keeps no extra
    processes. Processes come from a fork server (never a fork of this threaded daemon). If the
    pool cannot start or breaks, the remaining runs are observed here — never lost.
    """
    done = 0
    if workers > 1 and len(requests) > 1:
        pool = None
        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["ckptd.daemon.observe"])
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
            chunk = max(1, min(16, len(requests) // (workers * 4)))
            for obs in pool.map(observe, requests, chunksize=chunk):
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
    for req in requests[done:]:
        yield observe(req)


def default_workers() -> int:
    """One worker per CPU this process may use (the daemon applies results meanwhile)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1
