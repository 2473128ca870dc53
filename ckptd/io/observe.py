"""Observe: what one run directory holds now — the filesystem half of a reconcile.

Pure reads (listing, .index headers, event-file tails), no database, picklable results, so a
backfill can observe many runs in worker processes while the daemon writes what they saw.
``core.recording.diff`` decides what an observation means for the database.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ckptd.core.recording import (
    EventRead,
    EventTail,
    Fingerprint,
    Observation,
    RunDir,
    RunState,
)
from ckptd.io import formats, safeio
from ckptd.io.eventfiles import ReadResult, metric_prefix, read_scalars

log = logging.getLogger(__name__)


# An mtime this close to now can still be followed by a change in the same timestamp tick
# (coarse filesystem clocks): such a fingerprint is not trusted ("racy" in git's terms).
_RACY_NS = 2_000_000_000


def fingerprint_holds(run_dir: Path, fp: Fingerprint) -> bool:
    """Whether nothing a quick rescan can see changed since ``fp`` (a few stats, no listing).

    Plain ``lstat`` calls, not the directory-fd walk from ``root`` that reads use: they only
    decide whether to look again, never what is recorded; any difference (a directory
    swapped for a symlink has the link's own mtime) sends the run to a full observation through
    :mod:`ckptd.io.safeio`. A quick rescan of every run costs a few stats each this way, where the
    fd walk cost several opens.
    """
    base = os.fspath(run_dir)
    lstat = os.lstat
    try:
        if lstat(base).st_mtime_ns != fp.run_mtime_ns:
            return False
        for d, mtime in fp.dirs:
            if lstat(f"{base}/{d}").st_mtime_ns != mtime:
                return False
        for path, size in fp.event_sizes:
            if lstat(f"{base}/{path}").st_size != size:
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
    basis: int | None  # the run version the rest was taken from; None: a first look
    # The watch root the run directory is reached from (its path is the user's choice and may
    # be a symlink; nothing below it is followed). None: the run directory is its own root.
    root: Path | None = None
    step_variable: str | None = None  # the tensor a TF checkpoint's step is read from

    @classmethod
    def first_look(
        cls,
        run_dir: Path,
        keras_template: str | None,
        stale_after: float,
        root: Path | None = None,
        step_variable: str | None = None,
    ) -> Request:
        """A run the database knows nothing about (yet): everything in it is new."""
        return cls(
            run_dir, keras_template, None, {}, frozenset(), stale_after, None, root, step_variable
        )

    @classmethod
    def for_state(cls, run: RunDir, state: RunState, stale_after: float) -> Request:
        """Observing ``run`` knowing what the store holds for it (unchanged files not re-read)."""
        files = state.event_files
        return cls(
            run.path,
            run.keras_template,
            {p: k.signature for p, k in state.checkpoints.items() if k.state == formats.COMPLETE},
            {p: f.offset for p, f in files.items()},
            frozenset(p for p, f in files.items() if f.error),
            stale_after,
            state.version,
            run.root,
            run.step_variable,
        )


STALE_AFTER = 120.0  # seconds a partial write may stay unchanged before it is called corrupt
# Fewer runs than this are observed in-process at start: starting worker processes would cost
# more than it saves.
PARALLEL_MIN_RUNS = 8


def observe(req: Request) -> Observation:
    """What the run directory holds, read through one directory fd from the watch root.

    Absent, or no longer a real directory (replaced by a symlink or a file): not present.
    Present but unreadable (EACCES, EIO …): ``unreadable``, with nothing concluded.
    """
    root = req.root if req.root is not None else req.run_dir
    try:
        with safeio.open_dir_under(root, req.run_dir) as dfd:
            return _observe(req, dfd)
    except (FileNotFoundError, NotADirectoryError, safeio.UnsafePath):
        return Observation(str(req.run_dir), False, basis=req.basis)
    except OSError as exc:
        why = f"{req.run_dir}: cannot read the run directory: {exc.strerror or exc}"
        return Observation(str(req.run_dir), True, basis=req.basis, unreadable=why)


def _observe(req: Request, dfd: int) -> Observation:
    run_dir = req.run_dir
    run_mtime = os.fstat(dfd).st_mtime_ns
    # One walk: checkpoints (Keras ones also in subdirectories), event files, subdirectory mtimes.
    listing = formats.list_run(
        run_dir,
        req.keras_template,
        req.known,
        dir_fd=dfd,
        stale_after=req.stale_after,
        step_variable=req.step_variable,
    )
    found = listing.checkpoints
    events: dict[str, EventTail] = {}
    dir_mtimes = listing.dir_mtimes
    for path in listing.event_files:
        key = str(path)
        if key in req.skip_events:
            continue  # reported once; a corrupt file is skipped, not re-read forever
        try:
            size = os.stat(path, follow_symlinks=False).st_size
        except OSError:
            continue
        offset = req.event_offsets.get(key)
        if offset is not None and size == offset:
            events[key] = EventTail(size, offset, None)
            continue
        start = offset if offset is not None and size > offset else 0  # shrank: replaced
        read = read_scalars(path, start, metric_prefix(run_dir, path), root=req.root or run_dir)
        events[key] = EventTail(size, start, _event_read(read))
    racy = time.time_ns() - _RACY_NS
    # A partial write turns corrupt after stale_after with no change on disk: not settled. Nor
    # is an event file that could not be read: regaining access changes no mtime or size.
    settled = all(f.state != formats.INCOMPLETE for f in found) and not any(
        t.read is not None and t.read.retry for t in events.values()
    )
    fingerprint = None
    if settled and run_mtime < racy and all(m < racy for m in dir_mtimes.values()):
        base = len(str(run_dir)) + 1  # paths relative to the run directory
        fingerprint = Fingerprint(
            run_mtime,
            tuple(sorted(dir_mtimes.items())),
            tuple(sorted((k[base:], t.size) for k, t in events.items())),
        )
    return RunObservation(
        str(run_dir),
        True,
        tuple(found),
        tuple(listing.unsupported),
        events,
        req.basis,
        fingerprint,
        unread=tuple(sorted(listing.unread.items())),
    )


@dataclass(frozen=True)
class RunObservation(Observation):
    """An observation of a run directory that was listed, with the checkpoint-like files in it
    that ckptd does not record (relative path, why): reported, so such a run is not silently
    empty. (Not part of the recording diff: nothing is written for them but a warning.)"""

    unread: tuple[tuple[str, str], ...] = ()


def _event_read(r: ReadResult) -> EventRead:
    return EventRead(r.offset, tuple(r.scalars), r.error, r.retry, r.skipped, r.skip_reason)


def _observe_or_none(req: Request) -> Observation | None:
    """None when observing fails unexpectedly: the recorder then observes that run again
    inside its own error handling, so one bad run is logged and skipped, not the backfill."""
    try:
        return observe(req)
    except Exception:
        log.debug("observing %s failed; left to the reconciler", req.run_dir, exc_info=True)
        return None


def observe_many(
    requests: Sequence[Request], workers: int, *, pool: ObservePool | None = None
) -> Iterator[Observation | None]:
    """Observations in request order; with ``workers`` > 1, also computed in worker processes.

    The pool lives only as long as the iteration (a backfill), so an idle daemon keeps no extra
    processes; its processes come from a fork server (never a fork of this threaded daemon). The
    caller's process works too: while the pool starts (a background thread waits for that), and
    then whenever it wants a run no worker has started yet. If the pool cannot start or breaks,
    the remaining runs are observed here — never lost. ``pool``: one already started for exactly
    these requests (see ``prefetch.py``).
    """
    n = len(requests)
    if pool is None:
        if workers <= 1 or n <= 1:
            for req in requests:
                yield _observe_or_none(req)
            return
        pool = ObservePool(requests, workers)
    stolen: dict[int, Observation | None] = {}  # observed here ahead of their turn
    ahead = 0
    try:
        for i in range(n):
            future = pool.future(i)
            if i in stolen:
                obs = stolen.pop(i)
            elif future is None or future.cancel():  # the pool is not up, or nobody took it
                obs = _observe_or_none(requests[i])
            else:
                # A worker has it: meanwhile observe the next run no worker has started
                # (a future only goes from pending to running, so `ahead` only advances).
                ahead = max(ahead, i + 1)
                while not future.done():
                    nxt = pool.future(ahead) if ahead < n else None
                    while nxt is not None and not nxt.cancel():
                        ahead += 1
                        nxt = pool.future(ahead) if ahead < n else None
                    if nxt is None:
                        break
                    stolen[ahead] = _observe_or_none(requests[ahead])
                    ahead += 1
                try:
                    obs = future.result()
                except Exception as exc:  # BrokenProcessPool, a pickling error …
                    pool.failed(exc)
                    obs = _observe_or_none(requests[i])
            yield obs
    finally:
        pool.close()


class ObservePool:
    """Worker processes for :func:`observe_many`, started without blocking the caller.

    Until the pool is up (the fork server imported ckptd and forked the workers), ``future``
    returns None and the caller observes runs itself; then every later request is submitted.
    """

    def __init__(self, requests: Sequence[Request], workers: int) -> None:
        self.requests = requests
        self._lock = threading.Lock()
        self._wanted = 0  # the highest index the caller has asked for, +1
        self._futures: dict[int, Future[Observation | None]] = {}
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._start, args=(workers,), name="ckptd-observe-pool", daemon=True
        )
        self._thread.start()

    def _start(self, workers: int) -> None:
        try:
            ctx = start_fork_server()
            executor = ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_yield_cpu, initargs=(WORKER_NICE,)
            )
            self._executor = executor
            executor.submit(int).result()  # the fork server and the workers are up
            with self._lock:
                if self._closed:
                    return
                for i in range(self._wanted, len(self.requests)):
                    self._futures[i] = executor.submit(_observe_or_none, self.requests[i])
        except Exception as exc:
            self.failed(exc)

    def future(self, i: int) -> Future[Observation | None] | None:
        with self._lock:
            self._wanted = max(self._wanted, i + 1)
            return self._futures.get(i)

    def failed(self, exc: BaseException) -> None:
        """Stop using the pool: the caller observes everything left itself."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures, self._futures = self._futures, {}
        for f in futures.values():
            f.cancel()
        log.warning("observing runs in worker processes failed (%s); continuing in-process", exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._futures = {}
        self._thread.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            stop_fork_server(wait=False)


# Workers run at a lower priority than the daemon: its single thread writing what they observed
# is the backfill's critical path, and they should take the CPU it leaves, not share its core.
WORKER_NICE = 10


def _yield_cpu(increment: int) -> None:
    try:
        os.nice(increment)
    except OSError:  # pragma: no cover - not permitted: run at the daemon's priority
        pass


def start_fork_server() -> multiprocessing.context.ForkServerContext:
    """Start the fork server the backfill's workers come from (idempotent, returns at once).

    ``ckptd run`` calls this first thing, so the server's own start-up (a fresh interpreter
    importing this module) overlaps the daemon's imports instead of delaying the backfill.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["ckptd.io.observe"])
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return ctx


def stop_fork_server(*, wait: bool = True) -> None:
    """The fork server, a process of its own, otherwise idles for the daemon's lifetime.
    ``_stop`` is private (CPython's own tests use it); without it the server just stays.
    ``wait=False``: in a background thread (the server takes a moment to exit, and nothing needs
    to wait for that)."""
    if not wait:
        threading.Thread(
            target=stop_fork_server, name="ckptd-stop-fork-server", daemon=True
        ).start()
        return
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
