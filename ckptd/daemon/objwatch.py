"""Object store watches (``s3://``, ``gs://``): a polling thread each, feeding the recorder.

There is no inotify on a bucket, so each watch is polled at its own ``poll_interval``: its runs
are found with delimiter listings, each run is listed in one request, and a run whose listing
did not change since it was last recorded (same objects, versions and sizes) is not recorded
again, so an idle run costs one LIST per interval. What changed goes through the same recording
path as a local run (leases decide which runs this daemon records). A failing store (down,
throttling, wrong credentials) is retried with backoff; the daemon stays up and ``status`` says
what fails. Requests are counted per watch: per minute in ``status``, as a Prometheus counter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ckptd.config import WatchConfig
from ckptd.core.recording import Observation
from ckptd.daemon import metrics
from ckptd.daemon.reconcile import Outcome
from ckptd.daemon.runs import RunSpec
from ckptd.io.objstore import Store, StoreError, open_store
from ckptd.io.objstore.listing import (
    RunListing,
    discover_runs,
    list_run,
    list_watch,
    run_key,
)
from ckptd.io.objstore.observe import ShortRead, observe_listing, settled
from ckptd.io.observe import Request

log = logging.getLogger(__name__)

# Every this many polls, every run is recorded again even if its listing did not change (what
# the local periodic deep rescan does: a run another daemon held meanwhile, a lost write).
DEEP_EVERY = 30
BACKOFF_MAX = 300.0  # seconds between attempts while a store keeps failing
RATE_WINDOW = 60.0  # seconds the requests-per-minute figure is taken over
PAGE = 1000  # objects per listing page (S3's and GCS's maximum)

Record = Callable[[RunSpec, Callable[[Request], Observation]], Outcome]
Known = Callable[[str], list[str]]  # watch URL -> names of its runs recorded present


def is_object_watch(w: WatchConfig) -> bool:
    return w.is_object_store


def poll_interval(w: WatchConfig) -> float:
    return w.poll_interval.total_seconds()


@dataclass
class ObjectWatch:
    """One object store watch: its store, what was last recorded of each run, its health."""

    index: int
    watch: WatchConfig
    record: Record
    known: Known = lambda _url: []
    store: Store | None = None
    markers: dict[str, str] = field(default_factory=dict)  # run -> listing marker, settled
    runs: set[str] = field(default_factory=set)  # runs seen so far (to notice them gone)
    polls: int = 0
    last_poll: float = 0.0
    last_error: str | None = None
    failing_since: float | None = None
    failures: int = 0  # polls failed in a row
    whole: bool = True  # list the whole watch in one listing (else: one per run)
    _rate: deque[tuple[float, int]] = field(default_factory=deque)
    _counted: int = 0  # requests already added to the Prometheus counter

    @property
    def url(self) -> str:
        return str(self.watch.path)

    def _open(self) -> Store:
        if self.store is None:
            self.store = open_store(self.url, endpoint_url=self.watch.endpoint_url)
        return self.store

    def poll(self, stop: threading.Event | None = None) -> int:
        """Look at every run once; the checkpoints recorded. Raises StoreError when the store
        fails (what was recorded before that stays recorded)."""
        store = self._open()
        if self.polls == 0:  # runs deleted while no daemon watched: found gone now
            self.runs |= {n if self.watch.runs else "" for n in self.known(self.url)}
        deep = self.polls % DEEP_EVERY == 0
        self.polls += 1
        recorded = 0
        try:
            listed: dict[str, RunListing] | None = None
            if self.whole:
                listed = {self._name(store, r): r for r in list_watch(store, self.watch.runs)}
                names = list(listed)
            else:
                names = discover_runs(store, self.watch.runs)
            if not names and self.runs:
                # Every run gone at once: first make sure the bucket is still there and
                # readable (a StoreError, nothing concluded) before calling them gone.
                store.check_access()
            objects = 0
            for name in sorted(set(names) | self.runs):
                if stop is not None and stop.is_set():
                    break
                if listed is not None:
                    listing = listed.get(name) or RunListing(*_nothing(store, name))
                else:
                    listing = list_run(store, name)
                objects += len(listing.objects)
                recorded += self._run(store, name, listing, deep)
            self.runs |= set(names)
            # One listing of the whole watch while it costs no more pages than listing the
            # runs one by one would cost requests.
            self.whole = -(-objects // PAGE) <= 1 + len(self.runs)
        finally:
            self._counted_requests()
        self.last_poll = time.time()
        if self.last_error is not None:
            log.info("%s: the object store answers again", self.url)
        self.last_error, self.failing_since, self.failures = None, None, 0
        return recorded

    @staticmethod
    def _name(store: Store, listing: RunListing) -> str:
        return listing.key[len(store.root) + 1 :]

    def _run(self, store: Store, name: str, listing: RunListing, deep: bool) -> int:
        if not deep and self.markers.get(name) == listing.marker:
            return 0  # unchanged since it was recorded: nothing to read
        seen: list[Observation] = []
        failed: list[Exception] = []

        def observer(req: Request) -> Observation:
            try:
                obs: Observation = observe_listing(store, listing, req)
            except (StoreError, ShortRead) as exc:  # nothing concluded; reported, backed off
                failed.append(exc)
                obs = Observation(listing.url, True, basis=req.basis, unreadable=str(exc))
            seen.append(obs)
            return obs

        outcome = self.record(self._spec(name, listing), observer)
        if failed:
            self.markers.pop(name, None)
            raise failed[0]
        if seen and settled(seen[-1]):
            self.markers[name] = listing.marker
        else:  # not recorded (another daemon's run) or still in progress: look again
            self.markers.pop(name, None)
        if not listing.present:
            self.runs.discard(name)
        return len(outcome.recorded)

    def _spec(self, name: str, listing: RunListing) -> RunSpec:
        shown = name or PurePosixPath(listing.key).name
        # (its path is no local directory: the run is recorded by its URL)
        return RunSpec(self.index, shown, Path(listing.key), self.watch, url=listing.url)

    def failed(self, exc: Exception) -> float:
        """Note a failed poll; seconds to wait before the next one (doubling, capped)."""
        self._counted_requests()
        self.failures += 1
        message = str(exc) or type(exc).__name__
        if message != self.last_error:  # once per distinct failure, not once per attempt
            expected = isinstance(exc, StoreError | ShortRead | OSError)
            shown = message if self.url in message else f"{self.url}: {message}"
            log.warning("%s; retrying with backoff", shown, exc_info=not expected)
        self.last_error = message
        if self.failing_since is None:
            self.failing_since = time.time()
        return min(poll_interval(self.watch) * 2 ** min(self.failures, 16), BACKOFF_MAX)

    def _counted_requests(self) -> None:
        if self.store is None:
            return
        n = self.store.requests
        now = time.monotonic()
        self._rate.append((now, n))
        while len(self._rate) > 2 and self._rate[1][0] <= now - RATE_WINDOW:
            self._rate.popleft()
        metrics.object_store_requests(self.url, n - self._counted)
        self._counted = n

    def requests_per_minute(self) -> float | None:
        """Requests over the last minute or so (None before two polls)."""
        if len(self._rate) < 2:
            return None
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) * 60.0 / (t1 - t0) if t1 > t0 else None

    def describe(self, alive: bool) -> dict[str, Any]:
        rate = self.requests_per_minute()
        return {
            "path": self.url,
            "observer": f"polling every {poll_interval(self.watch):g} s",
            "alive": alive,
            "watching": self.url,
            "requests": self.store.requests if self.store is not None else 0,
            "requests_per_minute": None if rate is None else round(rate, 1),
            "last_poll": self.last_poll or None,
            "last_error": self.last_error,
            "failing_since": self.failing_since,
        }


def _nothing(store: Store, name: str) -> tuple[str, str, tuple[()]]:
    """The listing of a run that holds no object (any more)."""
    key = run_key(store, name)
    return key, store.url_of(key), ()


class ObjectWatches:
    """A polling thread per object store watch of the config."""

    def __init__(
        self, watches: tuple[WatchConfig, ...], record: Record, known: Known = lambda _u: []
    ) -> None:
        self.watches = [
            ObjectWatch(i, w, record, known) for i, w in enumerate(watches) if is_object_watch(w)
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def poll_once(self) -> int:
        """Every object store watch polled once (``ckptd run --once``); failures are logged."""
        total = 0
        for w in self.watches:
            try:
                total += w.poll(self._stop)
            except Exception as exc:  # StoreError, or a store that cannot even be opened
                w.failed(exc)
        return total

    def start(self) -> None:
        self._stop.clear()
        for w in self.watches:
            t = threading.Thread(
                target=self._loop, args=(w,), name=f"ckptd-poll-{w.index}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def _loop(self, w: ObjectWatch) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                w.poll(self._stop)
                wait = poll_interval(w.watch) - (time.monotonic() - t0)
            except Exception as exc:  # never let this thread die: back off and try again
                wait = w.failed(exc)
            self._stop.wait(max(wait, 0.0))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        self._threads = []

    def healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def describe(self) -> list[dict[str, Any]]:
        alive = {t.name for t in self._threads if t.is_alive()}
        return [w.describe(f"ckptd-poll-{w.index}" in alive) for w in self.watches]
